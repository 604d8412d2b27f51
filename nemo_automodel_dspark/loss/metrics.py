"""Acceptance and calibration diagnostics as summable statistics (SPEC §4), and the metrics derived from them.

Every statistic is a detached fp32 sum, so micro-batches and data-parallel ranks combine by addition
(`flatten_sums` → one all-reduce → `unflatten_sums`) and each ratio is divided once, at logging time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nemo_automodel_dspark.loss.config import LossConfig


def acceptance_sums(
    acc: Tensor,  # [B, N, K] fp32 expected acceptance per slot (detached)
    eval_mask: Tensor,  # [B, N, K] bool
) -> dict[str, Tensor]:
    """Per-slot acceptance sums and the expected accepted length `tau` summed over kept blocks."""
    m = eval_mask.float()
    acc_m = torch.where(eval_mask, acc, 0.0)
    kept = eval_mask[..., 0]  # [B, N] a block is kept iff its first slot is supervised
    # tau_block = 1 (bonus token) + Σ_k Π_{j≤k} acc_j·m_j: the expected number of tokens per verify step.
    tau = torch.where(kept, 1.0 + acc_m.cumprod(dim=-1).sum(dim=-1), 0.0)
    return {
        "accept": acc_m.sum(dim=(0, 1)),
        "accept_count": m.sum(dim=(0, 1)),
        "tau": tau.sum(),
        "blocks": kept.float().sum(),
    }


def calibration_sums(
    confidence: Tensor,  # [B, N, K] fp32 c = sigmoid(confidence_logit), finite everywhere
    acc: Tensor,  # [B, N, K] fp32 (detached)
    eval_mask: Tensor,  # [B, N, K] bool, a contiguous prefix per block
) -> dict[str, Tensor]:
    """Calibration of the confidence head: per slot (c vs acc) and as prefix survival (Π c vs Π acc)."""
    prefix_c = torch.where(eval_mask, confidence, 1.0).cumprod(dim=-1)
    prefix_acc = torch.where(eval_mask, acc, 1.0).cumprod(dim=-1)
    err = torch.where(eval_mask, confidence - acc, 0.0)
    prefix_err = torch.where(eval_mask, prefix_c - prefix_acc, 0.0)
    return {
        "conf_abs_err": err.abs().sum(),
        "conf_bias": err.sum(),
        "prefix_conf_abs_err": prefix_err.abs().sum(),
        "prefix_conf_bias": prefix_err.sum(),
    }


def flatten_sums(sums: dict[str, Tensor]) -> Tensor:
    """All sums as one fp32 vector (keys in sorted order) for a single all-reduce."""
    return torch.cat([sums[key].detach().float().reshape(-1) for key in sorted(sums)])


def unflatten_sums(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `flatten_sums`: split `flat` back into the keys and shapes of `like`."""
    out, offset = {}, 0
    for key in sorted(like):
        numel = like[key].numel()
        out[key] = flat[offset : offset + numel].view(like[key].shape)
        offset += numel
    if offset != flat.numel():
        raise ValueError(f"flat sums have {flat.numel()} elements, expected {offset}")
    return out


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def metrics_from_sums(sums: dict[str, Tensor], config: LossConfig) -> dict[str, float]:
    """Logged metrics from (reduced) sums; a metric whose denominator is 0 is omitted, never logged as 0.

    `loss` is exactly `α_ce·ce_loss + α_l1·l1_loss + α_conf·confidence_loss` of the logged terms;
    `confidence_loss` is logged only when the confidence head is trained (α_conf > 0 and its sums exist).
    """
    host = unflatten_sums(flatten_sums(sums).double().cpu(), sums)  # one device→host transfer
    s = {key: float(value) for key, value in host.items() if value.dim() == 0}
    accept, accept_count = host["accept"].tolist(), host["accept_count"].tolist()
    metrics: dict[str, float | None] = {}
    weight = s["weight"]
    if weight > 0:
        ce_loss, l1_loss, conf_loss = s["ce"] / weight, s["l1"] / weight, 0.0
        metrics.update(ce_loss=ce_loss, l1_loss=l1_loss)
        if config.confidence_head_alpha > 0 and "conf_abs_err" in s:
            conf_loss = metrics["confidence_loss"] = s["confidence"] / weight
        metrics["loss"] = (
            config.ce_loss_alpha * ce_loss + config.l1_loss_alpha * l1_loss + config.confidence_head_alpha * conf_loss
        )
    count = sum(accept_count)
    metrics["accept_rate"] = _ratio(sum(accept), count)
    for k, (accepted, slots) in enumerate(zip(accept, accept_count, strict=True)):
        metrics[f"accept_rate@{k}"] = _ratio(accepted, slots)
    metrics["tau"] = _ratio(s["tau"], s["blocks"])
    if "conf_abs_err" in s:
        metrics["confidence_abs_error"] = _ratio(s["conf_abs_err"], count)
        metrics["confidence_bias"] = _ratio(s["conf_bias"], count)
        metrics["prefix_confidence_abs_error"] = _ratio(s["prefix_conf_abs_err"], count)
        metrics["prefix_confidence_bias"] = _ratio(s["prefix_conf_bias"], count)
    return {key: value for key, value in metrics.items() if value is not None}
