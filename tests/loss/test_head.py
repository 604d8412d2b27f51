"""The fused objective (`dspark_head_loss`): equals the unfused formula; no `[R, V]` tensor in forward or backward."""

from __future__ import annotations

import pytest
import torch
from _helpers.drafts import batch, check_fused_matches_materialised, make_draft
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_automodel_dspark.loss import LogitHead, LossConfig, dspark_head_loss, dspark_loss

LOSS = LossConfig(loss_decay_gamma=4.0, ce_loss_alpha=0.1, l1_loss_alpha=0.9, confidence_head_alpha=1.0)


def _inputs(B=2, N=3, K=4, H=16, V=37, r=6, softcap=None, markov=True, dtype=torch.float32, seed=0):
    """A trainable head (W, W2), hidden/Markov features that need grad, teacher hidden, ids, every prefix length."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(V, r, generator=g) / r**0.5).to(dtype).requires_grad_() if markov else None
    head = LogitHead(weight=weight, markov_weight=w2, softcap=softcap)
    hidden = (2 * torch.randn(B, N, K, H, generator=g)).to(dtype).requires_grad_()
    feats = torch.randn(B, N, K, r, generator=g).to(dtype).requires_grad_() if markov else None
    teacher = (2 * torch.randn(B, N, K, H, generator=g)).to(dtype)
    ids = torch.randint(0, V, (B, N, K), generator=g)
    lengths = torch.arange(B * N).reshape(B, N) % (K + 1)
    mask = torch.arange(K) < lengths[..., None]
    conf = torch.randn(B, N, K, generator=g).to(dtype).requires_grad_()
    return head, hidden, feats, teacher, ids, mask, conf


def _leaves(head, hidden, feats, conf):
    return [t for t in (hidden, feats, head.weight, head.markov_weight, conf) if t is not None]


def _unfused(head, hidden, feats, teacher, ids, mask, conf):
    """Today's formula: materialised draft and teacher logits into the unchunked reference objective."""
    logits, target = head.draft_logits(hidden, feats), head.teacher_logits(teacher)
    return dspark_loss(logits, target, ids, mask, conf, LOSS, chunk_rows=0)


def _assert_grads_close(got, want, rel):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert (g.float() - w.float()).abs().max() <= rel * w.float().abs().max()


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("markov", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 7, None])
def test_fused_equals_unfused_fp32(softcap, markov, chunk_rows):
    inputs = _inputs(softcap=softcap, markov=markov)  # R = 24 rows; 7 does not divide it
    head, hidden, feats, _, _, _, conf = inputs
    ref = _unfused(*inputs)
    ref_grads = torch.autograd.grad(ref.loss, _leaves(head, hidden, feats, conf))
    out = dspark_head_loss(*inputs, LOSS, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(out.loss, _leaves(head, hidden, feats, conf))
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    for key, value in ref.sums.items():
        torch.testing.assert_close(out.sums[key], value, rtol=1e-5, atol=1e-6, msg=key)
    _assert_grads_close(grads, ref_grads, 1e-5)


def test_fused_equals_unfused_bf16():
    inputs = _inputs(V=257, softcap=3.0, dtype=torch.bfloat16)
    head, hidden, feats, _, _, _, conf = inputs
    ref = _unfused(*inputs)
    ref_grads = torch.autograd.grad(ref.loss, _leaves(head, hidden, feats, conf))
    out = dspark_head_loss(*inputs, LOSS, chunk_rows=5)
    grads = torch.autograd.grad(out.loss, _leaves(head, hidden, feats, conf))
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    _assert_grads_close(grads, ref_grads, 1e-2)


def test_chunk_zero_is_the_materialised_formula():
    inputs = _inputs(softcap=3.0)
    torch.testing.assert_close(dspark_head_loss(*inputs, LOSS, chunk_rows=0).loss, _unfused(*inputs).loss)


def test_frozen_head_and_teacher_get_no_gradient():
    head, hidden, feats, teacher, ids, mask, conf = _inputs()
    frozen = LogitHead(head.weight.detach(), head.markov_weight, None)
    teacher.requires_grad_()
    out = dspark_head_loss(frozen, hidden, feats, teacher, ids, mask, conf, LOSS)
    out.loss.backward()
    assert teacher.grad is None and frozen.weight.grad is None
    assert hidden.grad is not None and head.markov_weight.grad is not None


def test_nan_in_dropped_rows_reaches_no_value_or_gradient():
    head, hidden, feats, teacher, ids, mask, conf = _inputs(softcap=3.0)
    clean = dspark_head_loss(head, hidden, feats, teacher, ids, mask, conf, LOSS, chunk_rows=5)
    clean_grads = torch.autograd.grad(clean.loss, _leaves(head, hidden, feats, conf))
    bad_hidden = torch.where(mask[..., None], hidden.detach(), float("nan")).requires_grad_()
    bad_feats = torch.where(mask[..., None], feats.detach(), float("inf")).requires_grad_()
    bad_teacher = torch.where(mask[..., None], teacher, float("nan"))
    bad_ids = torch.where(mask, ids, -100)
    bad = dspark_head_loss(head, bad_hidden, bad_feats, bad_teacher, bad_ids, mask, conf, LOSS, chunk_rows=5)
    bad_grads = torch.autograd.grad(bad.loss, _leaves(head, bad_hidden, bad_feats, conf))
    assert bad.numerator.item() == clean.numerator.item()
    for got, want in zip(bad_grads, clean_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any new tensor an op produces (views allocate nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_rows_by_vocab_tensor_in_forward_or_backward():
    """With chunks of 5 rows out of 24 and the head frozen (as in training), no op of the forward or the backward
    makes a tensor of more than 2·5·V elements (a chunk's draft and teacher rows share one matmul); the unfused
    formula makes 24·V ones."""
    V, H, r, chunk = 97, 16, 6, 5
    inputs = _inputs(V=V, H=H, r=r, softcap=3.0)
    head, hidden, feats, _, _, _, conf = inputs
    frozen = LogitHead(head.weight.detach(), head.markov_weight.detach(), 3.0)  # no [V, ·] weight gradient
    with _LargestOutput() as fused:
        out = dspark_head_loss(frozen, *inputs[1:], LOSS, chunk_rows=chunk)
        out.loss.backward()
    with _LargestOutput() as unfused:
        _unfused(frozen, *inputs[1:]).loss.backward()
    assert fused.largest <= 2 * chunk * V < 24 * V <= unfused.largest


@pytest.mark.parametrize("markov_head_type", ["gated", "rnn"])
def test_drafter_fused_loss_equals_loss_of_its_materialised_logits(qwen3_target, markov_head_type):
    """Through a real draft (trainable LM head too): same loss and the same gradient on every trainable parameter."""
    draft = make_draft(qwen3_target, markov_head_type=markov_head_type, freeze_embeddings=False)
    check_fused_matches_materialised(draft, *batch(qwen3_target, draft))
