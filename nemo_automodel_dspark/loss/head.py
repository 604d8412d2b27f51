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

from nemo_automodel_dspark.loss.chunked import _ce_l1_, _ce_l1_grad_, default_chunk_rows, reference_row_ce_l1


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


def _chunk_logits(
    c: _Chunk, w: Tensor, w2: Tensor | None, cap: float | None, slope: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Fresh `[r, V]` draft logits Z and teacher logits in the compute dtype (callers may overwrite both), and with
    `slope` the softcap's derivative `1 − tanh²(u/c)` at the draft rows (None without a cap).

    Draft and teacher rows go through the LM head in one matmul, so the `[V, H]` weight is read once per chunk.
    """
    rows = c.hidden.shape[0]
    both = torch.cat([c.hidden, c.teacher]).to(w.dtype) @ w.T  # [2r, V]
    d_cap = None
    if cap:  # c·tanh(u/c), in place, rounded as the unfused `torch.tanh(u / c) * c`
        tanh = both.div_(cap).tanh_()
        d_cap = 1 - tanh[:rows].square() if slope else None
        both = tanh.mul_(cap)
    z, teacher = both[:rows], both[rows:]
    if c.markov is not None and w2 is not None:
        m = c.markov.to(w2.dtype)
        if z.dtype == torch.float32:
            z.addmm_(m, w2.T)  # + b without a chunk-sized temporary
        else:
            z.add_(m @ w2.T)  # low precision: rounded like the unfused `u + b`
    return z, teacher, d_cap


def _accumulate(acc: Tensor | None, a: Tensor, b: Tensor) -> None:
    """`acc += a @ b` into an fp32 accumulator (in place, without a temporary when the dtypes allow)."""
    if acc is None:
        return
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


@dataclass
class _Grads:
    """Gradient buffers of one backward (None where no gradient is needed); weight gradients accumulate in fp32."""

    hidden: Tensor | None  # [R, H]
    markov: Tensor | None  # [R, r]
    weight: Tensor | None  # [V, H] fp32
    markov_weight: Tensor | None  # [V, r] fp32


def _forward_chunk(c: _Chunk, w: Tensor, w2: Tensor | None, cap: float | None) -> tuple[Tensor, Tensor]:
    """`ce [r]`, `l1 [r]` of one chunk; its `[r, V]` tensors are freed on return, before the next chunk's exist."""
    z, t, _ = _chunk_logits(c, w, w2, cap, slope=False)
    return _ce_l1_(z.float(), t.float(), c.labels, c.keep)


def _backward_chunk(
    c: _Chunk, sl: slice, w: Tensor, w2: Tensor | None, cap: float | None, g_ce: Tensor, g_l1: Tensor, grads: _Grads
) -> None:
    """Rebuild one chunk's logits and add its share of every gradient into `grads`."""
    z, t, d_cap = _chunk_logits(c, w, w2, cap, slope=True)
    dz = _ce_l1_grad_(z.float(), t.float(), c.labels, c.keep, g_ce[sl], g_l1[sl]).to(w.dtype)  # [r, V]
    if c.markov is not None and w2 is not None:
        if grads.markov is not None:
            grads.markov[sl] = dz @ w2
        _accumulate(grads.markov_weight, dz.T, c.markov.to(w.dtype))
    du = dz if d_cap is None else dz.mul_(d_cap)  # dU = dZ ⊙ (1 − tanh²(u/c))
    if grads.hidden is not None:
        grads.hidden[sl] = du @ w
    _accumulate(grads.weight, du.T, c.hidden.to(w.dtype))


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
                ce[sl], l1[sl] = _forward_chunk(chunk, w, w2, cap)
        ctx.save_for_backward(hidden, markov, teacher, labels, keep, weight, markov_weight)
        ctx.options = (cap, chunk_rows, dtype)
        return ce, l1

    @staticmethod
    def backward(ctx, g_ce: Tensor, g_l1: Tensor):
        hidden, markov, teacher, labels, keep, weight, markov_weight = ctx.saved_tensors
        cap, chunk_rows, dtype = ctx.options
        need = ctx.needs_input_grad
        grads = _Grads(
            hidden=torch.zeros_like(hidden) if need[0] else None,
            markov=torch.zeros_like(markov) if need[1] else None,
            weight=torch.zeros_like(weight, dtype=torch.float32) if need[5] else None,
            markov_weight=torch.zeros_like(markov_weight, dtype=torch.float32) if need[6] else None,
        )
        with torch.autocast(weight.device.type, enabled=False), torch.no_grad():
            w, w2 = weight.to(dtype), None if markov_weight is None else markov_weight.to(dtype)
            for sl, chunk in _chunks(hidden, markov, teacher, labels, keep, chunk_rows):
                _backward_chunk(chunk, sl, w, w2, cap, g_ce.float(), g_l1.float(), grads)
        d_w = None if grads.weight is None else grads.weight.to(weight.dtype)
        d_w2 = None if grads.markov_weight is None else grads.markov_weight.to(markov_weight.dtype)
        return grads.hidden, grads.markov, None, None, None, d_w, d_w2, None, None, None


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
