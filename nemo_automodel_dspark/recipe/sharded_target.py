"""Load the frozen target FSDP2-sharded without a full copy per rank (`recipe_args.shard_dense_target`).

Every rank builds the target on the meta device and shards it (per decoder layer, decoder, root); rank 0 alone
reads the weights from disk and each rank receives only its shard. Rank 0's full host copy is dropped on return.
"""

from __future__ import annotations

import torch
from torch import nn

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.model.families import family_for
from nemo_automodel_dspark.target.loading import load_target, target_skeleton


def load_sharded_target(
    path: str, *, dtype: torch.dtype, info: D.DistInfo, trust_remote_code: bool = False
) -> nn.Module:
    """The frozen target sharded over the process group, in `dtype`, on `info.device`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = target_skeleton(config, dtype)
    parts = family_for(config).decoder_parts(model)
    D.shard_frozen_target(model, parts.layers, parts.base_model)
    source = None
    if info.is_main:
        source = load_target(path, dtype=dtype, device=torch.device("cpu"), trust_remote_code=trust_remote_code)
    D.load_from_rank0(model, source, info.device)
    return model
