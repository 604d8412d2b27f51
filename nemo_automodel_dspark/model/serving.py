"""Save and load a draft in the DSpark serving dialect (SPEC §8): config.json + model.safetensors, atomic writes.

Reading also accepts what NeMo AutoModel's DSpark recipe writes: sharded `model-0000k-of-0000N.safetensors` files
listed in `model.safetensors.index.json`, and a config without the keys of a head that is off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.io import atomic_path, atomic_write_bytes, remove_leftover_temps
from nemo_automodel_dspark.model.config import DSparkConfig

CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME = "config.json", "model.safetensors", "model.safetensors.index.json"
_DSPARK_KEYS = (
    "block_size",
    "mask_token_id",
    "target_layer_ids",
    "num_anchors",
    "markov_rank",
    "markov_head_type",
    "confidence_head_with_markov",
)
# NeMo AutoModel's `build_draft_config` writes `markov_head_type` only when markov_rank > 0 and
# `confidence_head_with_markov` only when the confidence head is on; these are the values its draft then uses.
_NEMO_OMITTED_DEFAULTS = {"markov_head_type": "vanilla", "confidence_head_with_markov": False}
_REQUIRED_KEYS = (*_DSPARK_KEYS, "enable_confidence_head", "num_hidden_layers", "num_target_layers", "model_type")


class DraftFormatError(ToolError):
    """A saved draft folder this reader cannot use; the message names the file and the key (one line in the CLI)."""


def serving_config(draft) -> dict:
    """The target's text-config fields with the draft's depth and the top-level DSpark keys."""
    config = draft.text_config.to_dict()
    for key in ("auto_map", "text_config", "vision_config", "audio_config"):
        config.pop(key, None)
    dspark: DSparkConfig = draft.dspark
    config.update({key: getattr(dspark, key) for key in _DSPARK_KEYS})
    config.update(
        architectures=[draft.family.draft_architecture],
        num_hidden_layers=dspark.draft_num_hidden_layers,
        num_target_layers=draft.num_target_layers,
        enable_confidence_head=dspark.enable_confidence_head,
        tie_word_embeddings=False,
        target_architectures=list(getattr(draft.target_config, "architectures", None) or []),
    )
    if "layer_types" in config:  # HF checks len(layer_types) == num_hidden_layers; draft layers are all full attention
        config["layer_types"] = ["full_attention"] * dspark.draft_num_hidden_layers
    if dspark.confidence_temperatures is not None:
        config["confidence_temperatures"] = list(dspark.confidence_temperatures)
    return config


def save_draft(draft, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json and model.safetensors (tensor names = module names); weights first, config last.

    The temps of an earlier save into `directory` that was killed are removed first (`io.leftover_temps`).
    """
    out = Path(directory)
    remove_leftover_temps(out, (WEIGHTS_NAME, CONFIG_NAME))
    tensors = {k: v.detach().cpu().contiguous() for k, v in (state_dict or draft.state_dict()).items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_bytes(out / CONFIG_NAME, json.dumps(serving_config(draft), indent=2).encode())
    return out


def read_config_fields(directory: str | os.PathLike) -> dict:
    """A saved draft's config.json (ours or NeMo AutoModel's), every DSpark key present (NeMo's omissions filled)."""
    path = Path(directory) / CONFIG_NAME
    fields = json.loads(path.read_text())
    for key, default in _NEMO_OMITTED_DEFAULTS.items():
        fields.setdefault(key, default)
    missing = [key for key in _REQUIRED_KEYS if key not in fields]
    if missing:
        raise DraftFormatError(f"{path}: missing DSpark key(s) {', '.join(missing)}; is this a DSpark draft?")
    return fields


def read_serving_config(directory: str | os.PathLike) -> tuple[object, DSparkConfig]:
    """Rebuild (target text config, DSparkConfig) from a saved draft's config.json (ours or NeMo AutoModel's)."""
    from transformers import AutoConfig

    path = Path(directory) / CONFIG_NAME
    fields = read_config_fields(directory)
    try:
        dspark = DSparkConfig(
            draft_num_hidden_layers=fields.pop("num_hidden_layers"),
            enable_confidence_head=fields.pop("enable_confidence_head"),
            confidence_temperatures=fields.pop("confidence_temperatures", None),
            **{key: fields.pop(key) for key in _DSPARK_KEYS},
        )
    except ValueError as err:
        raise DraftFormatError(f"{path}: {err}") from err
    fields["num_hidden_layers"] = fields.pop("num_target_layers")
    if "layer_types" in fields:
        fields["layer_types"] = ["full_attention"] * fields["num_hidden_layers"]
    fields.pop("target_architectures", None)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields), dspark


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a saved draft: `model.safetensors`, or the shards its index lists (all present)."""
    folder = Path(directory)
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / INDEX_NAME
    if not index.is_file():
        raise DraftFormatError(f"{folder}: no weights (neither {WEIGHTS_NAME} nor {INDEX_NAME})")
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DraftFormatError(f"{index}: no 'weight_map' naming the shard of each tensor")
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise DraftFormatError(f"{index}: shard {shard} is listed in 'weight_map' but missing")
    return [folder / shard for shard in sorted(set(weight_map.values()))]


def read_weights(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a saved draft, from a single file or every shard."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        tensors.update(load_file(str(path), device=str(device)))
    return tensors


def load_draft(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Build a draft from config.json and load its weights (single file or sharded) strictly."""
    text_config, dspark = read_serving_config(directory)
    draft = cls(text_config, dspark)
    state = read_weights(directory, device)
    expected = draft.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    for what, names in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)):
        if names:
            raise DraftFormatError(f"{directory}: {what} tensor(s) for its config.json: {', '.join(names[:3])}")
    draft.load_state_dict(state, strict=True)
    return draft.to(device)
