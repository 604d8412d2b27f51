"""What a resumed run may change, and what it may not (SPEC §8).

Model-shape fields (and the data contract: block size, mask id, layer ids, target) must match the checkpoint: a
change is one line naming the field. Optimizer options (`lr`, `betas`, `weight_decay`, `eps`, `warmup_ratio`,
`min_lr_ratio`, extra `_target_` kwargs) may change: the new values take effect from the resumed step, and the run
says so, one line per field. The optimizer class itself may not change (its state would not fit). Any other
`recipe_args` option (data, batch layout, anchors, loss weights, cadences) may change too and is announced the
same way (`training_record` is saved in every checkpoint), so a resumed run never differs silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch

from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.options import spec_of
from nemo_automodel_dspark.recipe.config import DSparkRecipeConfig, OptimizerConfig

# field → the config key a user changes to change it
SHAPE_FIELDS = {
    "block_size": "recipe_args.block_size",
    "mask_token_id": "recipe_args.mask_token_id",
    "target_layer_ids": "recipe_args.target_layer_ids",
    "target_model_name_or_path": "recipe_args.target_model_name_or_path",
    "draft_num_hidden_layers": "recipe_args.draft_num_hidden_layers",
    "markov_rank": "recipe_args.markov_rank",
    "markov_head_type": "recipe_args.markov_head_type",
    "enable_confidence_head": "recipe_args.confidence_head_alpha (0 = no confidence head)",
    "confidence_head_with_markov": "recipe_args.confidence_head_with_markov",
    "freeze_embeddings": "recipe_args.freeze_embeddings",
}
_PARAM_GROUP_KEYS = ("betas", "weight_decay", "eps")


def compat_record(config: DSparkRecipeConfig, draft: DSparkConfig) -> dict:
    """This run's SHAPE_FIELDS (draft resolved against the target), as a checkpoint records them."""
    record = {field: getattr(draft, field) for field in SHAPE_FIELDS if field != "target_model_name_or_path"}
    record["target_layer_ids"] = list(draft.target_layer_ids or [])
    record["target_model_name_or_path"] = config.recipe_args.target_model_name_or_path
    return record


class IncompatibleCheckpoint(ToolError, ValueError):
    """A resume whose configuration does not fit the checkpoint; the message names the field."""


def check_compatible(path: Path, saved: dict, current: dict) -> None:
    """Refuse a checkpoint whose model-shape fields differ from the config (fields it did not record are skipped)."""
    for field, key in SHAPE_FIELDS.items():
        if field in saved and saved[field] != current.get(field):
            raise IncompatibleCheckpoint(
                f"checkpoint {path} was trained with {field}={saved[field]!r} but the config has "
                f"{field}={current.get(field)!r} ({key}); resume with the same value or start a new run in a new "
                "output_dir"
            )


def optimizer_record(cfg: OptimizerConfig) -> dict:
    """The optimizer options as saved in a checkpoint (JSON-friendly)."""
    record = asdict(cfg)
    record["target"] = None if cfg.target is None else str(getattr(cfg.target, "__name__", cfg.target))
    return json.loads(json.dumps(record, default=str))  # tuples as lists, odd `_target_` kwargs as text


def apply_optimizer_changes(
    saved: dict | None, cfg: OptimizerConfig, optimizer: torch.optim.Optimizer, scheduler, log: Callable[[str], None]
) -> list[str]:
    """After loading optimizer and scheduler state: make changed options take effect and say so; returns the keys."""
    if saved is None:  # a checkpoint from before optimizer options were recorded
        return []
    current = optimizer_record(cfg)
    if saved.get("target") != current["target"]:
        raise IncompatibleCheckpoint(
            f"the checkpoint's optimizer is {saved.get('target') or 'AdamW'} but the config asks for "
            f"{current['target'] or 'AdamW'} (optimizer._target_); its state would not fit, start a new run"
        )
    changed = [k for k in current if k != "target" and saved.get(k) != current[k]]
    if not changed:
        return []
    for group in optimizer.param_groups:
        for key in _PARAM_GROUP_KEYS:
            if key in changed and key in group:
                group[key] = tuple(current[key]) if key == "betas" else current[key]
        for key, value in (cfg.extra or {}).items():
            if key in group:
                group[key] = value
        group["initial_lr"] = cfg.lr
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:  # the resumed step's lr under the new options
        group["lr"] = cfg.lr * factor
    step = scheduler.last_epoch + 1
    for key in changed:
        log(f"resume: optimizer.{key} changed from {saved.get(key)!r} to {current[key]!r}, in effect from step {step}")
    return changed


def training_record(config: DSparkRecipeConfig) -> dict:
    """Every `recipe_args` option (run, draft and loss) as `recipe_args.key → value`, JSON-friendly."""
    record = {}
    for options in (config.recipe_args, config.draft, config.loss):
        for f in fields(options):
            if spec_of(f).from_yaml:
                record[options.key(f.name)] = getattr(options, f.name)
    return json.loads(json.dumps(record, default=str))


def announce_changes(saved: dict | None, current: dict, step: int, log: Callable[[str], None]) -> list[str]:
    """One line per option whose value differs from the checkpoint's (shape fields were refused before); returns
    the keys. A checkpoint from before options were recorded announces nothing."""
    if saved is None:
        return []
    changed = [key for key in current if key in saved and saved[key] != current[key]]
    for key in changed:
        log(f"resume: {key} changed from {saved[key]!r} to {current[key]!r}, in effect from step {step}")
    return changed
