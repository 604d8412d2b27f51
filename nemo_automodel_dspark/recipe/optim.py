"""Optimizer over trainable parameters and the warm-up + cosine schedule (SPEC §6)."""

from __future__ import annotations

import importlib
import math
from typing import cast

import torch
from torch import nn

from nemo_automodel_dspark.recipe.config import OptimizerConfig


def _resolve(target):
    if isinstance(target, str):
        module, _, name = target.rpartition(".")
        return getattr(importlib.import_module(module), name)
    return target


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW (or `optimizer._target_`) over the parameters that require grad only."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.target is not None:
        return _resolve(cfg.target)(params, lr=cfg.lr, **(cfg.extra or {}))
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=cast(tuple[float, float], tuple(cfg.betas)), weight_decay=cfg.weight_decay, eps=cfg.eps
    )


def lr_factor(step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Multiplier of lr for optimizer step `step` (0-based): linear warm-up, then cosine to `min_lr_ratio`."""
    warmup = max(1, round(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
    )
