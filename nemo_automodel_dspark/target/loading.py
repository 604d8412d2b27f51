"""Load a frozen target (and its tokenizer) with transformers; the family registry decides which class."""

from __future__ import annotations

import torch

from nemo_automodel_dspark.model.families import family_for


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_target(path: str, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    """The target in eval mode with every parameter frozen; unsupported architectures fail before weights load."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    family = family_for(config)
    model = family.model_class(config).from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.requires_grad_(False)
    return model.eval().to(device)
