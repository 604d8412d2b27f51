"""Warm-start a draft from a servable one (ours, NeMo AutoModel's, or a folder `dspark export` reads).

The saved draft must be the same draft: its `config.json` has to agree on architecture, shapes, block size, mask
token and target layer ids (the first disagreeing field is named). A saved draft without `embed_tokens` /
`lm_head` (engines that share the target's) keeps the target's copies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

SHARED_WITH_TARGET = ("embed_tokens.weight", "lm_head.weight")


def expected_fields(draft) -> dict:
    """The config.json values a compatible saved draft must have."""
    return {
        "architectures": draft.family.draft_architecture,
        "hidden_size": draft.text_config.hidden_size,
        "vocab_size": draft.text_config.vocab_size,
        "num_hidden_layers": draft.dspark.draft_num_hidden_layers,
        "block_size": draft.dspark.block_size,
        "mask_token_id": draft.dspark.mask_token_id,
        "target_layer_ids": list(draft.dspark.target_layer_ids or []),
    }


def check_compatible(draft, directory: str | os.PathLike) -> None:
    """Raise ValueError naming the first field where the saved draft's config.json disagrees with `draft`."""
    where = f"recipe_args.draft_weights_path {directory}"
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"{where}: no config.json (expected a saved, servable DSpark draft folder)")
    saved = json.loads(path.read_text())
    for key, ours in expected_fields(draft).items():
        theirs = saved.get(key)
        if key == "architectures" and isinstance(theirs, list):
            theirs = theirs[0] if len(theirs) == 1 else theirs
        if theirs != ours:
            raise ValueError(f"{where}: {key} is {theirs!r} in its config.json but {ours!r} in this run's config")


def read_weights(directory: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of the folder's safetensors files (one file, or shards with an index)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"recipe_args.draft_weights_path {directory}: no *.safetensors file")
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def load_warm_start(draft, directory: str | os.PathLike) -> None:
    """Check the saved draft against `draft`, then load its weights into `draft` (before any wrapping)."""
    check_compatible(draft, directory)
    state = read_weights(directory)
    own = draft.state_dict()
    missing = [k for k in own if k not in state and k not in SHARED_WITH_TARGET]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"recipe_args.draft_weights_path {directory}: tensors do not match this draft "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"recipe_args.draft_weights_path {directory}: tensor {key} has shape {list(value.shape)}, "
                f"this draft's has {list(own[key].shape)}"
            )
    draft.load_state_dict(state, strict=False)
