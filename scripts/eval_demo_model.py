"""Evaluate the demo model on held-out seeds through the streaming session: `python scripts/eval_demo_model.py --help`.

The code lives in `framecast.stages.demo_training.evaluate` (scripts import the installed package).
"""

import sys

from framecast.stages.demo_training.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
