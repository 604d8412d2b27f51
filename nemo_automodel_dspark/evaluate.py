"""`python -m nemo_automodel_dspark.evaluate` = `dspark evaluate` (see `inference/evaluate.py`)."""

import sys

from nemo_automodel_dspark.inference.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
