"""The tokenised chat dataset, its collate function, and a sampler that resumes at the exact next item.

How the recipe reads data (exact resume, SPEC §8)::

    sampler = ResumableSampler(len(dataset), seed=shuffle_seed, rank=rank, world_size=world_size)
    sampler.load_state_dict(ckpt["sampler"])            # on resume only
    collate_fn = functools.partial(collate, seq_length=seq_length, pad_token_id=pad_id)
    for epoch in range(sampler.epoch, num_epochs):
        sampler.set_epoch(epoch)                         # keeps a resumed position within the same epoch
        for batch in batches(sampler, dataset, micro_batch_size, collate_fn):
            ...                                          # train; at a checkpoint save sampler.state_dict()

`batches` pulls indices lazily, so at any point `sampler.consumed` counts exactly the items of the batches handed
out so far. A `DataLoader(dataset, batch_sampler=BatchSampler(sampler, micro_batch_size, drop_last=False),
collate_fn=collate_fn, num_workers=0)` is equivalent; with `num_workers > 0` the loader prefetches indices and
`consumed` runs ahead of training. Rows are tokenised up front, so workers would buy nothing anyway.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch
from tqdm import tqdm

from nemo_automodel_dspark.data.cache import ArrowRows, CacheReport, open_cache
from nemo_automodel_dspark.data.chat import (
    EMPTY_ANSWER,
    MASK_TOKEN_HIT,
    TOKEN_IDS,
    TRUNCATED,
    RowOptions,
    tokenize_row,
)
from nemo_automodel_dspark.data.render import resolve_chat_template
from nemo_automodel_dspark.data.sampler import EpochShard
from nemo_automodel_dspark.data.sources import RowError, open_rows

_PROGRESS_MIN_ROWS = 1000
EMPTY_ANSWERS_WARNING = 0.9  # the report warns when at least this share of the used rows have an empty answer


class _FlatRows:
    """Rows tokenised in this process, stored flat: 5 bytes a token, rows back to back."""

    def __init__(self, ids: array, mask: array, lengths: list[int]) -> None:
        self._ids = torch.frombuffer(ids, dtype=torch.int32).clone() if ids else torch.zeros(0, dtype=torch.int32)
        self._loss_mask = torch.frombuffer(mask, dtype=torch.int8).clone() if mask else torch.zeros(0, dtype=torch.int8)
        self._starts = torch.tensor([0, *lengths]).cumsum(0).tolist()  # row r = [starts[r], starts[r + 1])

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self._starts[index], self._starts[index + 1]
        return self._ids[start:end].long(), self._loss_mask[start:end].long()

    def lengths(self) -> list[int]:
        return torch.diff(torch.as_tensor(self._starts)).tolist()


class DSparkChatDataset(torch.utils.data.Dataset):
    """Every usable row tokenised once; item i is {input_ids, loss_mask}, 1-D long, <= seq_length.

    With `cache_dir` the rows come from the tokenised cache (`data.cache`: built once per node with `num_proc`
    workers, memory-mapped, reused by restarts); without it they are tokenised here, in a loop, into memory. Both
    skip the same rows and report the same counts and first line numbers.
    """

    def __init__(
        self,
        path_or_id: str,
        tokenizer: Any,
        seq_length: int,
        *,
        chat_template: str | None = None,
        mask_reasoning_content: bool = False,
        mask_token_id: int | None = None,
        split: str = "train",
        show_progress: bool = True,
        cache_dir: str | None = None,
        num_proc: int = 1,
    ) -> None:
        self.name = path_or_id
        self.seq_length = seq_length
        options = RowOptions(
            template=resolve_chat_template(tokenizer, chat_template),
            seq_length=seq_length,
            mask_reasoning_content=mask_reasoning_content,
            mask_token_id=mask_token_id,
        )
        self._mask_token_id = mask_token_id
        self._rows: _FlatRows | ArrowRows
        if cache_dir is None:
            self._rows, accounting = self._tokenize_here(path_or_id, split, tokenizer, options, show_progress)
        else:
            self._rows, accounting = open_cache(
                path_or_id, split, tokenizer, options, root=cache_dir, num_proc=num_proc, show_progress=show_progress
            )
        self._unit = accounting.unit
        self.skipped, self.first_skipped = accounting.skipped, accounting.first_skipped
        self.num_truncated = accounting.num_truncated
        self.num_token_ids = accounting.num_token_ids  # rows used as the target's own ids
        self.num_empty_answers = accounting.num_empty_answers  # used rows whose final answer is empty
        if accounting.mask_token_first is not None:
            self._mask_token_error(accounting.mask_token_first)
        if len(self._rows) == 0:
            raise ValueError(f"{path_or_id}: no usable row ({self._skip_summary() or 'the data is empty'})")

    @staticmethod
    def _tokenize_here(
        path_or_id: str, split: str, tokenizer: Any, options: RowOptions, show_progress: bool
    ) -> tuple[_FlatRows, CacheReport]:
        """Today's loop: every row tokenised in this process, stopping at the first supervised mask token."""
        accounting = CacheReport(unit="line" if path_or_id.endswith(".jsonl") else "row")
        num_rows, rows = open_rows(path_or_id, split=split)
        show = show_progress and num_rows > _PROGRESS_MIN_ROWS
        ids, mask, lengths = array("i"), array("b"), []  # flat storage: 5 bytes a token instead of 16
        for number, row in tqdm(rows, total=num_rows, disable=not show, desc=f"tokenising {path_or_id}"):
            try:
                if isinstance(row, RowError):
                    raise row
                tokens = tokenize_row(row, tokenizer, options)
            except RowError as err:
                accounting.skipped[err.reason] = accounting.skipped.get(err.reason, 0) + 1
                accounting.first_skipped.setdefault(err.reason, number)
                continue
            if tokens.flags & MASK_TOKEN_HIT:
                accounting.mask_token_first = number
                break
            accounting.num_truncated += bool(tokens.flags & TRUNCATED)
            accounting.num_token_ids += bool(tokens.flags & TOKEN_IDS)
            accounting.num_empty_answers += bool(tokens.flags & EMPTY_ANSWER)
            ids.frombytes(tokens.input_ids.tobytes())
            mask.frombytes(tokens.loss_mask.tobytes())
            lengths.append(len(tokens.input_ids))
        return _FlatRows(ids, mask, lengths), accounting

    def _mask_token_error(self, number: int) -> None:
        """SPEC §6: mask_token_id fills the draft's block slots, so the data must never ask it to predict that token."""
        raise ValueError(
            f"{self.name}: mask_token_id={self._mask_token_id} occurs in the supervised (assistant) text of "
            f"{self._unit} {number}; choose a reserved token that never appears in responses"
        )

    def _skip_summary(self) -> str:
        return "; ".join(
            f"{reason}: {count}, first at {self._unit} {self.first_skipped[reason]}"
            for reason, count in self.skipped.items()
        )

    def report(self) -> str:
        """One line: rows used, rows skipped per reason with the first offending line, rows truncated."""
        text = f"{self.name}: {len(self)} rows used, {sum(self.skipped.values())} skipped"
        if self.skipped:
            text += f" ({self._skip_summary()})"
        if self.num_token_ids:
            text += f", {self.num_token_ids} as the target's own token ids"
        if self.num_truncated:
            text += f", {self.num_truncated} truncated to seq_length={self.seq_length}"
        if self.num_empty_answers >= EMPTY_ANSWERS_WARNING * len(self):
            text += (
                f"; warning: {self.num_empty_answers} of {len(self)} answers are empty (the draft would learn "
                "little but the end token; regenerate or check the data)"
            )
        return text

    def __len__(self) -> int:
        return len(self._rows)

    def lengths(self) -> list[int]:
        """Tokens of every usable row, in row order (what batch plans pack)."""
        return self._rows.lengths()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids, loss_mask = self._rows[index]
        return {"input_ids": input_ids, "loss_mask": loss_mask}  # [L] each


def collate(items: list[dict[str, torch.Tensor]], *, seq_length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to exactly seq_length (static shapes): input_ids, attention_mask, loss_mask, each [B, S] long."""
    input_ids = torch.full((len(items), seq_length), pad_token_id, dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros((len(items), seq_length), dtype=torch.long)  # [B, S], 1 on real tokens
    loss_mask = torch.zeros((len(items), seq_length), dtype=torch.long)  # [B, S], 0 on padding
    for b, item in enumerate(items):
        n = item["input_ids"].numel()
        if n > seq_length:
            raise ValueError(f"item {b} has {n} tokens, more than seq_length={seq_length}")
        input_ids[b, :n] = item["input_ids"]
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = item["loss_mask"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


class ResumableSampler(EpochShard[int]):
    """Per-epoch permutation from (seed, epoch), strided over ranks in equal shards; resumes at the exact next item."""

    def __init__(self, num_items: int, *, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_items < (world_size if drop_last else 1):
            raise ValueError(f"{num_items} items cannot give every one of {world_size} ranks an item")
        self.num_items, self.seed, self.rank, self.world_size = num_items, seed, rank, world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0  # items of this epoch handed out on this rank

    def __len__(self) -> int:
        """Items per rank per epoch (the same on every rank)."""
        return self.num_items // self.world_size if self.drop_last else -(-self.num_items // self.world_size)

    def indices(self) -> list[int]:
        """This rank's items for the current epoch, in order; ranks' shards are disjoint when drop_last."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        total = len(self) * self.world_size
        order = (order * -(-total // self.num_items))[:total]  # drop the tail, or wrap around to pad it
        return order[self.rank : total : self.world_size]

    def state_dict(self) -> dict[str, int]:
        """Data position (epoch, items consumed this epoch on this rank) and what it is only valid for."""
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "num_items": self.num_items,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state`; refuse a position taken with another seed, dataset size or world size."""
        for key in ("seed", "num_items", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data position: checkpoint {key}={state[key]}, now {getattr(self, key)}"
                )
        for key in ("packed_sequence_size", "max_tokens_per_batch"):  # a position counted in micro-batches
            if state.get(key):
                raise ValueError(f"cannot resume the data position: checkpoint {key}={state[key]}, now 0")
        self._seek(state["epoch"], state["consumed"])


def batches(
    sampler: ResumableSampler,
    dataset: torch.utils.data.Dataset,
    micro_batch_size: int,
    collate_fn: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]],
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated micro-batches of the epoch's remaining items (the last may be smaller); lazy, so resume is exact."""
    indices = iter(sampler)
    while chunk := list(islice(indices, micro_batch_size)):
        yield collate_fn([dataset[i] for i in chunk])
