"""`python -m nemo_automodel_dspark` = the `dspark` console script."""

import sys

from nemo_automodel_dspark.cli import main

sys.exit(main())
