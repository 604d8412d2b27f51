"""Building the tokenised cache in one pass: rows read in chunks, tokenised by `num_proc` forked workers, written in
order as the record batches of one Arrow IPC stream file (the format `datasets` saves; `Dataset.from_file` reads it).

A JSONL file is cut into chunks of whole lines (`CHUNK_BYTES`), carried to the workers as raw bytes with the number
of their first line. In a chunk, the token-id rows go through the bulk path (`fast_ids`); every row it does not
prove clean, and every text row, goes through `chat.tokenize_row`, the per-row function of the in-memory loop. Other
sources (JSON, parquet, `datasets` folders, Hub ids) are read by `sources.open_rows` and tokenised row by row.
Each chunk also returns the number, skip reason ("" when used) and flags of every row, from which the parent
computes the loop's accounting.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from nemo_automodel_dspark.data.chat import RowOptions, RowTokens, tokenize_row
from nemo_automodel_dspark.data.fast_ids import IdContext, id_context, tokenize_id_lines
from nemo_automodel_dspark.data.sources import RowError, open_rows, parse_line

CHUNK_BYTES = 1 << 20  # JSONL bytes per chunk (a few hundred rows: enough chunks to keep every worker busy)
CHUNK_ROWS = 1024  # rows per chunk of the other sources


@dataclass(frozen=True)
class _State:
    """What every chunk needs (inherited by the forked workers, never pickled)."""

    tokenizer: Any
    options: RowOptions
    ids: IdContext | None


@dataclass
class Chunk:
    """One chunk's rows: accounting of all of them, tokens of the used ones back to back."""

    numbers: list[int]  # every row's line/row number
    errors: list[str]  # its skip reason, "" when used
    flags: list[int]  # its RowTokens.flags (0 when skipped)
    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] int8
    lengths: np.ndarray  # [used rows] int64


def jsonl_chunks(path: str) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, lines of about CHUNK_BYTES in all) over the file; line numbers as `jsonl_lines`."""
    number = 1
    with open(path, "rb") as f:
        while lines := f.readlines(CHUNK_BYTES):
            yield number, lines
            number += len(lines)


def _lines(first: int, lines: list[bytes]) -> list[tuple[int, bytes]]:
    """(line number, line) of the chunk's non-blank lines."""
    return [(first + i, line) for i, line in enumerate(lines) if line.strip()]


def _row_chunks(path_or_id: str, split: str) -> Iterator[list[tuple[int, Any]]]:
    rows = open_rows(path_or_id, split=split)[1]
    while chunk := list(islice(rows, CHUNK_ROWS)):
        yield chunk


def _tokenize_jsonl(state: _State, item: tuple[int, list[bytes]]) -> Chunk:
    numbered = _lines(*item)
    lines = [line for _, line in numbered]
    fast = tokenize_id_lines(lines, state.ids) if state.ids is not None else [None] * len(lines)
    pairs = zip(numbered, fast, strict=True)
    rows = [(number, tokens if tokens is not None else line) for (number, line), tokens in pairs]
    return _collect(state, rows)


def _tokenize_rows(state: _State, rows: list[tuple[int, Any]]) -> Chunk:
    return _collect(state, rows)


def _collect(state: _State, rows: list[tuple[int, Any]]) -> Chunk:
    """Tokenise what is not tokenised yet (a raw line, a row, a RowError) by the reference and gather the chunk."""
    numbers, errors, flags, used = [], [], [], []
    for number, row in rows:
        error = ""
        if not isinstance(row, RowTokens):
            try:
                parsed = parse_line(row) if isinstance(row, bytes) else row
                if isinstance(parsed, RowError):
                    raise parsed
                row = tokenize_row(parsed, state.tokenizer, state.options)
            except RowError as err:
                error = err.reason
        numbers.append(number)
        errors.append(error)
        flags.append(0 if error else row.flags)
        if not error:
            used.append(row)
    ids = np.concatenate([r.input_ids for r in used]) if used else np.zeros(0, np.int32)
    mask = np.concatenate([r.loss_mask for r in used]) if used else np.zeros(0, np.int8)
    lengths = np.asarray([len(r.input_ids) for r in used], np.int64)
    return Chunk(numbers, errors, flags, ids.astype(np.int32), mask.astype(np.int8), lengths)


_WORKER_STATE: _State | None = None


def _init_worker(state: _State) -> None:
    global _WORKER_STATE
    _WORKER_STATE = state


def _in_worker(task: tuple[Callable[[_State, Any], Chunk], Any]) -> Chunk:
    assert _WORKER_STATE is not None
    return task[0](_WORKER_STATE, task[1])


def _ordered(state: _State, fn: Callable[[_State, Any], Chunk], items: Iterator[Any], num_proc: int) -> Iterator[Chunk]:
    """fn over the items, results in order; num_proc > 1 and more than one item: forked workers, at most two
    items each in flight."""
    first = list(islice(items, 2))
    if num_proc <= 1 or len(first) < 2:
        yield from (fn(state, item) for item in chain(first, items))
        return
    gc.freeze()  # the parent's objects out of the workers' collections: fewer copy-on-write page copies
    try:
        pool = multiprocessing.get_context("fork").Pool(num_proc, _init_worker, (state,))
    finally:
        gc.unfreeze()
    try:
        pending: deque = deque()
        for item in chain(first, items):
            pending.append(pool.apply_async(_in_worker, ((fn, item),)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    except BaseException:  # an error in a chunk, or the caller stopped early
        pool.terminate()
        raise
    pool.close()
    pool.join()


def build_rows(
    path_or_id: str, split: str, tokenizer: Any, options: RowOptions, num_proc: int, out: Path
) -> tuple[list[int], list[str], list[int]]:
    """Write the used rows to `out` (Arrow IPC stream: input_ids list<int32>, loss_mask list<int8>) and return
    every row's (number, skip reason, flags) for the accounting."""
    import pyarrow as pa

    state = _State(tokenizer, options, id_context(tokenizer, options))
    path = os.path.expanduser(path_or_id)
    if os.path.isfile(path) and path_or_id.endswith(".jsonl"):
        chunks = _ordered(state, _tokenize_jsonl, jsonl_chunks(path), num_proc)
    else:
        chunks = _ordered(state, _tokenize_rows, _row_chunks(path_or_id, split), num_proc)
    numbers: list[int] = []
    errors: list[str] = []
    flags: list[int] = []
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, row_schema()) as writer:
        for chunk in chunks:
            numbers += chunk.numbers
            errors += chunk.errors
            flags += chunk.flags
            if len(chunk.lengths):
                writer.write_batch(_batch(chunk))
    return numbers, errors, flags


def row_schema() -> Any:
    """The table's schema (pyarrow is imported only where a cache is built or opened)."""
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8()))])


def _arrow(values: np.ndarray) -> Any:
    """A numpy array as an Arrow array without a copy (`pa.array` would import pandas, seconds on a cold start)."""
    import pyarrow as pa

    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _batch(chunk: Chunk) -> Any:
    import pyarrow as pa

    offsets = _arrow(np.concatenate([[0], np.cumsum(chunk.lengths)]).astype(np.int32))
    columns = [pa.ListArray.from_arrays(offsets, _arrow(values)) for values in (chunk.input_ids, chunk.loss_mask)]
    return pa.record_batch(columns, schema=row_schema())
