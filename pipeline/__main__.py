"""`python -m framecast`: the same as the `framecast` console script.

The launcher stands on the top floor with the CLI it starts; the core itself imports no stage.
"""

from framecast.stages.cli import main

raise SystemExit(main())
