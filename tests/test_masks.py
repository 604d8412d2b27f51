import pytest
import torch

from nemo_automodel_dspark.masks import (
    block_mask_predicate,
    build_eval_mask,
    context_start,
    dense_block_mask,
    sample_anchors,
)


def _loss_mask():
    mask = torch.zeros(3, 20, dtype=torch.long)
    mask[0, 4:18] = 1
    mask[1, [2, 3, 7, 8, 9, 15]] = 1  # candidates: 2, 7, 8
    mask[2, 10:20] = 1
    return mask


@pytest.mark.parametrize("num_anchors", [1, 3, 5, 40])
def test_anchors_valid_unique_sorted(num_anchors):
    loss_mask = _loss_mask()
    anchors, keep = sample_anchors(loss_mask, num_anchors, torch.Generator().manual_seed(1))
    assert anchors.shape == keep.shape == (3, num_anchors)
    for row in range(3):
        valid = {i for i in range(19) if loss_mask[row, i] and loss_mask[row, i + 1]}
        kept = anchors[row][keep[row]].tolist()
        assert len(kept) == min(len(valid), num_anchors)
        assert set(kept) <= valid and len(set(kept)) == len(kept) and kept == sorted(kept)
        assert keep[row].tolist() == sorted(keep[row].tolist(), reverse=True)  # dummies last


def test_anchors_uniform_and_generator_driven():
    loss_mask = torch.ones(1, 6, dtype=torch.long)  # candidates 0..4, pick 2
    counts = torch.zeros(5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        anchors, _ = sample_anchors(loss_mask, 2, gen)
        counts[anchors[0]] += 1
    assert torch.allclose(counts / counts.sum(), torch.full((5,), 0.2), atol=0.03)
    a1, _ = sample_anchors(loss_mask, 2, torch.Generator().manual_seed(5))
    a2, _ = sample_anchors(loss_mask, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2)


def test_eval_mask_rule_and_prefix():
    loss_mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1]])
    anchors, keep = torch.tensor([[1, 5, 0]]), torch.tensor([[True, True, False]])
    mask = build_eval_mask(loss_mask, anchors, keep, block_size=4)
    # block at 1: labels 2,3,4,5 → 1,1,0,(1 but after a gap → 0); block at 5: labels 6,7,8(out),9(out)
    assert mask.int().tolist() == [[[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]]


def _loop_reference(anchors, keep, seq_len, k):
    b, n = anchors.shape
    ref = torch.zeros(b, 1, n * k, seq_len + n * k, dtype=torch.bool)
    for bi in range(b):
        for q in range(n * k):
            blk = q // k
            for j in range(seq_len):
                ref[bi, 0, q, j] = bool(keep[bi, blk]) and j < anchors[bi, blk]
            for j in range(n * k):
                ref[bi, 0, q, seq_len + j] = j // k == blk
    return ref


def test_dense_mask_matches_loop_and_rows_nonempty():
    anchors = torch.tensor([[0, 3, 9], [2, 0, 0]])
    keep = torch.tensor([[True, True, True], [True, False, False]])
    mask = dense_block_mask(anchors, keep, seq_len=12, block_size=3)
    assert torch.equal(mask, _loop_reference(anchors, keep, 12, 3))
    assert mask.any(-1).all()  # no empty attention row, padding blocks included


def test_flex_predicate_matches_dense_mask():
    anchors = torch.tensor([[1, 4, 6], [3, 0, 0]])
    keep = torch.tensor([[True, True, True], [True, False, False]])
    seq, k = 9, 2
    dense = dense_block_mask(anchors, keep, seq, k)
    pred = block_mask_predicate(anchors, keep, seq, k)
    q = torch.arange(anchors.shape[1] * k).view(-1, 1)
    kv = torch.arange(seq + anchors.shape[1] * k).view(1, -1)
    for b in range(2):
        assert torch.equal(pred(torch.tensor(b), torch.tensor(0), q, kv), dense[b, 0])


def test_flex_attention_equals_sdpa_on_cpu():
    import torch.nn.attention.flex_attention as flex

    anchors = torch.tensor([[1, 4, 6], [3, 0, 0]])
    keep = torch.tensor([[True, True, True], [True, False, False]])
    seq, k = 9, 2
    q_len, kv_len = 6, seq + 6
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 8, generator=g)
    kk, v = torch.randn(2, 2, kv_len, 8, generator=g), torch.randn(2, 2, kv_len, 8, generator=g)
    block = flex.create_block_mask(block_mask_predicate(anchors, keep, seq, k), 2, None, q_len, kv_len, device="cpu")
    out_flex = flex.flex_attention(q, kk, v, block_mask=block, enable_gqa=True)  # eager (uncompiled) on CPU
    dense = dense_block_mask(anchors, keep, seq, k)
    out_sdpa = torch.nn.functional.scaled_dot_product_attention(q, kk, v, attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)


def test_packed_rows_block_sees_only_its_document_in_both_backends():
    """Row 0 packs documents [0, 4) and [4, 9): the block anchored at 6 sees rows 4, 5 only; flex == SDPA."""
    import torch.nn.attention.flex_attention as flex

    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    anchors = torch.tensor([[2, 6], [3, 5]])
    keep = torch.ones(2, 2, dtype=torch.bool)
    seq, k = 9, 2
    start = context_start(anchors, position_ids)
    assert start.tolist() == [[0, 4], [0, 0]]
    dense = dense_block_mask(anchors, keep, seq, k, start)
    assert dense[0, 0, 2, :seq].nonzero().flatten().tolist() == [4, 5]  # query of block 1: its document's rows < 6
    assert dense[0, 0, 0, :seq].nonzero().flatten().tolist() == [0, 1]
    assert torch.equal(dense[1], dense_block_mask(anchors, keep, seq, k)[1])  # one document: the unpacked mask
    pred = block_mask_predicate(anchors, keep, seq, k, start)
    q_idx, kv_idx = torch.arange(4).view(-1, 1), torch.arange(seq + 4).view(1, -1)
    for b in range(2):
        assert torch.equal(pred(torch.tensor(b), torch.tensor(0), q_idx, kv_idx), dense[b, 0])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 4, 8, generator=g)
    kk, v = torch.randn(2, 2, seq + 4, 8, generator=g), torch.randn(2, 2, seq + 4, 8, generator=g)
    block = flex.create_block_mask(pred, 2, None, 4, seq + 4, device="cpu")
    out_flex = flex.flex_attention(q, kk, v, block_mask=block, enable_gqa=True)
    out_sdpa = torch.nn.functional.scaled_dot_product_attention(q, kk, v, attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)


def test_packed_eval_mask_stops_at_the_document_end():
    # documents [0, 5) and [5, 9); anchor 2 (positions 2..5 predict rows 3..6): rows 5, 6 belong to the next document
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    loss_mask = torch.ones(1, 9, dtype=torch.long)
    anchors, keep = torch.tensor([[2, 5]]), torch.ones(1, 2, dtype=torch.bool)
    packed = build_eval_mask(loss_mask, anchors, keep, 4, position_ids)
    assert packed.tolist() == [[[True, True, False, False], [True, True, True, False]]]
    assert build_eval_mask(loss_mask, anchors, keep, 4).tolist() == [[[True] * 4, [True, True, True, False]]]
