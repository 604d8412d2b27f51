"""Batch plans: first-fit-decreasing packing, token-budget batches, the resumable plan sampler, packed collate."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_automodel_dspark.data import ResumableSampler
from nemo_automodel_dspark.data.packing import (
    PlanOptions,
    PlanSampler,
    collate_packed,
    epoch_plan,
    first_fit_decreasing,
    pack_rows,
    token_budget_batches,
)


def lognormal_lengths(n: int, seed: int = 0, median: float = 900.0, p90: float = 3000.0, cap: int = 4096) -> list[int]:
    """Chat-like lengths: log-normal with the given median and 90th percentile, clipped to [2, cap]."""
    sigma = math.log(p90 / median) / 1.2816  # z of the 90th percentile
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g))
    return x.round().clamp(2, cap).long().tolist()


def test_first_fit_decreasing_by_hand():
    # longest first: 7→bin0, 5→bin1, 4→bin2, 3→bin1 (first with room), 2→bin2, 1→bin0
    assert first_fit_decreasing([5, 3, 7, 2, 4, 1], 8) == [[2, 5], [0, 1], [4, 3]]


def test_first_fit_decreasing_ties_go_by_position():
    assert first_fit_decreasing([2, 2, 2], 4) == [[0, 1], [2]]


def test_first_fit_decreasing_refuses_an_item_over_capacity():
    with pytest.raises(ValueError, match="item 1 has 9 tokens, more than capacity 8"):
        first_fit_decreasing([3, 9], 8)


def test_packs_hold_every_row_once_within_capacity_and_pad_under_two_percent():
    lengths = lognormal_lengths(3000)
    order = torch.randperm(3000, generator=torch.Generator().manual_seed(1)).tolist()
    packs = pack_rows(order, lengths, 4096, buffer_rows=1000)
    assert sorted(r for p in packs for r in p) == list(range(3000))
    assert max(sum(lengths[r] for r in p) for p in packs) <= 4096
    padding = 1 - sum(lengths) / (len(packs) * 4096)
    assert padding < 0.02, padding
    assert len(packs) >= math.ceil(sum(lengths) / 4096)  # no pack is over-full


def test_a_pack_never_mixes_rows_from_two_buffers():
    lengths = [3] * 10
    packs = pack_rows(list(range(10)), lengths, 9, buffer_rows=4)
    assert packs == [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9]]


def test_token_budget_batches_fit_the_budget_and_group_similar_lengths():
    lengths = [10, 2, 9, 3, 8, 4, 1, 7]
    batches = token_budget_batches(list(range(8)), lengths, 20, buffer_rows=8, generator=torch.Generator())
    # sorted longest first: 10,9 | 8,7 | 4,3,2,1 — each cut where one more row would pass rows × longest = 20
    assert sorted(batches) == sorted([[0, 2], [4, 7], [5, 3, 1, 6]])
    for batch in batches:
        assert len(batch) * max(lengths[r] for r in batch) <= 20


def test_token_budget_refuses_a_row_over_the_budget():
    with pytest.raises(ValueError, match="row 1 has 30 tokens, more than max_tokens_per_batch=20"):
        token_budget_batches([0, 1], [5, 30], 20, buffer_rows=8, generator=torch.Generator())


def test_plans_are_deterministic_per_seed_and_epoch():
    lengths = lognormal_lengths(500, cap=1024)
    packed = PlanOptions(packed_sequence_size=1024, packs_per_batch=2, buffer_rows=100)
    budget = PlanOptions(max_tokens=2048, buffer_rows=100)
    for options in (packed, budget):
        assert epoch_plan(lengths, options, 7, 0) == epoch_plan(lengths, options, 7, 0)
        assert epoch_plan(lengths, options, 7, 0) != epoch_plan(lengths, options, 7, 1)
        assert epoch_plan(lengths, options, 7, 0) != epoch_plan(lengths, options, 8, 0)
        rows = [r for batch in epoch_plan(lengths, options, 7, 0) for seq in batch for r in seq]
        assert len(rows) == len(set(rows))


def test_plan_options_need_exactly_one_mode():
    with pytest.raises(ValueError, match="exactly one of packed_sequence_size and max_tokens_per_batch"):
        PlanOptions()
    with pytest.raises(ValueError, match="exactly one of"):
        PlanOptions(packed_sequence_size=64, max_tokens=64)


def test_ranks_split_the_plan_into_equal_disjoint_shards():
    lengths = lognormal_lengths(300, cap=512)
    options = PlanOptions(packed_sequence_size=512, buffer_rows=64)
    ranks = [PlanSampler(lengths, options, seed=3, rank=r, world_size=3) for r in range(3)]
    shards = [list(s) for s in ranks]
    assert len({len(s) for s in shards}) == 1
    plan = ranks[0].plan(0)
    assert [shards[r][i] for i in range(len(shards[0])) for r in range(3)] == plan[: 3 * len(shards[0])]


@pytest.mark.parametrize(
    "options", [PlanOptions(packed_sequence_size=512, buffer_rows=64), PlanOptions(max_tokens=1024, buffer_rows=64)]
)
def test_plan_sampler_resumes_at_the_exact_next_micro_batch(options):
    lengths = lognormal_lengths(300, cap=512)
    full = PlanSampler(lengths, options, seed=5)
    full.set_epoch(1)
    expected = list(full)
    first = PlanSampler(lengths, options, seed=5)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(4)]
    resumed = PlanSampler(lengths, options, seed=5)
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(1)  # what the recipe does on entering the epoch: keeps the position
    assert head + list(resumed) == expected


def test_plan_sampler_refuses_a_position_from_another_layout():
    lengths = [4] * 20
    state = PlanSampler(lengths, PlanOptions(packed_sequence_size=8), seed=1).state_dict()
    other = PlanSampler(lengths, PlanOptions(packed_sequence_size=16), seed=1)
    with pytest.raises(ValueError, match="checkpoint packed_sequence_size=8, now 16"):
        other.load_state_dict(state)
    rows_state = ResumableSampler(20, seed=1).state_dict()
    with pytest.raises(ValueError, match="checkpoint packed_sequence_size=None, now 8"):
        PlanSampler(lengths, PlanOptions(packed_sequence_size=8), seed=1).load_state_dict(rows_state)
    with pytest.raises(ValueError, match="checkpoint packed_sequence_size=8, now 0"):
        ResumableSampler(20, seed=1).load_state_dict(state)


def test_collate_packed_restarts_positions_per_document():
    docs = [
        {"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0, 1, 1])},
        {"input_ids": torch.tensor([8, 9]), "loss_mask": torch.tensor([1, 1])},
    ]
    out = collate_packed([docs, docs[1:]], packed_sequence_size=7, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0], [8, 9, 0, 0, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]]


def test_collate_packed_refuses_an_overfull_pack():
    doc = {"input_ids": torch.tensor([1, 2, 3]), "loss_mask": torch.tensor([1, 1, 1])}
    with pytest.raises(ValueError, match="pack 0 holds more than packed_sequence_size=5"):
        collate_packed([[doc, doc]], packed_sequence_size=5, pad_token_id=0)
