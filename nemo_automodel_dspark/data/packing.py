"""Batch plans that cut padding: packed sequences (first-fit-decreasing) and token-budget micro-batches.

A *plan* is one epoch's list of micro-batches; a micro-batch is a list of sequences; a sequence is a list of
dataset rows laid end to end (one row when not packing). Plans depend only on (seed, epoch, row lengths), so every
rank builds the same global plan and takes every `world_size`-th micro-batch, and a resumed run rebuilds it and
skips the micro-batches it had consumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nemo_automodel_dspark.data.sampler import EpochShard

# Rows considered together by one first-fit-decreasing (or length-sorting) pass: large enough to pack tightly,
# bounded so that the plan stays a shuffle (a row never moves further than one buffer from its shuffled place).
DEFAULT_BUFFER_ROWS = 4096


def epoch_permutation(num_items: int, seed: int, epoch: int) -> list[int]:
    """The epoch's row order; the same formula as `ResumableSampler`, so plans shuffle like today's sampler."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(num_items, generator=generator).tolist()


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of positions into `lengths`, each summing to at most `capacity`.

    Items go longest first (ties: lower position first) into the first open bin with room; bins are returned in
    the order they were opened, each listing its items in the order they were placed. Deterministic.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"item {too_long[0]} has {lengths[too_long[0]]} tokens, more than capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    room = np.empty(len(lengths), dtype=np.int64)  # room left in each open bin
    bins: list[list[int]] = []
    for i in order:
        fits = np.flatnonzero(room[: len(bins)] >= lengths[i])
        if fits.size:
            room[fits[0]] -= lengths[i]
            bins[fits[0]].append(i)
        else:
            room[len(bins)] = capacity - lengths[i]
            bins.append([i])
    return bins


def pack_rows(order: Sequence[int], lengths: Sequence[int], capacity: int, buffer_rows: int) -> list[list[int]]:
    """Packs of rows: first-fit-decreasing over consecutive windows of `buffer_rows` rows of `order`."""
    packs: list[list[int]] = []
    for start in range(0, len(order), buffer_rows):
        window = order[start : start + buffer_rows]
        packs += [[window[i] for i in pack] for pack in first_fit_decreasing([lengths[r] for r in window], capacity)]
    return packs


def token_budget_batches(
    order: Sequence[int], lengths: Sequence[int], max_tokens: int, buffer_rows: int, generator: torch.Generator
) -> list[list[int]]:
    """Micro-batches of rows of similar length with `rows × longest ≤ max_tokens`, in a shuffled order.

    Within each window of `buffer_rows` rows of `order`, rows are sorted longest first (ties: earlier in `order`)
    and cut greedily; the batches of the whole epoch are then permuted with `generator` so that long batches are
    not all at the start of the epoch.
    """
    batches: list[list[int]] = []
    for start in range(0, len(order), buffer_rows):
        window = sorted(order[start : start + buffer_rows], key=lambda r: -lengths[r])  # stable: ties keep `order`
        current: list[int] = []
        for row in window:
            if lengths[row] > max_tokens:
                raise ValueError(f"row {row} has {lengths[row]} tokens, more than max_tokens_per_batch={max_tokens}")
            if current and (len(current) + 1) * lengths[current[0]] > max_tokens:
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


@dataclass(frozen=True)
class PlanOptions:
    """How rows become micro-batches: packed (`packed_sequence_size > 0`) or token-budget (`max_tokens > 0`)."""

    packed_sequence_size: int = 0  # tokens per packed sequence
    packs_per_batch: int = 1  # packed sequences per micro-batch (micro_batch_size)
    max_tokens: int = 0  # token budget of a micro-batch (rows × longest row)
    buffer_rows: int = DEFAULT_BUFFER_ROWS

    def __post_init__(self) -> None:
        if (self.packed_sequence_size > 0) == (self.max_tokens > 0):
            raise ValueError("exactly one of packed_sequence_size and max_tokens_per_batch must be > 0")
        if self.packs_per_batch < 1 or self.buffer_rows < 1:
            raise ValueError("packs_per_batch and buffer_rows must be >= 1")


def epoch_plan(lengths: Sequence[int], options: PlanOptions, seed: int, epoch: int) -> list[list[list[int]]]:
    """The global micro-batches of `epoch` (every rank computes the same list); a short last packed batch is dropped."""
    order = epoch_permutation(len(lengths), seed, epoch)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63 ^ 0x5EED)
    return rows_plan(order, lengths, options, generator, drop_last=True)


def rows_plan(
    rows: Sequence[int], lengths: Sequence[int], options: PlanOptions, generator: torch.Generator, *, drop_last: bool
) -> list[list[list[int]]]:
    """Micro-batches of `rows` (taken in this order): packs of `packs_per_batch` packed rows, or token budgets.

    `drop_last` drops a packed micro-batch of fewer than `packs_per_batch` rows (training keeps static shapes);
    validation keeps it, so that every document is evaluated. `generator` shuffles token-budget batches only.
    """
    if options.packed_sequence_size > 0:
        packs = pack_rows(rows, lengths, options.packed_sequence_size, options.buffer_rows)
        step = options.packs_per_batch
        end = len(packs) - step + 1 if drop_last else len(packs)
        return [packs[i : i + step] for i in range(0, end, step)]
    batches = token_budget_batches(rows, lengths, options.max_tokens, options.buffer_rows, generator)
    return [[[row] for row in batch] for batch in batches]


class PlanSampler(EpochShard[list[list[int]]]):
    """This rank's micro-batches of each epoch's plan (every `world_size`-th, equal counts); resumes exactly.

    Like `ResumableSampler` (both are `EpochShard`s), counted in micro-batches instead of rows.
    """

    def __init__(
        self, lengths: Sequence[int], options: PlanOptions, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.lengths, self.options = list(lengths), options
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_items = len(self.lengths)
        self.epoch, self.consumed = 0, 0  # micro-batches of this epoch handed out on this rank
        self._plans: dict[int, list[list[list[int]]]] = {}

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """The global plan of `epoch` (cached for the current and one other epoch)."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e == self.epoch}
            self._plans[epoch] = epoch_plan(self.lengths, self.options, self.seed, epoch)
        return self._plans[epoch]

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches per rank in `epoch` (the same on every rank; plans differ in length between epochs)."""
        return len(self.plan(epoch)) // self.world_size

    def __len__(self) -> int:
        return self.batches_in_epoch(self.epoch)

    def indices(self) -> list[list[list[int]]]:
        """This rank's micro-batches for the current epoch, in order."""
        plan, count = self.plan(self.epoch), len(self)
        return plan[self.rank : count * self.world_size : self.world_size]

    def _fingerprint(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "num_items": self.num_items,
            "world_size": self.world_size,
            "packed_sequence_size": self.options.packed_sequence_size,
            "max_tokens_per_batch": self.options.max_tokens,
            "packs_per_batch": self.options.packs_per_batch,
            "buffer_rows": self.options.buffer_rows,
            "total_tokens": sum(self.lengths),
        }

    def state_dict(self) -> dict[str, int]:
        """Data position (epoch, micro-batches consumed this epoch on this rank) and what it is only valid for."""
        return {"epoch": self.epoch, "consumed": self.consumed, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state`; refuse a position taken with another seed, dataset, layout or batching option."""
        for key, value in self._fingerprint().items():
            if state.get(key) != value:  # a position counted in rows (no packing keys) is refused too
                raise ValueError(f"cannot resume the data position: checkpoint {key}={state.get(key)}, now {value}")
        self._seek(state["epoch"], state["consumed"])


def collate_packed(
    packs: list[list[dict[str, torch.Tensor]]], *, packed_sequence_size: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Lay each pack's documents end to end and right-pad to `packed_sequence_size` (static shapes).

    Returns input_ids, attention_mask (1 on document tokens), loss_mask and position_ids, each [B, P] long.
    Positions restart at 0 for every document, and the padding tail counts from 0 as its own segment, so a
    position that does not follow its left neighbour by exactly 1 starts a new document (transformers' packed
    format, which the frozen target reads).
    """
    size = packed_sequence_size
    input_ids = torch.full((len(packs), size), pad_token_id, dtype=torch.long)  # [B, P]
    attention_mask = torch.zeros((len(packs), size), dtype=torch.long)  # [B, P]
    loss_mask = torch.zeros((len(packs), size), dtype=torch.long)  # [B, P]
    position_ids = torch.zeros((len(packs), size), dtype=torch.long)  # [B, P]
    for b, docs in enumerate(packs):
        start = 0
        for doc in docs:
            n = doc["input_ids"].numel()
            if start + n > size:
                raise ValueError(f"pack {b} holds more than packed_sequence_size={size} tokens")
            input_ids[b, start : start + n] = doc["input_ids"]
            attention_mask[b, start : start + n] = 1
            loss_mask[b, start : start + n] = doc["loss_mask"]
            position_ids[b, start : start + n] = torch.arange(n)
            start += n
        position_ids[b, start:] = torch.arange(size - start)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
    }
