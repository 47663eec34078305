"""framecast: streaming video understanding with MiniCPM-V on MLX.

`framecast` is the core (framework and engine); it never imports `framecast.stages`. Only the
composition root on top (`framecast.stages.app`, `framecast.stages.cli`) knows every stage.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

try:
    from framecast._blas import preload_openblas

    # Must run before the first `import mlx`: MLX's Linux CPU wheel links a slow reference BLAS.
    preload_openblas()
except KeyboardInterrupt:
    # Ctrl-C while the `framecast` command is still starting (before `cli.main` can catch it):
    # stop quietly with the shell's 128 + SIGINT, as a stop at any later moment does.
    if _os.path.basename(_sys.argv[0] if _sys.argv else "") in ("framecast", "-m", "__main__.py"):
        raise SystemExit(130) from None
    raise
