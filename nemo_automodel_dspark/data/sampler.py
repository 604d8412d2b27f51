"""What both samplers share: each epoch, a rank's shard is handed out one item at a time and the count handed out
(`consumed`) is the data position a checkpoint stores, so a resumed run continues at the exact next item."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class EpochShard(Generic[T]):
    """A rank's shard of the current epoch (`indices()`, `len(self)` items), handed out resumably."""

    epoch: int
    consumed: int  # items of this epoch handed out on this rank

    def __len__(self) -> int:
        raise NotImplementedError

    def indices(self) -> list[T]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; calling it with the current epoch keeps a resumed position."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def __iter__(self) -> Iterator[T]:
        shard = self.indices()
        while self.consumed < len(shard):
            self.consumed += 1  # counted as it is handed out, so a checkpoint taken after a step is exact
            yield shard[self.consumed - 1]

    def _seek(self, epoch: int, consumed: int) -> None:
        """Resume `consumed` items into `epoch` (the shard's length may depend on the epoch)."""
        self.epoch = epoch
        if not 0 <= consumed <= len(self):
            raise ValueError(f"checkpoint consumed={consumed} is outside [0, {len(self)}]")
        self.consumed = consumed
