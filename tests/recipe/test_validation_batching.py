"""Validation batches like training: padded, packed or token budget, over the same documents on every rank.

With `num_anchors ≥ seq_length` every candidate position is an anchor in every layout (padded rows draw
min(N, #candidates), packed documents their share of a budget that covers all their candidates), so the three
layouts see the same documents with the same anchors, and their validation sums must be equal.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _helpers.recipe_assets import random_documents, tiny_model

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.data import ResumableSampler
from nemo_automodel_dspark.loss import LossConfig
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.drafter import DSparkDrafter
from nemo_automodel_dspark.recipe import batching
from nemo_automodel_dspark.recipe.step import DSparkStep

SEQ, BLOCK = 16, 3
LENGTHS = (16, 5, 9, 12, 3, 7, 14)
MODES = {
    "padded": {},
    "packed": {"packed_sequence_size": 24},
    "token_budget": {"max_tokens_per_batch": 32},
}


class Docs(list):
    """The dataset interface the batch builders use: rows by index and their lengths."""

    def lengths(self) -> list[int]:
        return [int(d["input_ids"].numel()) for d in self]


def documents() -> Docs:
    return Docs(random_documents(LENGTHS))


def args(mode: str) -> SimpleNamespace:
    values = dict(
        packed_sequence_size=0,
        max_tokens_per_batch=0,
        micro_batch_size=2,
        shuffle_seed=3,
        seq_length=SEQ,
        max_grad_norm=1.0,
        divergence_factor=None,
    )
    return SimpleNamespace(**{**values, **MODES[mode]})


def info(rank: int, world_size: int) -> D.DistInfo:
    return D.DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))


def step(mode: str, num_anchors: int = SEQ) -> DSparkStep:
    target = tiny_model("qwen3", eos=2).float().eval()
    dspark = DSparkConfig(
        mask_token_id=63,
        draft_num_hidden_layers=1,
        block_size=BLOCK,
        num_anchors=num_anchors,  # SEQ ≥ every document's candidates: every layout anchors every candidate
        target_layer_ids=[0, 1],
        markov_rank=4,
        enable_confidence_head=True,
        attention_backend="sdpa",
    )
    torch.manual_seed(0)
    draft = DSparkDrafter.from_target(target, dspark)
    return DSparkStep(draft, draft, target, args(mode), LossConfig(), info(0, 1), defer_fsdp_sync=False)


@pytest.mark.parametrize("mode", ["packed", "token_budget"])
def test_validation_batches_cover_the_padded_documents_with_equal_counts(mode):
    docs, world = documents(), 2
    counts, real = [], []
    for rank in range(world):
        batches = batching.validation_micro_batches(docs, args(mode), info(rank, world), pad_token_id=0)
        real += [r for mb in batches for r in mb.indices if mb.loss_mask.any()]
        if mode == "packed":
            assert all(mb.input_ids.shape[1] == 24 and mb.spans is not None for mb in batches)
        else:
            assert all(mb.input_ids.shape[1] == max(LENGTHS[r] for r in mb.indices) for mb in batches if mb.indices)
        counts.append(len(batches))
    shards = [ResumableSampler(len(docs), seed=3, rank=r, world_size=world).indices() for r in range(world)]
    assert sorted(real) == sorted(shards[0] + shards[1])  # the padded layout's documents, each once
    assert counts[0] == counts[1]  # a sharded forward is collective: equal micro-batches on every rank


def test_packed_validation_is_the_same_for_any_number_of_ranks():
    docs = Docs(documents() + documents()[:1])  # 8 documents: 2 ranks drop none
    runner = step("packed", num_anchors=3)  # a real sample of each row's candidates, not all of them
    sums = []
    for world in (1, 2):
        per_rank = [
            runner.eval_sums(batching.validation_micro_batches(docs, args("packed"), info(r, world), pad_token_id=0))
            for r in range(world)
        ]
        sums.append({k: sum(s[k] for s in per_rank) for k in per_rank[0]})
    assert sums[0]["weight"] > 0
    for key in sums[0]:
        torch.testing.assert_close(sums[1][key], sums[0][key], rtol=1e-6, atol=1e-6, msg=key)


def test_a_filler_micro_batch_adds_nothing_to_the_sums():
    for mode in ("packed", "token_budget"):
        filler = batching.filler_micro_batch(args(mode), pad_token_id=0)
        sums = step(mode).eval_sums([filler])
        assert sums["weight"] == 0
        for key, value in sums.items():
            assert torch.count_nonzero(value) == 0, (mode, key)


@pytest.mark.parametrize("world", [1, 2])
def test_validation_sums_are_equal_in_every_batching_mode(world):
    docs = documents()
    sums = {}
    for mode in MODES:
        runner = step(mode)
        per_rank = [
            runner.eval_sums(batching.validation_micro_batches(docs, args(mode), info(rank, world), pad_token_id=0))
            for rank in range(world)
        ]
        sums[mode] = {k: sum(s[k] for s in per_rank) for k in per_rank[0]}  # the all-reduce of `_validate`
    assert sums["padded"]["weight"] > 0
    for mode in ("packed", "token_budget"):
        assert sums[mode].keys() == sums["padded"].keys()
        for key in sums["padded"]:
            torch.testing.assert_close(sums[mode][key], sums["padded"][key], rtol=1e-5, atol=1e-5, msg=key)
