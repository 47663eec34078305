"""framecast: streaming video understanding with MiniCPM-V on MLX.

`pipeline` is the framework and the engine; it never imports `stages` (only the composition
root, `pipeline.cli` / `pipeline.app`, knows every stage).
"""

from pipeline._blas import preload_openblas

__version__ = "0.1.0"

# Must run before the first `import mlx`: MLX's Linux CPU wheel links a slow reference BLAS.
preload_openblas()
