"""The recipe's micro-batch builders: padded rows, packed rows (with document spans), token-budget rows."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nemo_automodel_dspark.data.packing import PlanOptions, PlanSampler
from nemo_automodel_dspark.distributed import DistInfo
from nemo_automodel_dspark.recipe import batching
from nemo_automodel_dspark.recipe.resume import IncompatibleCheckpoint

ROWS = [{"input_ids": torch.arange(1, 1 + n), "loss_mask": torch.ones(n, dtype=torch.long)} for n in (5, 3, 7, 2, 4)]


def args(**overrides) -> SimpleNamespace:
    values = dict(
        packed_sequence_size=0, max_tokens_per_batch=0, micro_batch_size=2, grad_accumulation_steps=3, shuffle_seed=0
    )
    return SimpleNamespace(**{**values, **overrides})


def test_packed_micro_batch_lists_each_document_span():
    mb = batching.plan_micro_batch(ROWS, [[2, 3], [0, 1]], args(packed_sequence_size=9), pad_token_id=0)
    assert mb.input_ids.shape == (2, 9) and mb.indices == [2, 3, 0, 1]
    assert mb.spans == [[(0, 7), (7, 2)], [(0, 5), (5, 3)]]
    assert mb.position_ids is not None
    assert mb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert mb.input_ids[1].tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 0]


def test_token_budget_micro_batch_pads_to_its_longest_row():
    mb = batching.plan_micro_batch(ROWS, [[1], [3], [4]], args(max_tokens_per_batch=12), pad_token_id=0)
    assert mb.input_ids.shape == (3, 4) and mb.spans is None and mb.position_ids is None
    assert mb.attention_mask.sum(1).tolist() == [3, 2, 4]


def test_items_per_step_counts_rows_or_micro_batches():
    assert batching.items_per_step(args()) == 6  # 2 rows x 3 micro-batches
    assert batching.items_per_step(args(packed_sequence_size=16)) == 3  # 3 micro-batches of 2 packed rows
    assert batching.plan_options(args()) is None
    assert batching.plan_options(args(packed_sequence_size=16)) == PlanOptions(
        packed_sequence_size=16, packs_per_batch=2
    )


def test_a_checkpoint_with_another_layout_is_one_line_naming_the_key():
    lengths = [len(r["input_ids"]) for r in ROWS]
    saved = PlanSampler(lengths, PlanOptions(packed_sequence_size=8), seed=0).state_dict()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dataset = SimpleNamespace(lengths=lambda: lengths, __len__=lambda: len(lengths))
    now = batching.train_sampler(dataset, args(max_tokens_per_batch=8), info)  # type: ignore[arg-type]
    with pytest.raises(IncompatibleCheckpoint, match="checkpoint ck: cannot resume .* packed_sequence_size=8, now 0"):
        batching.restore_position(now, saved, Path("ck"))
