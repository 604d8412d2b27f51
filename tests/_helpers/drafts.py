"""A small draft for a tiny target and one training batch for it (shared by the per-family model tests)."""

from __future__ import annotations

import torch

from nemo_automodel_dspark import DSparkConfig, DSparkDrafter, capture_target_features, sample_anchors
from nemo_automodel_dspark.loss import LossConfig, dspark_head_loss, dspark_loss

LOSS = LossConfig(loss_decay_gamma=4.0, ce_loss_alpha=0.1, l1_loss_alpha=0.9, confidence_head_alpha=1.0)
MASK_ID = 95  # the tiny test targets have vocab 96; the last id is reserved for the mask slots


def make_draft(target, **overrides) -> DSparkDrafter:
    options: dict = dict(
        mask_token_id=MASK_ID,
        draft_num_hidden_layers=2,
        block_size=4,
        num_anchors=5,
        markov_rank=8,
        target_layer_ids=[0, 2],
    )
    options.update(overrides)
    torch.manual_seed(1)
    return DSparkDrafter.from_target(target, DSparkConfig(**options))


def batch(target, draft: DSparkDrafter, seed: int = 0, seq: int = 24):
    """(ids, loss_mask, captured features, anchors, keep) for 2 rows whose first 6 tokens are unsupervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (2, seq), generator=g)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, :6] = 0
    cap = capture_target_features(target, ids, torch.ones_like(ids), draft.dspark.target_layer_ids)
    anchors, keep = sample_anchors(loss_mask, draft.dspark.num_anchors, g)
    return ids, loss_mask, cap, anchors, keep


def check_forward_backward_finite_and_frozen(target, head: str, vocab: int) -> None:
    """One forward/backward of a fresh draft: shapes, finite values, frozen shared weights gradient-free and equal to
    the target's, every trainable parameter reached by a finite gradient."""
    draft = make_draft(target, markov_head_type=head)
    ids, loss_mask, cap, anchors, keep = batch(target, draft)
    out = draft(ids, cap.features, loss_mask, anchors, keep)
    assert out.draft_logits.shape == (2, 5, 4, vocab) and out.confidence_logits.shape == (2, 5, 4)
    (out.draft_logits.logsumexp(-1).mean() + out.confidence_logits.mean()).backward()
    assert torch.isfinite(out.draft_logits).all()
    assert draft.embed_tokens.weight.grad is None and draft.lm_head.weight.grad is None
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)
    trainable = [p for p in draft.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


def saved_tensor_names(directory) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


def check_same_outputs(target, draft: DSparkDrafter, loaded: DSparkDrafter) -> None:
    """A saved-and-loaded draft computes exactly what the original does on one batch."""
    ids, loss_mask, cap, anchors, keep = batch(target, draft)
    a = draft(ids, cap.features, loss_mask, anchors, keep)
    b = loaded(ids, cap.features, loss_mask, anchors, keep)
    assert torch.equal(a.draft_logits, b.draft_logits) and torch.equal(a.confidence_logits, b.confidence_logits)


def check_cached_backbone_matches_training(target) -> None:
    """The inference path (cached context K/V built in two appends, one block) gives the training forward's hidden
    states for that block."""
    draft = make_draft(target).eval()
    ids, loss_mask, cap, _, _ = batch(target, draft)
    anchors, keep = torch.tensor([[9], [14]]), torch.ones(2, 1, dtype=torch.bool)
    out = draft(ids, cap.features, loss_mask, anchors, keep)
    for row in range(2):
        a = int(anchors[row, 0])
        feats = cap.features[row : row + 1, :a]
        first = draft.context_kv(feats[:, :5], torch.arange(5).view(1, -1))
        second = draft.context_kv(feats[:, 5:], torch.arange(5, a).view(1, -1))
        kv = [
            (torch.cat([k1, k2], 2), torch.cat([v1, v2], 2)) for (k1, v1), (k2, v2) in zip(first, second, strict=True)
        ]
        tokens = draft.block_tokens(ids[row : row + 1], anchors[row : row + 1])[:, 0]
        hidden = draft.backbone_cached(tokens, torch.arange(a, a + 4).view(1, -1), kv)
        torch.testing.assert_close(hidden[0], out.hidden[row, 0], atol=1e-5, rtol=1e-5)


def check_fused_matches_materialised(draft: DSparkDrafter, ids, loss_mask, cap, anchors, keep) -> None:
    """`dspark_head_loss` of a forward equals `dspark_loss` of its materialised logits: loss and the gradient of every
    trainable parameter (fp32, 1e-5 of the largest)."""
    params = [p for p in draft.parameters() if p.requires_grad]
    results = []
    for fused in (True, False):
        out = draft(ids, cap.features, loss_mask, anchors, keep, target_hidden=cap.last_hidden)
        rest = (out.target_ids, out.eval_mask, out.confidence_logits)
        if fused:
            loss = dspark_head_loss(out.head, out.hidden, out.markov_features, out.teacher_hidden, *rest, LOSS)
        else:
            loss = dspark_loss(out.draft_logits, out.target_logits, *rest, LOSS)
        results.append((loss.loss, torch.autograd.grad(loss.loss, params)))
    (fused_loss, fused_grads), (loss, grads) = results
    torch.testing.assert_close(fused_loss, loss)
    for got, want in zip(fused_grads, grads, strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
