"""How the recipe turns dataset rows into micro-batches: padded rows (default), packed rows, or token budgets.

- padded (`packed_sequence_size: 0`, `max_tokens_per_batch: 0`): `micro_batch_size` rows, each right-padded to
  `seq_length`; the sampler hands out rows.
- packed (`packed_sequence_size: P`): `micro_batch_size` rows of P tokens, each holding whole documents chosen by
  first-fit-decreasing; positions restart per document and every rule of the step is per document.
- token budget (`max_tokens_per_batch: T`): rows of similar length, as many as fit `rows × longest ≤ T`, padded
  only to the longest row of the micro-batch.

In the last two modes the sampler hands out whole micro-batches (`PlanSampler`), so a step is
`grad_accumulation_steps` of them and the number of steps per epoch follows the epoch's plan.

Validation batches the same way as training (`validation_micro_batches`): the same documents whatever the mode,
laid out, anchored and costed as training lays them out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nemo_automodel_dspark.data import DSparkChatDataset, ResumableSampler, collate
from nemo_automodel_dspark.data.packing import PlanOptions, PlanSampler, collate_packed, rows_plan
from nemo_automodel_dspark.distributed import DistInfo
from nemo_automodel_dspark.recipe.resume import IncompatibleCheckpoint
from nemo_automodel_dspark.recipe.step import MicroBatch

Sampler = ResumableSampler | PlanSampler


def plan_options(args: Any) -> PlanOptions | None:
    """The batch plan of the recipe args, or None for padded rows."""
    if not args.packed_sequence_size and not args.max_tokens_per_batch:
        return None
    return PlanOptions(
        packed_sequence_size=args.packed_sequence_size,
        packs_per_batch=args.micro_batch_size,
        max_tokens=args.max_tokens_per_batch,
    )


def train_sampler(dataset: DSparkChatDataset, args: Any, info: DistInfo) -> Sampler:
    options = plan_options(args)
    if options is None:
        return ResumableSampler(len(dataset), seed=args.shuffle_seed, rank=info.rank, world_size=info.world_size)
    return PlanSampler(dataset.lengths(), options, seed=args.shuffle_seed, rank=info.rank, world_size=info.world_size)


def restore_position(sampler: Sampler, state: dict, path: Path) -> None:
    """Resume the data position of checkpoint `path`; one line naming the key when its data layout differs."""
    try:
        sampler.load_state_dict(state)
    except ValueError as err:
        raise IncompatibleCheckpoint(
            f"checkpoint {path}: {err} (recipe_args.packed_sequence_size, max_tokens_per_batch, micro_batch_size, "
            "shuffle_seed, the training data and the number of ranks must match); resume with the same values or "
            "start a new run in a new output_dir"
        ) from None


def items_per_step(args: Any) -> int:
    """Sampler items per optimizer step on one rank: rows when padded, micro-batches otherwise."""
    per_micro_batch = 1 if plan_options(args) else args.micro_batch_size
    return per_micro_batch * args.grad_accumulation_steps


def steps_in_epoch(sampler: Sampler, epoch: int, per_step: int) -> int:
    """Optimizer steps in `epoch` (the same on every rank)."""
    count = sampler.batches_in_epoch(epoch) if isinstance(sampler, PlanSampler) else len(sampler)
    return count // per_step


def padded_micro_batches(
    dataset: DSparkChatDataset, rows: list[int], *, micro_batch_size: int, seq_length: int, pad_token_id: int
) -> list[MicroBatch]:
    """`rows` in micro-batches of `micro_batch_size`, each row right-padded to `seq_length`."""
    out = []
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start : start + micro_batch_size]
        batch = collate([dataset[i] for i in chunk], seq_length=seq_length, pad_token_id=pad_token_id)
        out.append(MicroBatch(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk))
    return out


def plan_micro_batch(dataset: DSparkChatDataset, plan: list[list[int]], args: Any, pad_token_id: int) -> MicroBatch:
    """One micro-batch of a `PlanSampler` plan: a list of rows, each a list of documents (dataset row ids)."""
    rows = [r for row in plan for r in row]
    if args.packed_sequence_size:
        docs = [[dataset[r] for r in row] for row in plan]
        batch = collate_packed(docs, packed_sequence_size=args.packed_sequence_size, pad_token_id=pad_token_id)
        spans = []
        for row in docs:
            starts = [0]
            for doc in row:
                starts.append(starts[-1] + doc["input_ids"].numel())
            spans.append([(s, e - s) for s, e in zip(starts, starts[1:], strict=False)])
        ids, attention, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        return MicroBatch(ids, attention, loss, rows, batch["position_ids"], spans)
    items = [dataset[r] for r in rows]
    longest = max(item["input_ids"].numel() for item in items)
    batch = collate(items, seq_length=longest, pad_token_id=pad_token_id)
    return MicroBatch(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], rows)


def validation_micro_batches(
    dataset: DSparkChatDataset, args: Any, info: DistInfo, pad_token_id: int
) -> list[MicroBatch]:
    """This rank's validation micro-batches, batched like training (padded, packed or token budget).

    Every mode evaluates the same documents: those of the padded layout (`ResumableSampler`, epoch 0, over all
    ranks). Packed and token-budget modes plan them once for all ranks, in the sampler's order and keeping every
    document (no short batch dropped), and rank r takes every world_size-th micro-batch from r, as training does:
    the same packs, so the same anchors, for any number of ranks. Ranks run equally many micro-batches (a sharded
    forward is collective): a rank with one fewer runs a document-less `filler_micro_batch`, which adds nothing.
    """
    world = info.world_size
    shards = [
        ResumableSampler(len(dataset), seed=args.shuffle_seed, rank=r, world_size=world).indices() for r in range(world)
    ]
    options = plan_options(args)
    if options is None:
        return padded_micro_batches(
            dataset,
            shards[info.rank],
            micro_batch_size=args.micro_batch_size,
            seq_length=args.seq_length,
            pad_token_id=pad_token_id,
        )
    rows = [shards[i % world][i // world] for i in range(len(shards[0]) * world)]  # the sampler's order
    generator = torch.Generator().manual_seed(args.shuffle_seed)
    plan = rows_plan(rows, dataset.lengths(), options, generator, drop_last=False)
    batches = [plan_micro_batch(dataset, p, args, pad_token_id) for p in plan[info.rank :: world]]
    fillers = -(-len(plan) // world) - len(batches)
    return batches + [filler_micro_batch(args, pad_token_id) for _ in range(fillers)]


def filler_micro_batch(args: Any, pad_token_id: int) -> MicroBatch:
    """One row of padding with no document and no loss token: a forward that adds exactly 0 to every sum."""
    if args.packed_sequence_size:
        batch = collate_packed([[]], packed_sequence_size=args.packed_sequence_size, pad_token_id=pad_token_id)
        ids, attention, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        return MicroBatch(ids, attention, loss, [], batch["position_ids"], [[]])
    ids = torch.full((1, args.seq_length), pad_token_id, dtype=torch.long)  # [1, S]
    return MicroBatch(ids, torch.zeros_like(ids), torch.zeros_like(ids), [0])
