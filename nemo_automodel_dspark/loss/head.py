"""The draft's output projection inside the chunked objective, so that no `[R, V]` logits exist in forward or backward.

Draft logits are `Z = cap(h·Wᵀ) + m·W2ᵀ` (the LM head, the family's final softcap `cap(u) = c·tanh(u/c)`, then the
Markov bias of paper eq. 5–6 from the Markov features `m`); teacher logits are `cap(t·Wᵀ)` from the target's final
hidden `t` through the same frozen head. `head_row_ce_l1` builds both for one chunk of rows at a time, reduces the
chunk to `ce` and `l1` (the formulas of `chunked.py`) and keeps only its inputs for backward, where it rebuilds the
chunk and maps the chunk's logit gradient `dZ` straight back onto the inputs:

    dm = dZ·W2,  dW2 += dZᵀ·m,  dU = dZ ⊙ (1 − tanh²(u/c)),  dh = dU·W,  dW += dUᵀ·h

so the largest temporaries are a few `[chunk_rows, V]` tensors. The matmuls run in the dtype autocast would give
them (else the LM head's dtype), as the unfused `nn.Linear` calls do; the softmax math is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nemo_automodel_dspark.loss.chunked import _chunk_forward, _chunk_grad, default_chunk_rows, reference_row_ce_l1


def _softcap(u: Tensor, cap: float | None) -> Tensor:
    return u if not cap else torch.tanh(u / cap) * cap


@dataclass(frozen=True)
class LogitHead:
    """The weights that turn hidden states into logits. Built inside the draft's forward, so that under FSDP2 the
    tensors are the gathered parameters that the backward hooks of that forward reduce."""

    weight: Tensor  # [V, H] the LM head, shared by the draft and the teacher
    markov_weight: Tensor | None  # [V, r] W2 of the Markov head (None without one)
    softcap: float | None  # the family's final logit softcap c (None or 0: none)

    def draft_logits(self, hidden: Tensor, markov: Tensor | None) -> Tensor:
        """Materialised `Z = cap(h·Wᵀ) + m·W2ᵀ`: [..., H] (+ [..., r]) → [..., V]; for tests and diagnostics."""
        logits = _softcap(F.linear(hidden, self.weight), self.softcap)
        if markov is None or self.markov_weight is None:
            return logits
        return logits + F.linear(markov, self.markov_weight).to(logits.dtype)

    @torch.no_grad()
    def teacher_logits(self, teacher_hidden: Tensor) -> Tensor:
        """Materialised `cap(t·Wᵀ)`: [..., H] → [..., V]."""
        return _softcap(F.linear(teacher_hidden.to(self.weight.dtype), self.weight), self.softcap)


def compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype `nn.Linear` would compute in here: autocast's when it is on for the weight's device."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


@dataclass
class _Chunk:
    """One chunk of rows with the weights already cast to the compute dtype."""

    hidden: Tensor  # [r, H]
    markov: Tensor | None  # [r, rank]
    teacher: Tensor  # [r, H]
    labels: Tensor  # [r]
    keep: Tensor  # [r] bool


def _chunk_logits(c: _Chunk, w: Tensor, w2: Tensor | None, cap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """(draft logits Z, capped base logits cap(u), teacher logits), each `[r, V]` in the compute dtype."""
    base = _softcap(c.hidden.to(w.dtype) @ w.T, cap)
    z = base if c.markov is None or w2 is None else base + c.markov.to(w2.dtype) @ w2.T
    with torch.no_grad():
        teacher = _softcap(c.teacher.to(w.dtype) @ w.T, cap)
    return z, base, teacher


def _accumulate(acc: Tensor | None, a: Tensor, b: Tensor) -> None:
    """`acc += a @ b` into an fp32 accumulator (in place, without a temporary when the dtypes allow)."""
    if acc is None:
        return
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


class _HeadRowCEL1(torch.autograd.Function):
    """ce/l1 rows from hidden states: saves only its inputs, rebuilds each chunk's logits in backward."""

    @staticmethod
    def forward(ctx, hidden, markov, teacher, labels, keep, weight, markov_weight, cap, chunk_rows, dtype):
        rows = hidden.shape[0]
        ce = hidden.new_empty(rows, dtype=torch.float32)
        l1 = hidden.new_empty(rows, dtype=torch.float32)
        with torch.autocast(weight.device.type, enabled=False), torch.no_grad():
            w, w2 = weight.to(dtype), None if markov_weight is None else markov_weight.to(dtype)
            for sl, chunk in _chunks(hidden, markov, teacher, labels, keep, chunk_rows):
                z, _, t = _chunk_logits(chunk, w, w2, cap)
                ce[sl], l1[sl] = _chunk_forward(z, t, chunk.labels, chunk.keep)
        ctx.save_for_backward(hidden, markov, teacher, labels, keep, weight, markov_weight)
        ctx.options = (cap, chunk_rows, dtype)
        return ce, l1

    @staticmethod
    def backward(ctx, g_ce: Tensor, g_l1: Tensor):
        hidden, markov, teacher, labels, keep, weight, markov_weight = ctx.saved_tensors
        cap, chunk_rows, dtype = ctx.options
        need = ctx.needs_input_grad
        g_ce, g_l1 = g_ce.float(), g_l1.float()
        d_hidden = torch.zeros_like(hidden) if need[0] else None
        d_markov = torch.zeros_like(markov) if need[1] else None
        d_w = torch.zeros_like(weight, dtype=torch.float32) if need[5] else None
        d_w2 = torch.zeros_like(markov_weight, dtype=torch.float32) if need[6] else None
        with torch.autocast(weight.device.type, enabled=False), torch.no_grad():
            w, w2 = weight.to(dtype), None if markov_weight is None else markov_weight.to(dtype)
            for sl, chunk in _chunks(hidden, markov, teacher, labels, keep, chunk_rows):
                z, base, t = _chunk_logits(chunk, w, w2, cap)
                dz = _chunk_grad(z, t, chunk.labels, chunk.keep, g_ce[sl], g_l1[sl]).to(dtype)  # [r, V]
                del z, t
                if chunk.markov is not None and w2 is not None:
                    if d_markov is not None:
                        d_markov[sl] = dz @ w2
                    _accumulate(d_w2, dz.T, chunk.markov.to(dtype))
                du = dz if not cap else dz.mul_(1 - (base / cap).square_())  # d cap(u)/du = 1 − tanh²(u/c)
                if d_hidden is not None:
                    d_hidden[sl] = du @ w
                _accumulate(d_w, du.T, chunk.hidden.to(dtype))
        d_w = None if d_w is None else d_w.to(weight.dtype)
        d_w2 = None if d_w2 is None else d_w2.to(markov_weight.dtype)
        return d_hidden, d_markov, None, None, None, d_w, d_w2, None, None, None


def _kept(rows: Tensor, keep: Tensor) -> Tensor:
    """Dropped rows read as 0, so that NaN/inf in them reach no value and no gradient (no `0·NaN`)."""
    return torch.where(keep[:, None], rows, 0.0)


def _chunks(hidden, markov, teacher, labels, keep, chunk_rows: int):
    """(row slice, chunk) pairs; dropped rows of the chunk's inputs read as 0."""
    for start in range(0, hidden.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        k = keep[sl]
        m = None if markov is None else _kept(markov[sl], k)
        yield sl, _Chunk(_kept(hidden[sl], k), m, _kept(teacher[sl], k), labels[sl], k)


def head_row_ce_l1(
    head: LogitHead,
    hidden: Tensor,  # [R, H] draft hidden (after the final norm)
    markov: Tensor | None,  # [R, r] Markov features m (bias = m·W2ᵀ), or None
    teacher_hidden: Tensor,  # [R, H] the target's final hidden at each row's teacher position (detached)
    labels: Tensor,  # [R] long, the data token of each row
    keep: Tensor,  # [R] bool, rows that are supervised
    *,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """fp32 `ce [R]` and `l1 [R]` of `Z = cap(h·Wᵀ) + m·W2ᵀ` against `softmax(cap(t·Wᵀ))`; zero on dropped rows.

    `chunk_rows=None` picks a chunk from V; `0` materialises the logits and runs the unchunked reference formula.
    """
    labels = torch.where(keep, labels, 0)  # dropped rows may carry an ignore index such as -100
    teacher_hidden = teacher_hidden.detach()
    if markov is not None and head.markov_weight is None:
        raise ValueError("Markov features were given but the head has no Markov weight (markov_rank: 0)")
    if chunk_rows == 0:
        logits, teacher = head.draft_logits(hidden, markov), head.teacher_logits(teacher_hidden)
        ce, l1 = reference_row_ce_l1(logits, teacher, labels, keep)
        return torch.where(keep, ce, 0.0), torch.where(keep, l1, 0.0)
    rows = chunk_rows if chunk_rows is not None else default_chunk_rows(head.weight.shape[0])
    dtype = compute_dtype(head.weight)
    return _HeadRowCEL1.apply(
        hidden, markov, teacher_hidden, labels, keep, head.weight, head.markov_weight, head.softcap, rows, dtype
    )
