"""Save and load a draft in the DSpark serving dialect (SPEC §8): config.json + model.safetensors, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nemo_automodel_dspark.io import atomic_path, atomic_write_bytes
from nemo_automodel_dspark.model.config import DSparkConfig

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
_DSPARK_KEYS = (
    "block_size",
    "mask_token_id",
    "target_layer_ids",
    "num_anchors",
    "markov_rank",
    "markov_head_type",
    "confidence_head_with_markov",
)


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
    """Write config.json and model.safetensors (tensor names = module names); weights first, config last."""
    out = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in (state_dict or draft.state_dict()).items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_bytes(out / CONFIG_NAME, json.dumps(serving_config(draft), indent=2).encode())
    return out


def read_serving_config(directory: str | os.PathLike) -> tuple[object, DSparkConfig]:
    """Rebuild (target text config, DSparkConfig) from a saved draft's config.json."""
    from transformers import AutoConfig

    fields = json.loads((Path(directory) / CONFIG_NAME).read_text())
    draft_layers = fields.pop("num_hidden_layers")
    dspark = DSparkConfig(
        draft_num_hidden_layers=draft_layers,
        enable_confidence_head=fields.pop("enable_confidence_head"),
        confidence_temperatures=fields.pop("confidence_temperatures", None),
        **{key: fields.pop(key) for key in _DSPARK_KEYS},
    )
    fields["num_hidden_layers"] = fields.pop("num_target_layers")
    if "layer_types" in fields:
        fields["layer_types"] = ["full_attention"] * fields["num_hidden_layers"]
    fields.pop("target_architectures", None)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields), dspark


def load_draft(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Build a draft from config.json and load model.safetensors strictly."""
    text_config, dspark = read_serving_config(directory)
    draft = cls(text_config, dspark)
    state = load_file(str(Path(directory) / WEIGHTS_NAME), device=str(device))
    draft.load_state_dict(state, strict=True)
    return draft.to(device)
