"""The DSpark training objective (SPEC §4): weighted CE + L1 to the teacher + confidence BCE, as sums.

Each term is returned both as this call's weight-normalised mean and as a `(numerator, denominator)` pair.
The recipe backpropagates `numerator / global_denominator`, with the denominator summed over every
micro-batch and rank of the optimizer step, so accumulation and data parallelism give the big-batch gradient.
Masked slots are removed with `torch.where` (never multiplied by 0): their logits may be garbage, inf or NaN.
No host synchronisation happens here; this runs every micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from nemo_automodel_dspark.loss.chunked import row_ce_l1
from nemo_automodel_dspark.loss.config import LossConfig
from nemo_automodel_dspark.loss.head import LogitHead, head_row_ce_l1
from nemo_automodel_dspark.loss.metrics import acceptance_sums, calibration_sums


@dataclass
class DSparkLossOutput:
    """Loss terms of one call; `loss = α_ce·ce_loss + α_l1·l1_loss + α_conf·confidence_loss`."""

    loss: Tensor  # [] differentiable, normalised by this call's Σw
    ce_loss: Tensor  # [] Σw·ce / Σw
    l1_loss: Tensor  # [] Σw·l1 / Σw
    confidence_loss: Tensor  # [] Σw·conf / Σw (0 without a trained confidence head)
    numerator: Tensor  # [] differentiable α_ce·Σw·ce + α_l1·Σw·l1 + α_conf·Σw·conf
    denominator: Tensor  # [] Σw, detached
    sums: dict[str, Tensor] = field(default_factory=dict)  # detached fp32 sums, reducible by addition


def slot_weights(eval_mask: Tensor, loss_decay_gamma: float | None) -> Tensor:
    """`w = eval_mask · exp(−k/γ)` (0-based slot k) as fp32 `[B, N, K]`; γ ≤ 0 or None disables the decay."""
    block_size = eval_mask.shape[-1]
    if loss_decay_gamma is None or loss_decay_gamma <= 0:
        decay = torch.ones(block_size, device=eval_mask.device)
    else:
        decay = torch.exp(-torch.arange(block_size, device=eval_mask.device, dtype=torch.float32) / loss_decay_gamma)
    return torch.where(eval_mask, decay, 0.0)


def _confidence_bce(
    confidence_logits: Tensor,  # [B, N, K]
    acc: Tensor,  # [B, N, K] fp32, detached label
    eval_mask: Tensor,  # [B, N, K] bool
) -> tuple[Tensor, Tensor]:
    """Per-slot `BCEWithLogits(c, acc)` (fp32) and the finite logits it used (masked slots read as 0)."""
    logits = torch.where(eval_mask, confidence_logits.float(), 0.0)
    return F.binary_cross_entropy_with_logits(logits, acc, reduction="none"), logits


def dspark_loss(
    draft_logits: Tensor,  # [B, N, K, V] any float dtype; requires grad
    target_logits: Tensor,  # [B, N, K, V] teacher logits (treated as detached)
    target_ids: Tensor,  # [B, N, K] long, the data token each slot predicts
    eval_mask: Tensor,  # [B, N, K] bool, supervised slots (a contiguous prefix per block)
    confidence_logits: Tensor | None,  # [B, N, K] or None
    config: LossConfig,
    *,
    chunk_rows: int | None = None,
) -> DSparkLossOutput:
    """The objective from materialised logits. Masked slots contribute to nothing; all math is fp32;
    `chunk_rows=0` runs the unchunked reference."""
    *lead, vocab = draft_logits.shape
    mask = eval_mask.bool()
    ce, l1 = row_ce_l1(
        draft_logits.reshape(-1, vocab),
        target_logits.detach().reshape(-1, vocab),
        target_ids.reshape(-1),
        mask.reshape(-1),
        chunk_rows=chunk_rows,
    )
    return _objective(ce.view(lead), l1.view(lead), mask, confidence_logits, config)


def dspark_head_loss(
    head: LogitHead,
    hidden: Tensor,  # [B, N, K, H] draft hidden after the final norm; requires grad
    markov_features: Tensor | None,  # [B, N, K, r] Markov features m (bias = m·W2ᵀ), or None
    teacher_hidden: Tensor,  # [B, N, K, H] target final hidden at each slot's teacher position (detached)
    target_ids: Tensor,  # [B, N, K] long, the data token each slot predicts
    eval_mask: Tensor,  # [B, N, K] bool, supervised slots (a contiguous prefix per block)
    confidence_logits: Tensor | None,  # [B, N, K] or None
    config: LossConfig,
    *,
    chunk_rows: int | None = None,
) -> DSparkLossOutput:
    """`dspark_loss` of the head's logits without materialising them: the LM head, the Markov bias and the teacher
    projection run chunk by chunk inside the objective (`head_row_ce_l1`); `chunk_rows=0` materialises them and
    runs the unchunked reference formula."""
    *lead, width = hidden.shape
    mask = eval_mask.bool()
    ce, l1 = head_row_ce_l1(
        head,
        hidden.reshape(-1, width),
        None if markov_features is None else markov_features.reshape(-1, markov_features.shape[-1]),
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        target_ids.reshape(-1),
        mask.reshape(-1),
        chunk_rows=chunk_rows,
    )
    return _objective(ce.view(lead), l1.view(lead), mask, confidence_logits, config)


def _objective(
    ce: Tensor,  # [B, N, K] fp32, zero on masked slots
    l1: Tensor,  # [B, N, K] fp32, zero on masked slots
    mask: Tensor,  # [B, N, K] bool
    confidence_logits: Tensor | None,  # [B, N, K] or None
    config: LossConfig,
) -> DSparkLossOutput:
    """Weighted sums, means, and diagnostics from per-slot ce/l1 (the part shared by both entry points)."""
    acc = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)  # Σ_v min(p_d, p_t): expected acceptance at T = 1
    w = slot_weights(mask, config.loss_decay_gamma)
    terms = {"ce": ce, "l1": l1}
    used = {"ce": config.ce_loss_alpha, "l1": config.l1_loss_alpha}
    sums = acceptance_sums(acc, mask)
    if confidence_logits is not None:
        conf, used_logits = _confidence_bce(confidence_logits, acc, mask)
        sums.update(calibration_sums(torch.sigmoid(used_logits.detach()), acc, mask))
        if config.confidence_head_alpha != 0:
            terms["confidence"] = conf
            used["confidence"] = config.confidence_head_alpha
    weighted = {name: torch.where(mask, w * term, 0.0).sum() for name, term in terms.items()}
    denominator = w.sum()
    safe_denominator = torch.where(denominator > 0, denominator, 1.0)  # Σw = 0 → every mean is 0, not NaN
    means = {name: total / safe_denominator for name, total in weighted.items()}
    zero = denominator.new_zeros(())
    means.setdefault("confidence", zero)
    weighted.setdefault("confidence", zero)
    sums.update({name: total.detach() for name, total in weighted.items()})
    sums["weight"] = denominator.detach()
    return DSparkLossOutput(
        loss=sum((used[name] * means[name] for name in used), start=zero),
        ce_loss=means["ce"],
        l1_loss=means["l1"],
        confidence_loss=means["confidence"],
        numerator=sum((used[name] * weighted[name] for name in used), start=zero),
        denominator=denominator.detach(),
        sums=sums,
    )
