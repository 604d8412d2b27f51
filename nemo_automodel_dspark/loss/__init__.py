"""Loss and metrics: pure tensor math returning (numerator, denominator) sums; no `torch.distributed` here.

Names resolve lazily, so `loss.config` (the objective's options) is importable without torch.
"""

from __future__ import annotations

from nemo_automodel_dspark.lazy import lazy_getattr

_EXPORTS = {
    "DSparkLossOutput": "nemo_automodel_dspark.loss.objective",
    "LogitHead": "nemo_automodel_dspark.loss.head",
    "LossConfig": "nemo_automodel_dspark.loss.config",
    "default_chunk_rows": "nemo_automodel_dspark.loss.chunked",
    "dspark_head_loss": "nemo_automodel_dspark.loss.objective",
    "dspark_loss": "nemo_automodel_dspark.loss.objective",
    "head_row_ce_l1": "nemo_automodel_dspark.loss.head",
    "flatten_sums": "nemo_automodel_dspark.loss.metrics",
    "metrics_from_sums": "nemo_automodel_dspark.loss.metrics",
    "reference_row_ce_l1": "nemo_automodel_dspark.loss.chunked",
    "row_ce_l1": "nemo_automodel_dspark.loss.chunked",
    "slot_weights": "nemo_automodel_dspark.loss.objective",
    "unflatten_sums": "nemo_automodel_dspark.loss.metrics",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
