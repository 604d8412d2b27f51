"""Command-line tools around training: build a tiny local target, regenerate data with a target.

Names resolve lazily so that importing the package (e.g. for `dspark --help`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_tiny_target": "nemo_automodel_dspark.tools.tiny_target",
    "TinyTargetSpec": "nemo_automodel_dspark.tools.tiny_target",
    "stdlib_chat_rows": "nemo_automodel_dspark.tools.stdlib_corpus",
    "regenerate": "nemo_automodel_dspark.tools.regenerate",
    "RegenerateConfig": "nemo_automodel_dspark.tools.regenerate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nemo_automodel_dspark.tools' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
