"""Warm-start a draft from a servable one (ours, NeMo AutoModel's, or a folder `dspark export` reads).

The saved draft must be the same draft: its `config.json` has to agree on architecture, shapes, block size, mask
token and target layer ids (the first disagreeing field is named). A saved draft without `embed_tokens` /
`lm_head` (engines that share the target's) keeps the target's copies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

import nemo_automodel_dspark.distributed as D
from nemo_automodel_dspark.model.serving import DraftFormatError, weight_files

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


def _saved_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Every tensor name in the folder's safetensors files and its shape, from the headers (no tensor is read)."""
    shapes: dict[str, list[int]] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            shapes.update({key: list(f.get_slice(key).get_shape()) for key in names})
    return shapes


def load_warm_start(draft, directory: str | os.PathLike) -> None:
    """Check the saved draft against `draft`, then copy its weights in, one tensor at a time.

    `draft` may be plain or already sharded (FSDP2 over a meta-built draft): each rank keeps its slice of every
    tensor, so no rank holds more than its shards plus one saved tensor.
    """
    check_compatible(draft, directory)
    where = f"recipe_args.draft_weights_path {directory}"
    try:
        files = weight_files(directory)  # model.safetensors, or the shards its index names: what serving reads
    except DraftFormatError as err:
        raise ValueError(f"{where}: {err}") from err
    saved = _saved_shapes(files)
    own = draft.state_dict()  # the parameters themselves (DTensors when sharded); global shapes
    missing = [k for k in own if k not in saved and k not in SHARED_WITH_TARGET]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"{where}: tensors do not match this draft (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, shape in saved.items():
        if shape != list(own[key].shape):
            raise ValueError(f"{where}: tensor {key} has shape {shape}, this draft's has {list(own[key].shape)}")
    for file in files:
        with safe_open(str(file), "pt") as f:
            names = f.keys()
            for key in names:
                D.copy_full_into(own[key], f.get_tensor(key))
