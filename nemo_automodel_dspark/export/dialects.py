"""`dspark export`: rewrite a saved draft into the checkpoint dialect one engine loads, or refuse in one line.

Each writer takes our config fields and tensors and returns the engine's (config, tensors). The dialects, in our
words, from the engine files named (revisions in docs SERVING_FACTS.md):

- nemo, vllm: what training writes (DSpark keys at the top level, tensors named as our modules). NeMo AutoModel's
  `speculative/dspark/draft_qwen3.py`; vLLM's `model_executor/models/qwen3_dspark.py` prefixes `model.` and fuses
  q/k/v and gate/up itself. vLLM ignores `block_size`: serve with `num_speculative_tokens` equal to it.
- specforge, sglang (SGLang serves SpecForge-trained drafts): SpecForge's `modeling/draft/dspark.py`
  (`DSparkDraftModel`, a6b6b02): the DSpark keys nested in `dflash_config` with `projector_type: "dspark"`,
  `attention_mode` `gqa` (fewer KV heads than query heads) or `mha` (equal), `shift_label: true` (slot k predicts
  the token after it, as ours); `block_size` and `num_target_layers` stay at the top level (`modeling/draft/
  dflash.py` reads them there); no `embed_tokens` / `lm_head` (it uses the target's).
- speculators: `models/dspark/config.py` and `models/dflash/config.py` (c05b95b; `speculators_model_type:
  dspark`): the layer config nested as `transformer_layer_config`, `aux_hidden_state_layer_ids` = our ids + 1,
  `sample_from_anchor: true`, a `speculators_config` (algorithm, greedy proposal of `block_size` tokens,
  verifier architectures; `config.py`), tensors named as ours.
- modelopt: Model-Optimizer's `torch/export/plugins/hf_spec_export.py` (a2fbac7; `DFlashExporter` /
  `DSparkExporter`): `DFlashDraftModel` with `block_size` and `num_target_layers` at the top level and
  `mask_token_id`, `target_layer_ids`, `projector_type`, `shift_label`, `markov_rank`, `markov_head_type`,
  `use_confidence_head` under `dflash_config`; `markov_head.X` → `X`, `confidence_head.proj` → `confidence_proj`;
  no `embed_tokens` / `lm_head`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.export.engines import DraftOptions, findings

if TYPE_CHECKING:  # torch stays out of `dspark export --help`
    from torch import Tensor

FORMATS = ("nemo", "vllm", "sglang", "specforge", "speculators", "modelopt")
SHARED_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # the frozen copies of the target's
# DSpark keys as training writes them (top level); the nested dialects carry these under their own key names.
DSPARK_KEYS = (
    "block_size",
    "mask_token_id",
    "target_layer_ids",
    "num_target_layers",
    "num_anchors",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
)

# speculators' DSparkSpeculatorConfig fields named as ours (it has no num_anchors; ids and depth are written apart)
SPECULATORS_KEYS = (
    "block_size",
    "mask_token_id",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
)

Writer = Callable[[dict, "dict[str, Tensor]"], "tuple[dict, dict[str, Tensor]]"]


class ExportRefused(ToolError):
    """The checkpoint holds something the chosen dialect cannot express (one line: key, engine, fix)."""


def draft_options(config: dict) -> DraftOptions:
    """The engine rules' view of a saved draft's config fields."""
    from types import SimpleNamespace

    from nemo_automodel_dspark.model.families import family_for

    # family_for reads `.architectures`; a saved draft's own architecture (Qwen3DSparkModel, ...) names its family
    family = family_for(SimpleNamespace(architectures=config.get("architectures"))).name
    return DraftOptions(
        markov_rank=int(config["markov_rank"]),
        markov_head_type=str(config["markov_head_type"]),
        enable_confidence_head=bool(config["enable_confidence_head"]),
        confidence_head_with_markov=bool(config["confidence_head_with_markov"]),
        target_layer_ids=[int(i) for i in config["target_layer_ids"]],
        num_target_layers=int(config["num_target_layers"]),
        family=family,
    )


def _as_is(config: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    return dict(config), dict(tensors)


def _layer_fields(config: dict) -> dict:
    """The draft's own layer config: the target's text fields at the draft's depth, without the DSpark keys."""
    skip = {*DSPARK_KEYS, "confidence_temperatures", "target_architectures", "architectures"}
    return {k: v for k, v in config.items() if k not in skip}


def _without_shared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in tensors.items() if k not in SHARED_TENSORS}


def _specforge(config: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    nested = {
        "projector_type": "dspark",
        "attention_mode": "gqa" if kv_heads < heads else "mha",
        "shift_label": True,
        **{key: config[key] for key in DSPARK_KEYS},
    }
    out = {
        **_layer_fields(config),
        "block_size": config["block_size"],
        "num_target_layers": config["num_target_layers"],
        "architectures": ["DSparkDraftModel"],
        "dflash_config": nested,
    }
    return out, _without_shared(tensors)


def _speculators(config: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    block = config["block_size"]
    out = {
        "speculators_model_type": "dspark",
        "architectures": ["DSparkSpeculator"],
        "transformer_layer_config": _layer_fields(config),
        "draft_vocab_size": config["vocab_size"],
        "target_hidden_size": config["hidden_size"],
        "aux_hidden_state_layer_ids": [int(i) + 1 for i in config["target_layer_ids"]],  # speculators counts from 1
        "sample_from_anchor": True,  # slot 0 already predicts the token after the anchor: K = block_size proposals
        **{key: config[key] for key in SPECULATORS_KEYS},
        "speculators_config": {
            "algorithm": "dspark",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": block}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": None, "architectures": config.get("target_architectures", [])},
        },
    }
    return out, dict(tensors)


def _modelopt_name(name: str) -> str:
    if name.startswith("markov_head."):
        return name.removeprefix("markov_head.")
    return name.replace("confidence_head.proj.", "confidence_proj.")


def _modelopt(config: dict, tensors: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    nested = {
        "mask_token_id": config["mask_token_id"],
        "target_layer_ids": config["target_layer_ids"],
        "projector_type": "dspark",
        "shift_label": True,  # slot k predicts the token after it, as ours
        "markov_rank": config["markov_rank"],
        "markov_head_type": config["markov_head_type"],
        "use_confidence_head": config["enable_confidence_head"],  # always with the Markov embedding there
    }
    out = {
        **_layer_fields(config),
        "architectures": ["DFlashDraftModel"],
        "block_size": config["block_size"],
        "num_target_layers": config["num_target_layers"],
        "dflash_config": nested,
    }
    return out, {_modelopt_name(k): v for k, v in _without_shared(tensors).items()}


WRITERS: dict[str, Writer] = {
    "nemo": _as_is,
    "vllm": _as_is,
    "sglang": _specforge,
    "specforge": _specforge,
    "speculators": _speculators,
    "modelopt": _modelopt,
}


def check_expressible(config: dict, fmt: str) -> None:
    """ExportRefused (the first broken rule) when `fmt`'s engine cannot serve this draft; `nemo` takes everything."""
    if fmt == "nemo":
        return
    found = findings(draft_options(config), [fmt])
    if found:
        f = found[0]
        raise ExportRefused(f"--format {fmt}: {f.engine} cannot serve this draft ({f.key}): {f.problem}; {f.fix}")


def export_draft(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike) -> Path:
    """Write `checkpoint` (ours or NeMo AutoModel's, single file or sharded) to `out` in dialect `fmt`."""
    from safetensors.torch import save_file

    from nemo_automodel_dspark.io import atomic_path, atomic_write_bytes, remove_leftover_temps
    from nemo_automodel_dspark.model.serving import CONFIG_NAME, WEIGHTS_NAME, read_config_fields, read_weights

    if fmt not in WRITERS:
        raise ExportRefused(f"--format {fmt}: unknown; choose from {', '.join(FORMATS)}")
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise ExportRefused(f"--out {out}: the checkpoint itself; write the export to another folder")
    config = read_config_fields(checkpoint)
    check_expressible(config, fmt)
    new_config, tensors = WRITERS[fmt](config, read_weights(checkpoint))
    target = Path(out)
    remove_leftover_temps(target, (WEIGHTS_NAME, CONFIG_NAME))  # an earlier export into `out` that was killed
    with atomic_path(target / WEIGHTS_NAME) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    atomic_write_bytes(target / CONFIG_NAME, json.dumps(new_config, indent=2).encode())
    return target
