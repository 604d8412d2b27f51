"""`python -m nemo_automodel_dspark.evaluate ARGS` is `dspark evaluate ARGS` (same flags, same one-line errors).

It lives at the CLI layer (beside `cli.py`), not in `inference/`, so that the library never imports the CLI.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from nemo_automodel_dspark.cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
