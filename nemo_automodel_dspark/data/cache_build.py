"""Building the tokenised cache in one pass: rows read in chunks, tokenised by `num_proc` processes, written in
order as the record batches of one Arrow IPC stream file (the format `datasets` saves; `Dataset.from_file` reads it).

A JSONL file is cut into chunks of whole lines (`chunk_bytes`). `num_proc - 1` forked workers and the parent
tokenise them; a worker is sent only a chunk's byte range, reads it itself and writes the chunk's tokens to a
file the parent reads and removes, so nothing large goes through the pool's pipes and the parent, which shares the
cores with the workers, spends its time tokenising too. In a chunk, the token-id rows go through the bulk path
(`fast_ids`); every row it does not prove clean, and every text row, goes through `chat.tokenize_row`, the per-row
function of the in-memory loop. Other sources (JSON, parquet, `datasets` folders, Hub ids) are read by
`sources.open_rows` and tokenised row by row. Each chunk also returns the number, skip reason ("" when used) and
flags of every row, from which the parent computes the loop's accounting.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, count, islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nemo_automodel_dspark.data.chat import RowOptions, RowTokens, tokenize_row
from nemo_automodel_dspark.data.fast_ids import IdContext, id_context, tokenize_id_lines
from nemo_automodel_dspark.data.sources import RowError, open_rows, parse_line

CHUNK_BYTES = 1 << 20  # JSONL bytes per chunk at most (a few hundred token-id rows)
MIN_CHUNK_BYTES = 1 << 16  # ... and at least, unless CHUNK_BYTES is smaller (below it the per-chunk costs show)
CHUNKS_PER_PROCESS = 16  # a smaller file gets smaller chunks: text rows cost ~30x token-id rows per byte, and the
# last chunk of a few large ones would leave the other processes idle
CHUNK_ROWS = 1024  # rows per chunk of the other sources
PROGRESS_MIN_BYTES = 16 << 20  # a progress bar for a larger JSONL file (~2,000 token-id rows or more) ...
PROGRESS_MIN_ROWS = 1000  # ... or more rows of another source


@dataclass(frozen=True)
class _State:
    """What every chunk needs (inherited by the forked workers, never pickled)."""

    tokenizer: Any
    options: RowOptions
    ids: IdContext | None


@dataclass
class Chunk:
    """One chunk's rows: accounting of all of them, tokens of the used ones back to back."""

    numbers: list[int]  # every row's row number; JSONL: its line number within the chunk (from 1)
    errors: list[str]  # its skip reason, "" when used
    flags: list[int]  # its RowTokens.flags (0 when skipped)
    input_ids: np.ndarray  # [T] int32 (empty while spilled)
    loss_mask: np.ndarray  # [T] int8 (empty while spilled)
    lengths: np.ndarray  # [used rows] int64
    lines: int = 0  # JSONL: the chunk's lines, blank ones included (the next chunk's numbers start after them)
    spilled: str | None = None  # the part file holding input_ids then loss_mask, from a worker
    done: int = 0  # the progress it makes: JSONL bytes, or rows of the other sources


def chunk_bytes(size: int, num_proc: int) -> int:
    """Bytes per JSONL chunk for a file of `size` bytes: CHUNKS_PER_PROCESS chunks per process where that keeps
    them between MIN_CHUNK_BYTES and CHUNK_BYTES."""
    return min(CHUNK_BYTES, max(size // (CHUNKS_PER_PROCESS * max(1, num_proc)), MIN_CHUNK_BYTES))


def jsonl_ranges(path: str, chunk: int) -> Iterator[tuple[str, int, int]]:
    """(path, offset, size) of chunks of whole lines over the file: each holds lines until it reaches `chunk` bytes
    (so a line longer than that is one chunk), cut where a line ends (a `\\n`, as `jsonl_lines` counts lines)."""
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        start = 0
        while start < end:
            f.seek(start + chunk - 1)
            f.readline()  # to the end of the line holding the chunk's last wanted byte
            stop = min(f.tell(), end)
            yield path, start, stop - start
            start = stop


def _lines(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """((line number within the chunk, line) of its non-blank lines, number of lines)."""
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the chunk ends with its last line's newline
        lines.pop()
    return [(i, line) for i, line in enumerate(lines, start=1) if line.strip()], len(lines)


def _row_chunks(rows: Iterator[tuple[int, Any]]) -> Iterator[list[tuple[int, Any]]]:
    while chunk := list(islice(rows, CHUNK_ROWS)):
        yield chunk


def _tokenize_jsonl(state: _State, item: tuple[str, int, int]) -> Chunk:
    path, offset, size = item
    with open(path, "rb") as f:
        f.seek(offset)
        numbered, count = _lines(f.read(size))
    lines = [line for _, line in numbered]
    fast = tokenize_id_lines(lines, state.ids) if state.ids is not None else [None] * len(lines)
    pairs = zip(numbered, fast, strict=True)
    chunk = _collect(state, [(number, tokens if tokens is not None else line) for (number, line), tokens in pairs])
    chunk.lines, chunk.done = count, size
    return chunk


def _tokenize_rows(state: _State, rows: list[tuple[int, Any]]) -> Chunk:
    chunk = _collect(state, rows)
    chunk.done = len(rows)
    return chunk


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
    return Chunk(numbers, errors, flags, ids.astype(np.int32, copy=False), mask.astype(np.int8, copy=False), lengths)


_WORKER: tuple[_State, Path, Iterator[int]] | None = None  # a worker's state, the parts folder, its chunk counter


def _init_worker(state: _State, parts: Path) -> None:
    global _WORKER
    _WORKER = (state, parts, count())


def _in_worker(task: tuple[Callable[[_State, Any], Chunk], Any]) -> Chunk:
    """The chunk, its tokens written to a part file (read and removed by the parent) instead of sent back through
    the pool's pipe: so the parent spends no time unpickling them, and the parts hold only the chunks in flight."""
    assert _WORKER is not None
    state, parts, counter = _WORKER
    chunk = task[0](state, task[1])
    part = parts / f"{os.getpid()}-{next(counter)}.bin"
    with open(part, "wb") as f:
        f.write(chunk.input_ids.data)
        f.write(chunk.loss_mask.data)
    chunk.spilled = str(part)
    chunk.input_ids, chunk.loss_mask = chunk.input_ids[:0], chunk.loss_mask[:0]
    return chunk


def _unspill(chunk: Chunk) -> Chunk:
    if chunk.spilled is not None:
        data = Path(chunk.spilled).read_bytes()
        os.unlink(chunk.spilled)
        tokens = len(data) // 5  # int32 ids, then int8 mask
        chunk.input_ids = np.frombuffer(data, np.int32, tokens)
        chunk.loss_mask = np.frombuffer(data, np.int8, tokens, offset=4 * tokens)
        chunk.spilled = None
    return chunk


def _ordered(
    state: _State, fn: Callable[[_State, Any], Chunk], items: Iterator[Any], num_proc: int, parts: Path
) -> Iterator[Chunk]:
    """fn over the items, results in order. With num_proc > 1 and more than one item, num_proc - 1 forked workers
    take items, at most two each in flight (their tokens come through files in `parts`), and this process
    takes an item itself whenever they are all busy: num_proc processes work, none waits on the others."""
    first = list(islice(items, 2))
    if num_proc <= 1 or len(first) < 2:
        yield from (fn(state, item) for item in chain(first, items))
        return
    gc.freeze()  # the parent's objects out of the workers' collections: fewer copy-on-write page copies
    try:
        pool = multiprocessing.get_context("fork").Pool(num_proc - 1, _init_worker, (state, parts))
    finally:
        gc.unfreeze()
    workers = list(pool._pool)  # type: ignore[attr-defined]  # a worker exits only when the pool closes
    try:
        pending: deque = deque()  # in item order: a worker's AsyncResult, or a Chunk made here
        for item in chain(first, items):
            if sum(not isinstance(p, Chunk) and not p.ready() for p in pending) < 2 * (num_proc - 1):
                pending.append(pool.apply_async(_in_worker, ((fn, item),)))
            else:
                pending.append(fn(state, item))
            while pending and (isinstance(pending[0], Chunk) or pending[0].ready() or len(pending) > 4 * num_proc):
                yield _result(pending.popleft(), workers)
        while pending:
            yield _result(pending.popleft(), workers)
    except BaseException:  # an error in a chunk, or the caller stopped early
        pool.terminate()
        raise
    pool.close()
    pool.join()


def _result(pending: Any, workers: list[Any]) -> Chunk:
    """A chunk made here, or a worker's once it is done. A worker killed mid-chunk (by the kernel's OOM killer, say)
    never answers, and the pool would wait for it forever: that is an error within a second or so instead."""
    while not isinstance(pending, Chunk):
        try:
            return _unspill(pending.get(timeout=1.0))
        except multiprocessing.TimeoutError:
            dead = [w for w in workers if w.exitcode is not None]
            if dead:
                raise RuntimeError(
                    f"a worker building the tokenised cache (pid {dead[0].pid}) died with exit code "
                    f"{dead[0].exitcode} (killed for memory? lower recipe_args.tokenize_num_proc); nothing was kept"
                ) from None
    return pending


def build_rows(
    path_or_id: str,
    split: str,
    tokenizer: Any,
    options: RowOptions,
    num_proc: int,
    out: Path,
    show_progress: bool = False,
) -> tuple[list[int], list[str], list[int]]:
    """Write the used rows to `out` (Arrow IPC stream: input_ids list<int32>, loss_mask list<int8>) and return
    every row's (number, skip reason, flags) for the accounting. The workers' part files go in a folder beside
    `out`, removed at the end. With `show_progress`, a bar over the file's bytes (or the rows) once the input is
    large enough to take a while. `num_proc` is capped at the CPUs this process may run on (more only compete)."""
    import pyarrow as pa

    num_proc = max(1, min(num_proc, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    state = _State(tokenizer, options, id_context(tokenizer, options))
    path = os.path.expanduser(path_or_id)
    parts = out.with_name(f".{out.name}.parts")
    parts.mkdir(exist_ok=True)
    if os.path.isfile(path) and path_or_id.endswith(".jsonl"):
        total, unit, large = os.path.getsize(path), "B", PROGRESS_MIN_BYTES
        chunks = _ordered(state, _tokenize_jsonl, jsonl_ranges(path, chunk_bytes(total, num_proc)), num_proc, parts)
    else:
        total, rows = open_rows(path_or_id, split=split)
        unit, large = " rows", PROGRESS_MIN_ROWS
        chunks = _ordered(state, _tokenize_rows, _row_chunks(rows), num_proc, parts)
    numbers: list[int] = []
    errors: list[str] = []
    flags: list[int] = []
    lines_before = 0  # JSONL: lines of the chunks so far (a chunk numbers its lines from 1)
    bar = tqdm(
        total=total, unit=unit, unit_scale=True, disable=not (show_progress and total > large),
        desc=f"tokenising {path_or_id} into the cache ({num_proc} processes)",
    )  # fmt: skip
    try:
        with bar, pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, row_schema()) as writer:
            for chunk in chunks:
                numbers += [lines_before + n for n in chunk.numbers] if lines_before else chunk.numbers
                lines_before += chunk.lines
                errors += chunk.errors
                flags += chunk.flags
                if len(chunk.lengths):
                    writer.write_batch(_batch(chunk))
                bar.update(chunk.done)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
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
