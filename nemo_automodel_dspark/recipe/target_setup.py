"""The frozen target at setup: its config.json checked against the draft options, the memory plan that decides
replicated or sharded, and the model loaded accordingly. Only `load_frozen_target` reads weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.families import family_for
from nemo_automodel_dspark.options import ConfigError
from nemo_automodel_dspark.recipe.config import DSparkRecipeConfig, RecipeArgs
from nemo_automodel_dspark.recipe.plan import MemoryPlan, device_memory_gib, plan_for_config
from nemo_automodel_dspark.recipe.sharded_target import load_sharded_target
from nemo_automodel_dspark.target.loading import load_target, load_target_config

TARGET_KEY = RecipeArgs.key("target_model_name_or_path")


def check_target(config: DSparkRecipeConfig) -> tuple[Any, DSparkConfig]:
    """Read only the target's config.json: (its HF config, the draft options checked against it, ids resolved)."""
    args = config.recipe_args
    target_config = load_target_config(args.target_model_name_or_path, TARGET_KEY, args.trust_remote_code)
    try:
        family = family_for(target_config)
        text = family.text_config(target_config)
        family.check_supported(text)
    except ValueError as err:
        raise ConfigError(f"'{TARGET_KEY}' {args.target_model_name_or_path}: {str(err).splitlines()[0]}") from err
    return target_config, config.draft.for_target(text.num_hidden_layers, text.vocab_size)


def memory_plan(config: DSparkRecipeConfig, target_config: Any, info: D.DistInfo) -> MemoryPlan:
    """The per-device memory plan of this run on these devices (`recipe_args.memory_budget_gib` or the device's)."""
    device = "cuda" if info.device.type == "cuda" else "cpu"
    budget = config.recipe_args.memory_budget_gib or device_memory_gib(info.device, info.local_world_size)
    return plan_for_config(config, target_config, info.world_size, budget, device)


def sharding_line(plan: MemoryPlan, setting: bool | str, world_size: int) -> str:
    """One start-up line: the `shard_dense_target` setting, what was chosen, and the plan's verdict behind it."""
    setting_text = str(setting).lower()
    chosen = f"sharded over {world_size} ranks" if plan.target_sharded else "replicated"
    if world_size == 1:
        return f"shard_dense_target: {setting_text} -> {chosen} (one process)"
    verdict = "fits" if plan.replicated_gib <= plan.budget_gib else "does not fit"
    return (
        f"shard_dense_target: {setting_text} -> {chosen} (replicated plan {plan.replicated_gib:.4g} GiB {verdict} "
        f"in {plan.budget_gib:.4g} GiB per device)"
    )


def load_frozen_target(args: RecipeArgs, info: D.DistInfo, plan: MemoryPlan, log: Callable[[str], None]) -> nn.Module:
    """The frozen target (bf16 on CUDA, fp32 on CPU), replicated or FSDP2-sharded as `plan` decided."""
    if plan.target_sharded and args.eval_decode is not None:
        raise ValueError(
            "recipe_args.eval_decode decodes on rank 0 alone and needs a replicated target, but the target is "
            "sharded; set recipe_args.shard_dense_target: false (or remove eval_decode)"
        )
    dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    source, remote = args.target_model_name_or_path, args.trust_remote_code
    if plan.target_sharded:
        return load_sharded_target(source, dtype=dtype, info=info, trust_remote_code=remote, log=log)
    return load_target(source, dtype=dtype, device=info.device, trust_remote_code=remote)
