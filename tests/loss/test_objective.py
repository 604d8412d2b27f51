"""The DSpark objective (SPEC §4): exact formulas, masking, chunked == unchunked, exact accumulation, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_automodel_dspark.loss import LossConfig, dspark_loss, flatten_sums, metrics_from_sums, unflatten_sums

ALPHAS = {"ce_loss_alpha": 0.1, "l1_loss_alpha": 0.9, "confidence_head_alpha": 1.0}


def _cfg(gamma: float | None = 4.0) -> LossConfig:
    return LossConfig(loss_decay_gamma=gamma, **ALPHAS)


def _inputs(B=2, N=3, K=4, V=11, seed=0, dtype=torch.float32):
    """Random logits, ids, a contiguous-prefix eval mask with every prefix length, and confidence logits."""
    g = torch.Generator().manual_seed(seed)
    draft = (2 * torch.randn(B, N, K, V, generator=g)).to(dtype).requires_grad_()
    target = (2 * torch.randn(B, N, K, V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (B, N, K), generator=g)
    lengths = torch.arange(B * N).reshape(B, N) % (K + 1)  # 0..K supervised slots per block
    mask = torch.arange(K) < lengths[..., None]
    conf = torch.randn(B, N, K, generator=g).to(dtype).requires_grad_()
    return draft, target, ids, mask, conf


def _hand_terms(draft, target, ids, mask, conf, gamma):
    """Loops over supervised slots in float64: the literal formulas of SPEC §4."""
    B, N, K, _ = draft.shape
    totals = dict.fromkeys(("w", "ce", "l1", "conf"), 0.0)
    for b, n, k in zip(*torch.nonzero(mask, as_tuple=True), strict=True):
        z, t = draft[b, n, k].double().detach(), target[b, n, k].double()
        p, q = torch.softmax(z, -1), torch.softmax(t, -1)
        w = 1.0 if not gamma or gamma <= 0 else math.exp(-int(k) / gamma)
        l1 = (p - q).abs().sum().item()
        acc = min(max(1.0 - l1 / 2, 0.0), 1.0)
        c = torch.sigmoid(conf[b, n, k].double()).item()
        totals["w"] += w
        totals["ce"] += w * -math.log(p[ids[b, n, k]].item())
        totals["l1"] += w * l1
        totals["conf"] += w * -(acc * math.log(c) + (1 - acc) * math.log(1 - c))
    return totals


@pytest.mark.parametrize("gamma", [4.0, 1.5, None, 0.0])
def test_loss_terms_match_hand_formula(gamma):
    draft, target, ids, mask, conf = _inputs()
    out = dspark_loss(draft, target, ids, mask, conf, _cfg(gamma))
    hand = _hand_terms(draft, target, ids, mask, conf, gamma)
    assert out.denominator.item() == pytest.approx(hand["w"], rel=1e-6)
    assert out.ce_loss.item() == pytest.approx(hand["ce"] / hand["w"], rel=1e-5)
    assert out.l1_loss.item() == pytest.approx(hand["l1"] / hand["w"], rel=1e-5)
    assert out.confidence_loss.item() == pytest.approx(hand["conf"] / hand["w"], rel=1e-5)
    expected_num = 0.1 * hand["ce"] + 0.9 * hand["l1"] + 1.0 * hand["conf"]
    assert out.numerator.item() == pytest.approx(expected_num, rel=1e-5)
    assert out.loss.item() == pytest.approx(expected_num / hand["w"], rel=1e-5)
    assert out.sums["ce"].item() == pytest.approx(hand["ce"], rel=1e-5)


def test_diagnostics_match_hand_formula():
    # One block, K = 3, two supervised slots; V = 2 so that acceptance is easy to write down.
    draft = torch.log(torch.tensor([[[[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]]]))
    target = torch.log(torch.tensor([[[[0.7, 0.3], [0.6, 0.4], [0.3, 0.7]]]]))
    mask = torch.tensor([[[True, True, False]]])
    conf_logits = torch.logit(torch.tensor([[[0.9, 0.5, 0.2]]]))
    ids = torch.zeros(1, 1, 3, dtype=torch.long)
    out = dspark_loss(draft, target, ids, mask, conf_logits, _cfg(None))
    acc = [0.8, 0.7]  # Σ_v min(p_d, p_t) per supervised slot
    s = out.sums
    torch.testing.assert_close(s["accept"], torch.tensor([0.8, 0.7, 0.0]))
    torch.testing.assert_close(s["accept_count"], torch.tensor([1.0, 1.0, 0.0]))
    assert s["tau"].item() == pytest.approx(1 + acc[0] + acc[0] * acc[1], abs=1e-6)
    assert s["blocks"].item() == 1
    assert s["conf_abs_err"].item() == pytest.approx(abs(0.9 - 0.8) + abs(0.5 - 0.7), abs=1e-6)
    assert s["conf_bias"].item() == pytest.approx((0.9 - 0.8) + (0.5 - 0.7), abs=1e-6)
    prefix = [0.9 - 0.8, 0.9 * 0.5 - 0.8 * 0.7]
    assert s["prefix_conf_abs_err"].item() == pytest.approx(sum(map(abs, prefix)), abs=1e-6)
    assert s["prefix_conf_bias"].item() == pytest.approx(sum(prefix), abs=1e-6)


@pytest.mark.parametrize("chunk_rows", [0, None, 5])
def test_masked_slots_contribute_nothing(chunk_rows):
    draft, target, ids, mask, conf = _inputs()
    cfg = _cfg()
    clean = dspark_loss(draft, target, ids, mask, conf, cfg, chunk_rows=chunk_rows)
    clean_grads = torch.autograd.grad(clean.loss, [draft, conf])

    poison = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30]).repeat(draft.shape[-1])[: draft.shape[-1]]
    bad_draft = torch.where(mask[..., None], draft.detach(), poison).requires_grad_()
    bad_target = torch.where(mask[..., None], target, poison.flip(0))
    bad_conf = torch.where(mask, conf.detach(), float("nan")).requires_grad_()
    bad_ids = torch.where(mask, ids, -100)
    bad = dspark_loss(bad_draft, bad_target, bad_ids, mask, bad_conf, cfg, chunk_rows=chunk_rows)
    bad_grads = torch.autograd.grad(bad.loss, [bad_draft, bad_conf])

    assert bad.numerator.item() == clean.numerator.item()
    assert bad.denominator.item() == clean.denominator.item()
    for key, value in clean.sums.items():
        torch.testing.assert_close(bad.sums[key], value, rtol=0, atol=0, msg=key)
    for got, want in zip(bad_grads, clean_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert (got[~mask] == 0).all()


def test_perfect_draft_accepts_everything():
    draft, _, ids, _, conf = _inputs(K=5)
    mask = torch.ones(ids.shape, dtype=torch.bool)
    out = dspark_loss(draft, draft.detach().clone(), ids, mask, conf, _cfg(4.0))
    metrics = metrics_from_sums(out.sums, _cfg())
    assert out.l1_loss.item() == 0.0
    assert metrics["accept_rate"] == 1.0
    assert all(metrics[f"accept_rate@{k}"] == 1.0 for k in range(5))
    assert metrics["tau"] == 5 + 1


@pytest.mark.parametrize("chunk_rows", [1, 7, 24, 1000, None])
def test_chunked_equals_unchunked_fp32(chunk_rows):
    draft, target, ids, mask, conf = _inputs()  # R = 24 rows; 7 does not divide it
    cfg = _cfg()
    ref = dspark_loss(draft, target, ids, mask, conf, cfg, chunk_rows=0)
    ref_grads = torch.autograd.grad(ref.loss, [draft, conf])
    out = dspark_loss(draft, target, ids, mask, conf, cfg, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(out.loss, [draft, conf])
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    for key, value in ref.sums.items():
        torch.testing.assert_close(out.sums[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for got, want in zip(grads, ref_grads, strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_chunked_equals_unchunked_bf16():
    draft, target, ids, mask, conf = _inputs(V=257, dtype=torch.bfloat16)
    cfg = _cfg()
    ref = dspark_loss(draft, target, ids, mask, conf, cfg, chunk_rows=0)
    (ref_grad,) = torch.autograd.grad(ref.loss, [draft])
    out = dspark_loss(draft, target, ids, mask, conf, cfg, chunk_rows=5)
    (grad,) = torch.autograd.grad(out.loss, [draft])
    assert grad.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert (grad.float() - ref_grad.float()).abs().max() <= 1e-2 * ref_grad.float().abs().max()


def test_two_halves_accumulate_to_the_whole():
    draft, target, ids, mask, conf = _inputs(B=4)
    cfg = _cfg()
    whole = dspark_loss(draft, target, ids, mask, conf, cfg)
    whole_grads = torch.autograd.grad(whole.numerator / whole.denominator, [draft, conf])
    halves = [dspark_loss(*(x[i : i + 2] for x in (draft, target, ids, mask, conf)), cfg) for i in (0, 2)]
    global_denominator = sum(h.denominator for h in halves)
    grads = torch.autograd.grad(sum(h.numerator / global_denominator for h in halves), [draft, conf])
    torch.testing.assert_close(global_denominator, whole.denominator)
    for got, want in zip(grads, whole_grads, strict=True):
        torch.testing.assert_close(got, want)
    summed = unflatten_sums(flatten_sums(halves[0].sums) + flatten_sums(halves[1].sums), whole.sums)
    for key, value in whole.sums.items():
        torch.testing.assert_close(summed[key], value, msg=key)


def test_metrics_omit_zero_denominators_and_loss_is_alpha_combination():
    draft, target, ids, _, conf = _inputs(K=4)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[..., :2] = True  # slots 2 and 3 are never supervised
    out = dspark_loss(draft, target, ids, mask, conf, _cfg(4.0))
    metrics = metrics_from_sums(out.sums, _cfg())
    assert {"accept_rate@0", "accept_rate@1"} <= metrics.keys()
    assert "accept_rate@2" not in metrics and "accept_rate@3" not in metrics
    combo = 0.1 * metrics["ce_loss"] + 0.9 * metrics["l1_loss"] + 1.0 * metrics["confidence_loss"]
    assert metrics["loss"] == combo
    assert metrics["loss"] == pytest.approx(out.loss.item(), rel=1e-6)

    empty = dspark_loss(draft, target, ids, torch.zeros_like(mask), conf, _cfg(4.0))
    assert empty.loss.item() == 0.0 and empty.denominator.item() == 0.0
    (grad,) = torch.autograd.grad(empty.loss, [draft])
    assert (grad == 0).all()
    assert metrics_from_sums(empty.sums, _cfg()) == {}


def test_confidence_gradient_goes_only_into_confidence_logits():
    draft, target, ids, mask, conf = _inputs()
    out = dspark_loss(draft, target, ids, mask, conf, _cfg(4.0))
    into_draft, into_conf = torch.autograd.grad(out.confidence_loss, [draft, conf], allow_unused=True)
    assert into_draft is None or (into_draft == 0).all()
    assert into_conf.abs().sum() > 0
    without = dspark_loss(draft, target, ids, mask, None, _cfg(4.0))
    assert without.confidence_loss.item() == 0.0 and "conf_abs_err" not in without.sums
    (with_head,) = torch.autograd.grad(out.loss, [draft])
    (no_head,) = torch.autograd.grad(without.loss, [draft])
    torch.testing.assert_close(with_head, no_head)
