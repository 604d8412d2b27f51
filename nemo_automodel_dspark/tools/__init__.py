"""Command-line tools around training: build a tiny local target, regenerate data with a target.

Names resolve lazily so that importing the package (e.g. for `dspark --help`) does not import torch.
"""

from __future__ import annotations

from nemo_automodel_dspark.lazy import lazy_getattr

_EXPORTS = {
    "build_tiny_target": "nemo_automodel_dspark.tools.tiny_target",
    "TinyTargetSpec": "nemo_automodel_dspark.tools.tiny_target",
    "stdlib_chat_rows": "nemo_automodel_dspark.tools.stdlib_corpus",
    "regenerate": "nemo_automodel_dspark.tools.regenerate",
    "RegenerateConfig": "nemo_automodel_dspark.tools.regenerate",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
