"""Build the trainable draft and wrap it for data parallelism, without a full fp32 draft per rank under FSDP2.

With `strategy: fsdp2` over several ranks the draft is built on the meta device, wrapped (activation
checkpointing, `fully_shard`), and only then allocated: each rank draws the eager initialisation one tensor at a
time and keeps its slice (`model.meta_init`), then takes its slice of a warm start. DDP and a single process keep
a whole draft per rank anyway, so they build it eagerly. Both give the same weights for the same seed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.drafter import DSparkDrafter
from nemo_automodel_dspark.model.meta_init import materialize_draft, meta_draft
from nemo_automodel_dspark.model.warm_start import load_warm_start


def builds_on_meta(strategy: str, info: D.DistInfo) -> bool:
    """FSDP2 over more than one rank: the only case where a rank keeps less than the whole draft."""
    return strategy == "fsdp2" and info.world_size > 1


def build_draft(
    target_config,
    dspark: DSparkConfig,
    embed: Tensor,
    lm_head: Tensor,
    *,
    info: D.DistInfo,
    strategy: str,
    activation_checkpointing: bool = False,
    seed: int = 0,
    warm_start: str | None = None,
) -> tuple[DSparkDrafter, nn.Module]:
    """(the draft, the module to train): a fresh draft from `seed` with the target's `embed` / `lm_head` [V, H],
    then the weights of `warm_start` (a saved draft folder) when given; on `info.device`, wrapped for `strategy`."""
    torch.manual_seed(seed)  # identical initial draft on every rank and every world size
    if builds_on_meta(strategy, info):
        draft = meta_draft(target_config, dspark)
        model = D.wrap_draft(draft, strategy, info, activation_checkpointing)
        materialize_draft(draft, info.device, embed, lm_head)
    else:
        draft = DSparkDrafter.from_embeddings(target_config, dspark, embed, lm_head)
        model = None
    if warm_start:
        load_warm_start(draft, warm_start)
    if model is None:
        draft = draft.to(info.device)
        model = D.wrap_draft(draft, strategy, info, activation_checkpointing)
    return draft, model
