"""Loss and metrics: pure tensor math returning (numerator, denominator) sums; no `torch.distributed` here."""

from nemo_automodel_dspark.loss.chunked import default_chunk_rows, reference_row_ce_l1, row_ce_l1
from nemo_automodel_dspark.loss.metrics import flatten_sums, metrics_from_sums, unflatten_sums
from nemo_automodel_dspark.loss.objective import DSparkLossOutput, dspark_loss, slot_weights

__all__ = [
    "DSparkLossOutput",
    "default_chunk_rows",
    "dspark_loss",
    "flatten_sums",
    "metrics_from_sums",
    "reference_row_ce_l1",
    "row_ce_l1",
    "slot_weights",
    "unflatten_sums",
]
