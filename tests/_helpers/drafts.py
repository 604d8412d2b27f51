"""A small draft for a tiny target and one training batch for it (shared by the per-family model tests)."""

from __future__ import annotations

import torch

from nemo_automodel_dspark import DSparkConfig, DSparkDrafter, capture_target_features, sample_anchors

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
