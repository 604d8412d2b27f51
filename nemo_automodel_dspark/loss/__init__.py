"""Loss and metrics: pure tensor math returning (numerator, denominator) sums; no `torch.distributed` here."""

from nemo_automodel_dspark.loss.chunked import default_chunk_rows, reference_row_ce_l1, row_ce_l1
from nemo_automodel_dspark.loss.head import LogitHead, head_row_ce_l1
from nemo_automodel_dspark.loss.metrics import flatten_sums, metrics_from_sums, unflatten_sums
from nemo_automodel_dspark.loss.objective import DSparkLossOutput, dspark_head_loss, dspark_loss, slot_weights

__all__ = [
    "DSparkLossOutput",
    "LogitHead",
    "default_chunk_rows",
    "dspark_head_loss",
    "dspark_loss",
    "head_row_ce_l1",
    "flatten_sums",
    "metrics_from_sums",
    "reference_row_ce_l1",
    "row_ce_l1",
    "slot_weights",
    "unflatten_sums",
]
