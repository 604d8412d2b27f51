"""Train DSpark speculative-decoding drafters (semi-autoregressive parallel drafter + Markov head + confidence head).

The package root stays light: it imports neither `nemo_automodel` nor torch, and only filters the known import noise
of dependencies (`quiet.py`). Public names are resolved lazily so that `import nemo_automodel_dspark` costs nothing
until a name is used.
"""

from __future__ import annotations

from nemo_automodel_dspark import quiet
from nemo_automodel_dspark.lazy import lazy_getattr

__version__ = "0.1.0"
quiet.install()  # before any dependency is imported: no import noise on the first screen

_EXPORTS = {
    "DSparkConfig": "nemo_automodel_dspark.model.config",
    "DSparkDrafter": "nemo_automodel_dspark.model.drafter",
    "DSparkOutput": "nemo_automodel_dspark.model.drafter",
    "dspark_loss": "nemo_automodel_dspark.loss.objective",
    "dspark_head_loss": "nemo_automodel_dspark.loss.objective",
    "DSparkLossOutput": "nemo_automodel_dspark.loss.objective",
    "capture_target_features": "nemo_automodel_dspark.target.capture",
    "default_target_layer_ids": "nemo_automodel_dspark.model.layer_ids",
    "sample_anchors": "nemo_automodel_dspark.masks",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
