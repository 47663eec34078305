"""framecast: streaming video understanding with MiniCPM-V on MLX.

`framecast` is the core (framework and engine); it never imports `framecast.stages`. Only the
composition root on top (`framecast.stages.app`, `framecast.stages.cli`) knows every stage.
"""

from framecast._blas import preload_openblas

__version__ = "0.1.0"

# Must run before the first `import mlx`: MLX's Linux CPU wheel links a slow reference BLAS.
preload_openblas()
