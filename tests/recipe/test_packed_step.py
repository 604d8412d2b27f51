"""Packed rows keep every rule per document: a packed step equals the unpacked step on the same documents and anchors.

Per family (Qwen3, Qwen3-MoE, Gemma4 with sliding layers), fp32 on CPU (SDPA): the captured target features of every
document token, the objective's sums and every gradient of the draft are the same whether the documents come one
per padded row or packed end to end with positions restarting per document.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _helpers.recipe_assets import random_documents, tiny_model

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.data import collate
from nemo_automodel_dspark.data.packing import collate_packed
from nemo_automodel_dspark.loss import LossConfig
from nemo_automodel_dspark.masks import (
    candidate_count,
    pack_anchor_count,
    sample_anchors,
    sample_pack_anchors,
    split_anchor_budget,
)
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.drafter import DSparkDrafter
from nemo_automodel_dspark.recipe.step import DSparkStep, MicroBatch
from nemo_automodel_dspark.target.capture import capture_target_features

SEQ, PACK, NUM_ANCHORS, BLOCK = 20, 32, 5, 4
LENGTHS = (19, 13, 11)  # longer than Gemma4's sliding window (8), so the sliding layers' mask matters
PACKS = ([0, 1], [2])  # documents 0+1 fill one packed row (32 tokens), document 2 the next (11 + padding)


def documents(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return random_documents(LENGTHS, seed)


def make_step(family: str) -> DSparkStep:
    target = tiny_model(family, eos=2).float().eval()
    dspark = DSparkConfig(
        mask_token_id=63,
        draft_num_hidden_layers=2,
        block_size=BLOCK,
        num_anchors=NUM_ANCHORS,
        target_layer_ids=[0, 1],
        markov_rank=8,
        enable_confidence_head=True,
        attention_backend="sdpa",
    )
    torch.manual_seed(0)
    draft = DSparkDrafter.from_target(target, dspark)
    args = SimpleNamespace(shuffle_seed=1, seq_length=SEQ, max_grad_norm=1.0, divergence_factor=None)
    loss = LossConfig(loss_decay_gamma=4.0, ce_loss_alpha=0.1, l1_loss_alpha=0.9, confidence_head_alpha=1.0)
    info = D.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return DSparkStep(draft, draft, target, args, loss, info, defer_fsdp_sync=False)


def spans_of(pack: list[int]) -> list[tuple[int, int]]:
    starts = [sum(LENGTHS[d] for d in pack[:i]) for i in range(len(pack))]
    return [(s, LENGTHS[d]) for s, d in zip(starts, pack, strict=True)]


def both_layouts(docs) -> tuple[MicroBatch, MicroBatch]:
    padded = collate(docs, seq_length=SEQ, pad_token_id=0)
    unpacked = MicroBatch(padded["input_ids"], padded["attention_mask"], padded["loss_mask"], [0, 1, 2])
    packed_t = collate_packed([[docs[d] for d in p] for p in PACKS], packed_sequence_size=PACK, pad_token_id=0)
    packed = MicroBatch(
        packed_t["input_ids"],
        packed_t["attention_mask"],
        packed_t["loss_mask"],
        [d for p in PACKS for d in p],
        packed_t["position_ids"],
        [spans_of(p) for p in PACKS],
    )
    return unpacked, packed


def same_anchors(docs) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The same anchors per document in both layouts: [3, N] unpacked, shifted into the packed rows [2, N_pack]."""
    per_doc = [
        sample_anchors(doc["loss_mask"][None], NUM_ANCHORS, torch.Generator().manual_seed(10 + d))
        for d, doc in enumerate(docs)
    ]
    unpacked = torch.cat([a for a, _ in per_doc]), torch.cat([k for _, k in per_doc])
    total = len(docs) * NUM_ANCHORS
    rows = []
    for pack in PACKS:
        a = torch.cat([per_doc[d][0][0] + start for d, (start, _) in zip(pack, spans_of(pack), strict=True)])
        k = torch.cat([per_doc[d][1][0] for d in pack])
        pad = total - a.numel()
        rows.append((torch.cat([a, a.new_zeros(pad)]), torch.cat([k, k.new_zeros(pad)])))
    packed = torch.stack([a for a, _ in rows]), torch.stack([k for _, k in rows])
    return unpacked, packed


def loss_and_grads(step: DSparkStep, batch: MicroBatch, anchors, keep) -> tuple[dict, dict]:
    step.model.zero_grad(set_to_none=True)
    loss = step._forward_loss(batch, anchors, keep)
    loss.numerator.backward()
    grads = {n: p.grad.clone() for n, p in step.model.named_parameters() if p.grad is not None}
    return loss.sums, grads


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma4"])
def test_packed_step_equals_unpacked_step(family):
    step = make_step(family)
    docs = documents()
    unpacked, packed = both_layouts(docs)
    (a_u, k_u), (a_p, k_p) = same_anchors(docs)
    sums_u, grads_u = loss_and_grads(step, unpacked, a_u, k_u)
    sums_p, grads_p = loss_and_grads(step, packed, a_p, k_p)
    assert sums_u["weight"] > 0 and sums_u.keys() == sums_p.keys()
    for key in sums_u:
        torch.testing.assert_close(sums_p[key], sums_u[key], rtol=1e-5, atol=1e-6, msg=key)
    assert grads_u.keys() == grads_p.keys() and len(grads_u) > 5
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6, msg=name)
    # Without the per-document rules (positions and masks spanning the whole packed row) the step differs.
    naive = MicroBatch(packed.input_ids, packed.attention_mask, packed.loss_mask, packed.indices)
    sums_n, _ = loss_and_grads(step, naive, a_p, k_p)
    assert not torch.allclose(sums_n["l1"], sums_u["l1"], rtol=1e-3)


@pytest.mark.parametrize("family", ["qwen3", "gemma4"])
def test_target_sees_only_its_own_document(family):
    step = make_step(family)
    docs = documents()
    unpacked, packed = both_layouts(docs)
    ids = step.draft.dspark.target_layer_ids
    cap_u = capture_target_features(step.target, unpacked.input_ids, unpacked.attention_mask, ids)
    cap_p = capture_target_features(step.target, packed.input_ids, None, ids, position_ids=packed.position_ids)
    for b, pack in enumerate(PACKS):
        for d, (start, n) in zip(pack, spans_of(pack), strict=True):
            torch.testing.assert_close(
                cap_p.features[b, start : start + n], cap_u.features[d, :n], rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(cap_p.last_hidden[b, start : start + n], cap_u.last_hidden[d, :n])


def test_packed_anchors_spread_the_rows_blocks_over_documents_by_candidates():
    docs = documents()
    # candidates (loss tokens i, i+1 both inside the document): 19 - 6 - 1, 13 - 4 - 1, 11 - 3 - 1
    assert [candidate_count(d["loss_mask"]) for d in docs] == [12, 8, 7]
    assert pack_anchor_count(PACK, NUM_ANCHORS, SEQ) == 8  # 5 · 32 // 20: a padded step's blocks for 32 tokens
    # 8 blocks over candidates 12 and 8: quotas 4.8 and 3.2 → 4 + 3, the one left to the larger remainder → 5 + 3
    assert split_anchor_budget([12, 8], 8) == [5, 3]
    assert split_anchor_budget([7], 8) == [7]  # fewer candidates than blocks: every candidate (the padded rule)
    assert split_anchor_budget([3, 3, 3], 4) == [2, 1, 1]  # equal remainders: the earlier document first
    assert split_anchor_budget([0, 5], 3) == [0, 3] and split_anchor_budget([0, 0], 3) == [0, 0]
    _, packed = both_layouts(docs)
    generators = [torch.Generator().manual_seed(d) for d in PACKS[0]]
    anchors, keep = sample_pack_anchors(packed.loss_mask[0], spans_of(PACKS[0]), generators, total=8)
    assert keep.tolist() == [[True] * 8]  # the row's every block trains
    first, second = anchors[0, :5], anchors[0, 5:]
    assert ((first >= 19 // 3) & (first < 18)).all() and first.unique().numel() == 5
    assert ((second >= 19 + 13 // 3) & (second < 19 + 12)).all()  # document 1 starts at row position 19
    # Each document's draw is `sample_anchors` of its share, from its own generator.
    alone, _ = sample_anchors(docs[1]["loss_mask"][None], 3, torch.Generator().manual_seed(1))
    assert second.tolist() == (alone[0] + 19).tolist()


def test_a_packed_row_of_one_document_draws_like_a_padded_row():
    doc = documents()[0]
    row = torch.cat([doc["loss_mask"], torch.zeros(SEQ - LENGTHS[0], dtype=torch.long)])  # P = seq_length
    for num_anchors in (3, NUM_ANCHORS, 12, 19):
        total = pack_anchor_count(SEQ, num_anchors, SEQ)
        packed = sample_pack_anchors(row, [(0, LENGTHS[0])], [torch.Generator().manual_seed(4)], total=total)
        padded = sample_anchors(row[None], num_anchors, torch.Generator().manual_seed(4))  # the padded row
        assert torch.equal(packed[0], padded[0]) and torch.equal(packed[1], padded[1])
