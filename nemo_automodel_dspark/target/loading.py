"""Load a frozen target (and its tokenizer) with transformers; the family registry decides which class.

Replicated: every rank loads the whole target. Sharded (`shard_dense_target`): every rank builds the skeleton on the
meta device, the recipe FSDP2-shards it, rank 0 alone reads the weights and each rank receives only its shard.
"""

from __future__ import annotations

import torch
from torch import nn

from nemo_automodel_dspark.model.families import family_for


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


def load_target(path: str, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    """The target in eval mode with every parameter frozen; unsupported architectures fail before weights load."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    family = family_for(config)
    model = family.model_class(config).from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return _frozen(model).to(device)


def target_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The target's modules on the meta device (no memory), frozen, in `dtype`."""
    cls = family_for(config).model_class(config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # meta parameters are created in the default dtype
    try:
        with torch.device("meta"):
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    finally:
        torch.set_default_dtype(default)
    return _frozen(model)
