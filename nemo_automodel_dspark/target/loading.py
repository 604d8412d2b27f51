"""Load a frozen target (and its tokenizer) with transformers; the family registry decides which class.

Replicated: every rank loads the whole target. Sharded (`shard_dense_target`): every rank builds the skeleton on the
meta device, the recipe FSDP2-shards it, rank 0 alone reads the weights and each rank receives only its shard.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager

import torch
from torch import nn

from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.model.families import family_for

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `name` or `org/name`


def check_model_path(path: str, key: str) -> None:
    """A model given as a local path must be a folder with config.json; a path that cannot be a Hub id must exist.

    One line naming `key`, before anything loads (instead of transformers' "Repo id must be in the form ...").
    """
    local = os.path.expanduser(path)
    if os.path.exists(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ToolError(f"{key} {path}: not a model folder (no config.json)")
        return
    if not _HUB_ID.match(path) or path.startswith((".", "~")):
        raise ToolError(f"{key} {path}: no such folder")


def load_target_config(path: str, key: str, trust_remote_code: bool = False):
    """The target's HF config (config.json only, no weights), or one line naming `key` when it cannot be read."""
    from transformers import AutoConfig

    check_model_path(path, key)
    local = os.path.isdir(os.path.expanduser(path))
    try:
        with _hub_retries_unlogged():
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "cannot read its config.json" if local else "not loadable from the Hub"
        hint = "" if local else "; without the Hub, give a local folder (HF_HUB_OFFLINE=1 fails at once)"
        raise ToolError(f"{key} {path}: {where} ({first}){hint}") from err


_HUB_RETRY_LOGGER = "huggingface_hub.utils._http"


def _is_hub_retry(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return " thrown while requesting " in message or message.startswith("Retrying in ")


@contextmanager
def _hub_retries_unlogged():
    """Drop huggingface_hub's per-retry lines while the config is fetched: an unreachable Hub is tried 6 times over
    about 30 s, logging 11 lines, before the one-line error above says it once. Other records of that logger show."""
    logger = logging.getLogger(_HUB_RETRY_LOGGER)

    def keep(record: logging.LogRecord) -> bool:
        return not _is_hub_retry(record)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


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
    """The target's modules on the meta device (no memory), frozen, with the dtypes `from_pretrained(dtype=)` gives."""
    cls = family_for(config).model_class(config)
    with torch.device("meta"):  # Auto classes build with from_config, concrete ones with _from_config
        build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
        model = build(config, dtype=dtype)
    return _frozen(model)
