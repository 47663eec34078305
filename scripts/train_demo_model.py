"""Train the embedded demo model: `python scripts/train_demo_model.py --help`.

The code lives in `framecast.stages.demo_training.train` (scripts import the installed package).
"""

import sys

from framecast.stages.demo_training.train import main

if __name__ == "__main__":
    sys.exit(main())
