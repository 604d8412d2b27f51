"""Per-row cross-entropy and L1 distance between softmaxes over `[R, V]` logits, chunked over rows.

The unchunked formula keeps several fp32 `[R, V]` tensors alive for backward (log-probabilities, both
softmaxes, the sign of their difference); at V = 151,936 that is ~1 GiB each for 1,792 rows. `row_ce_l1`
instead saves only its inputs and recomputes one chunk of rows at a time in backward, using the closed forms

    d ce / d z = p − onehot(label)
    d l1 / d z = p ⊙ (s − ⟨s, p⟩),   s = sign(p − q),

so the only full-size tensor it allocates is the gradient itself (in the input dtype).
Rows with `keep = False` are read as all-zero logits (both draft and teacher) so that garbage, inf or NaN in
unsupervised rows never reaches a value or a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk are chosen so that one fp32 chunk of `[rows, V]` is about this many bytes.
DEFAULT_CHUNK_BYTES = 64 * 2**20


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one fp32 `[rows, V]` chunk holds about `DEFAULT_CHUNK_BYTES`."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * vocab_size))


def _masked_fp32(logits: Tensor, keep: Tensor) -> Tensor:
    """A fresh fp32 copy of `logits` (`[r, V]`) with dropped rows zeroed."""
    return torch.where(keep[:, None], logits.float(), 0.0)


def _softmax_(z: Tensor) -> tuple[Tensor, Tensor]:
    """In-place softmax of a fresh fp32 `[r, V]` tensor (`z` is overwritten and returned) and its `logsumexp [r, 1]`.

    Max-subtract, exp and normalise in place: `torch.logsumexp` would allocate an `[r, V]` temporary.
    """
    top = z.amax(dim=-1, keepdim=True)
    total = z.sub_(top).exp_().sum(dim=-1, keepdim=True)
    return z.div_(total), top + total.log()


def _ce_l1_(z: Tensor, t: Tensor, labels: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """`ce [r]` and `l1 [r]` from fp32 scratch logits `z`, `t` (`[r, V]`, dropped rows already 0; both overwritten)."""
    picked = z.gather(1, labels[:, None])
    p, lse = _softmax_(z)
    ce = (lse - picked).squeeze(1)
    l1 = p.sub_(_softmax_(t)[0]).abs_().sum(dim=-1)
    return torch.where(keep, ce, 0.0), torch.where(keep, l1, 0.0)


def _ce_l1_grad_(z: Tensor, t: Tensor, labels: Tensor, keep: Tensor, g_ce: Tensor, g_l1: Tensor) -> Tensor:
    """fp32 gradient `[r, V]` of `Σ g_ce·ce + g_l1·l1` with respect to `z`, from scratch `z`, `t` as in `_ce_l1_`."""
    p = _softmax_(z)[0]
    s = _softmax_(t)[0].sub_(p).neg_().sign_()  # sign(p − q), in q's storage
    s_dot_p = torch.bmm(s.unsqueeze(1), p.unsqueeze(2)).reshape(-1, 1)  # ⟨s, p⟩ without an [r, V] product
    # grad = p ⊙ (g_l1·(s − ⟨s,p⟩) + g_ce) − g_ce·onehot(label), built in s's storage.
    grad = s.sub_(s_dot_p).mul_(g_l1[:, None]).add_(g_ce[:, None]).mul_(p)
    grad.scatter_add_(1, labels[:, None], -g_ce[:, None])
    return grad.masked_fill_(~keep[:, None], 0.0)


def _chunk_forward(logits: Tensor, teacher: Tensor, labels: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """`ce [r]` and `l1 [r]` of one chunk; two fp32 `[r, V]` temporaries live at once."""
    return _ce_l1_(_masked_fp32(logits, keep), _masked_fp32(teacher, keep), labels, keep)


def _chunk_grad(logits: Tensor, teacher: Tensor, labels: Tensor, keep: Tensor, g_ce: Tensor, g_l1: Tensor) -> Tensor:
    """fp32 gradient `[r, V]` of `Σ g_ce·ce + g_l1·l1` with respect to one chunk of draft logits."""
    z, t = _masked_fp32(logits, keep), _masked_fp32(teacher, keep)
    return _ce_l1_grad_(z, t, labels, keep, g_ce, g_l1)


class _ChunkedRowCEL1(torch.autograd.Function):
    """Autograd function over `[R, V]` rows that saves only its inputs and recomputes per chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor, teacher: Tensor, labels: Tensor, keep: Tensor, chunk_rows: int):
        rows = logits.shape[0]
        ce = logits.new_empty(rows, dtype=torch.float32)
        l1 = logits.new_empty(rows, dtype=torch.float32)
        for start in range(0, rows, chunk_rows):
            sl = slice(start, start + chunk_rows)
            ce[sl], l1[sl] = _chunk_forward(logits[sl], teacher[sl], labels[sl], keep[sl])
        ctx.save_for_backward(logits, teacher, labels, keep)
        ctx.chunk_rows = chunk_rows
        return ce, l1

    @staticmethod
    def backward(ctx, g_ce: Tensor, g_l1: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logits, teacher, labels, keep = ctx.saved_tensors
        grad = torch.empty_like(logits)
        g_ce, g_l1 = g_ce.float(), g_l1.float()
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            sl = slice(start, start + ctx.chunk_rows)
            grad[sl] = _chunk_grad(logits[sl], teacher[sl], labels[sl], keep[sl], g_ce[sl], g_l1[sl])
        return grad, None, None, None, None


def reference_row_ce_l1(logits: Tensor, teacher: Tensor, labels: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The unchunked formula with plain autograd; the definition `row_ce_l1` must match."""
    z = _masked_fp32(logits, keep)
    ce = -torch.log_softmax(z, dim=-1).gather(1, labels[:, None]).squeeze(1)
    p = torch.softmax(z, dim=-1)
    q = torch.softmax(_masked_fp32(teacher.detach(), keep), dim=-1)
    return ce, (p - q).abs().sum(dim=-1)


def row_ce_l1(
    logits: Tensor,  # [R, V] draft logits, any float dtype
    teacher: Tensor,  # [R, V] teacher logits (detached)
    labels: Tensor,  # [R] long, the data token of each row
    keep: Tensor,  # [R] bool, rows that are supervised
    *,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """fp32 `ce [R] = −log softmax(z)[label]` and `l1 [R] = ‖softmax(z) − softmax(t)‖₁`; zero on dropped rows.

    `chunk_rows=None` picks a chunk from V, `0` runs the unchunked reference, `n > 0` uses chunks of n rows.
    """
    labels = torch.where(keep, labels, 0)  # dropped rows may carry an ignore index such as -100
    teacher = teacher.detach()
    if chunk_rows == 0:
        ce, l1 = reference_row_ce_l1(logits, teacher, labels, keep)
        return torch.where(keep, ce, 0.0), torch.where(keep, l1, 0.0)
    rows = chunk_rows if chunk_rows is not None else default_chunk_rows(logits.shape[-1])
    return _ChunkedRowCEL1.apply(logits, teacher, labels, keep, rows)
