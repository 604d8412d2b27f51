"""The tokenised-row cache: one Arrow file (the IPC stream `datasets` writes) built once per node, memory-mapped by
every rank.

The cache folder is named by a fingerprint of everything the tokens depend on: the data files (path, size,
modification time; a Hub id by name and split), the tokenizer (its serialised vocabulary, merges and special
tokens), the chat template, `seq_length`, `mask_reasoning_content`, `mask_token_id` and `CACHE_FORMAT_VERSION`.
Change any of them and a new cache is built; a restart with the same inputs reopens the old one in milliseconds.

Building (`cache_build`, one pass, `num_proc` forked workers): token-id rows of a JSONL file are tokenised in bulk
(`fast_ids`), every other row by the per-row function of the in-memory loop (`tokenize_row`), which also takes every
row the bulk path cannot prove clean. The bad-row accounting (skips per reason with the first line number,
truncations, rows used as token ids, empty answers) is computed from every row's number, reason and flags and stored
beside the table, so a reopened cache reports exactly what the loop would. The first process to
take the folder's file lock builds (into a temporary folder, renamed into place when complete); the others block on
the lock and then open what it built. A cache folder that does not open, or whose table holds another number of rows
than its meta.json says (a build cut short by a power loss: the table is not fsynced), is removed and built again,
with a warning.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_automodel_dspark.data.cache_build import build_rows
from nemo_automodel_dspark.data.chat import EMPTY_ANSWER, MASK_TOKEN_HIT, TOKEN_IDS, TRUNCATED, RowOptions
from nemo_automodel_dspark.io import atomic_write_json, commit_dir, temp_dir_for

CACHE_FORMAT_VERSION = 4  # bump whenever the table's layout, the tokenisation rules or a skip reason change
_META = "meta.json"
_TABLE = "rows.arrow"


@dataclass
class CacheReport:
    """The accounting of one tokenisation, as `DSparkChatDataset.report` reads it."""

    unit: str  # "line" (JSONL) or "row"
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows, in order of first occurrence
    first_skipped: dict[str, int] = field(default_factory=dict)  # reason -> first line/row number
    num_truncated: int = 0
    num_token_ids: int = 0
    num_empty_answers: int = 0
    mask_token_first: int | None = None  # first line/row whose supervised tokens hold mask_token_id


def default_cache_root() -> str:
    """`$DSPARK_CACHE_DIR`, else `$XDG_CACHE_HOME/nemo_automodel_dspark`, else `~/.cache/nemo_automodel_dspark`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("DSPARK_CACHE_DIR") or os.path.join(base, "nemo_automodel_dspark")


def _data_signature(path_or_id: str, split: str) -> list[Any]:
    """Path, size and mtime of every data file (a folder: all its files); a Hub id by name and split."""
    path = os.path.abspath(os.path.expanduser(path_or_id))
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    else:
        return ["hub", path_or_id, split]
    return [split] + [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def _tokenizer_signature(tokenizer: Any) -> list[Any]:
    """What decides the ids: the serialised fast tokenizer (vocabulary, merges, normaliser), its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serial = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.eos_token_id, tokenizer.pad_token_id, sorted(tokenizer.all_special_ids), len(tokenizer)]
    return [type(tokenizer).__name__, hashlib.sha256(serial.encode()).hexdigest(), special]


def cache_fingerprint(path_or_id: str, split: str, tokenizer: Any, options: RowOptions) -> str:
    """Hex digest naming the cache folder of these inputs (module docstring)."""
    key = {
        "version": CACHE_FORMAT_VERSION,
        "data": _data_signature(path_or_id, split),
        "tokenizer": _tokenizer_signature(tokenizer),
        "chat_template": options.template,
        "seq_length": options.seq_length,
        "mask_reasoning_content": options.mask_reasoning_content,
        "mask_token_id": options.mask_token_id,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the block (the other local processes wait on it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _account(numbers: list[int], errors: list[str], flags: list[int], unit: str) -> CacheReport:
    """The loop's accounting from the per-row columns: skips by reason in first-seen order, counts of used rows."""
    report = CacheReport(unit=unit)
    flag_array = np.asarray(flags, dtype=np.int64)
    used = np.asarray([not e for e in errors], dtype=bool)
    for number, error in zip(numbers, errors, strict=True):
        if error:
            report.skipped[error] = report.skipped.get(error, 0) + 1
            report.first_skipped.setdefault(error, number)

    def count(bit: int) -> int:
        return int(((flag_array & bit) != 0)[used].sum())

    report.num_truncated, report.num_token_ids = count(TRUNCATED), count(TOKEN_IDS)
    report.num_empty_answers = count(EMPTY_ANSWER)
    hits = np.flatnonzero(((flag_array & MASK_TOKEN_HIT) != 0) & used)
    report.mask_token_first = int(numbers[hits[0]]) if len(hits) else None
    return report


def _build(
    path_or_id: str, split: str, tokenizer: Any, options: RowOptions, num_proc: int, tmp: Path, show_progress: bool
) -> None:
    """Tokenise every row into `tmp/rows.arrow` (used rows only) and write `tmp/meta.json` (the accounting)."""
    numbers, errors, flags = build_rows(path_or_id, split, tokenizer, options, num_proc, tmp / _TABLE, show_progress)
    unit = "line" if path_or_id.endswith(".jsonl") else "row"
    report = _account(numbers, errors, flags, unit)
    atomic_write_json(tmp / _META, {"report": report.__dict__, "rows": len(numbers) - sum(map(bool, errors))})


class ArrowRows:
    """Rows of a cache table, memory-mapped: item i → (input_ids [L] long, loss_mask [L] long)."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        batches = list(pa.ipc.open_stream(pa.memory_map(str(path))))  # zero-copy views of the mapped file
        self._ids = [_view(b.column(0).values, np.int32) for b in batches]  # per batch: [T_b]
        self._mask = [_view(b.column(1).values, np.int8) for b in batches]  # per batch: [T_b]
        self._offsets = [_view(b.column(0).offsets, np.int32) for b in batches]  # per batch: [rows_b + 1]
        self._first = np.cumsum([0] + [b.num_rows for b in batches])  # [batches + 1] first row of each batch

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        batch = int(np.searchsorted(self._first, index, side="right")) - 1
        row = index - int(self._first[batch])
        start, end = self._offsets[batch][row : row + 2].tolist()
        ids = self._ids[batch][start:end].astype(np.int64)  # one copy, out of the mapped file
        return torch.from_numpy(ids), torch.from_numpy(self._mask[batch][start:end].astype(np.int64))

    def lengths(self) -> list[int]:
        return np.concatenate([np.diff(o) for o in self._offsets] or [np.zeros(0, np.int64)]).tolist()


def _view(array: Any, dtype: type) -> np.ndarray:
    """A numpy view of a null-free Arrow array's values (`to_numpy` would import pandas: seconds, cold)."""
    size = np.dtype(dtype).itemsize
    return np.frombuffer(array.buffers()[1], dtype, len(array), array.offset * size)


def open_cache(
    path_or_id: str,
    split: str,
    tokenizer: Any,
    options: RowOptions,
    *,
    root: str,
    num_proc: int,
    show_progress: bool = False,
) -> tuple[ArrowRows, CacheReport]:
    """Open the cache of these inputs, building it first if no process has (under the folder's file lock). A cache
    folder that does not open (`_damage`: a build cut short by a power loss, a file removed or overwritten) is
    removed and built again, said in one warning."""
    final = Path(root) / cache_fingerprint(path_or_id, split, tokenizer, options)
    opened = _open(final)
    if isinstance(opened, str):
        with _file_lock(final.with_suffix(".lock")):
            opened = _open(final)  # another process may have built it while this one waited
            if isinstance(opened, str):
                if final.exists():
                    warnings.warn(f"tokenised cache {final} is damaged ({opened}); building it again", stacklevel=2)
                    shutil.rmtree(final)
                tmp = temp_dir_for(final)  # one builder per fingerprint (the lock): a killed build's temp goes here
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                try:
                    _build(path_or_id, split, tokenizer, options, num_proc, tmp, show_progress)
                    commit_dir(tmp, final)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                opened = _open(final)
                if isinstance(opened, str):
                    raise RuntimeError(f"the tokenised cache just built in {final} does not open: {opened}")
    return opened


def _open(final: Path) -> tuple[ArrowRows, CacheReport] | str:
    """The cache in folder `final`, or why it cannot be used: its meta.json must parse, and its table must read as
    Arrow record batches holding the number of rows meta.json states (a build cut short by a power loss, or a file
    removed or overwritten, fails this)."""
    try:
        meta = json.loads((final / _META).read_text())
        rows, report, expected = ArrowRows(final / _TABLE), CacheReport(**meta["report"]), int(meta["rows"])
    except (OSError, ValueError, KeyError, TypeError) as err:  # Arrow's errors are OSError or ValueError
        return f"{type(err).__name__}: {err}"
    return (rows, report) if len(rows) == expected else f"{len(rows)} rows in {_TABLE}, {expected} in {_META}"
