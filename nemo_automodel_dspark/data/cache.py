"""The tokenised-row cache: a `datasets` Arrow table built once per node and memory-mapped by every rank.

The cache folder is named by a fingerprint of everything the tokens depend on: the data files (path, size,
modification time; a Hub id by name and split), the tokenizer (its serialised vocabulary, merges and special
tokens), the chat template, `seq_length`, `mask_reasoning_content`, `mask_token_id` and `CACHE_FORMAT_VERSION`.
Change any of them and a new cache is built; a restart with the same inputs reopens the old one in milliseconds.

Building: the rows are read by the one reader (`sources.open_rows`), tokenised with `datasets.map(num_proc=…)` by
the same per-row function the in-memory loop uses (`tokenize_row`), and the bad-row accounting (skips per reason with
the first line number, truncations, rows used as token ids, empty answers) is computed from per-row columns and
stored beside the table, so a reopened cache reports exactly what a fresh tokenisation would. The first process to
take the folder's file lock builds (into a temporary folder, renamed into place when complete); the others block on
the lock and then open what it built.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_automodel_dspark.data.chat import EMPTY_ANSWER, MASK_TOKEN_HIT, TOKEN_IDS, TRUNCATED, RowOptions, tokenize_row
from nemo_automodel_dspark.data.sources import RowError, jsonl_lines, open_rows, parse_line
from nemo_automodel_dspark.io import atomic_write_json, commit_dir, temp_dir_for

CACHE_FORMAT_VERSION = 1  # bump whenever the table's layout or the tokenisation rules change
_META = "meta.json"
_TABLE = "rows"
_ROW_ERROR = "__dspark_row_error__"  # a row the reader could not parse, carried to the workers


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


def _raw_rows(path_or_id: str, split: str) -> Iterator[dict[str, Any]]:
    """The source's rows as {number, line}: a JSONL line as read (parsed by the workers), other rows as JSON."""
    if _raw_line(path_or_id):
        for number, line in jsonl_lines(os.path.expanduser(path_or_id)):
            yield {"number": number, "line": line}
        return
    _, rows = open_rows(path_or_id, split=split)
    for number, row in rows:
        yield {"number": number, "line": _as_line(row)}


def _as_line(row: Any) -> bytes:
    if isinstance(row, RowError):
        return json.dumps({_ROW_ERROR: row.reason}).encode()
    return json.dumps(row, ensure_ascii=False, default=str).encode()


def _raw_line(path_or_id: str) -> bool:
    return os.path.isfile(os.path.expanduser(path_or_id)) and path_or_id.endswith(".jsonl")


def _tokenize_batch(batch: dict[str, list], *, tokenizer: Any, options: RowOptions) -> dict[str, list]:
    """`datasets.map` body: one output row per input row, failed rows kept (empty ids) with their reason."""
    out: dict[str, list] = {key: [] for key in ("input_ids", "loss_mask", "error", "flags")}
    for line in batch["line"]:
        row = parse_line(line)
        if isinstance(row, dict) and _ROW_ERROR in row:
            row = RowError(row[_ROW_ERROR])
        ids, mask, error, flags = np.zeros(0, np.int32), np.zeros(0, np.int8), "", 0
        try:
            if isinstance(row, RowError):
                raise row
            result = tokenize_row(row, tokenizer, options)
            ids, mask = result.input_ids, result.loss_mask
            flags = result.flags
        except RowError as err:
            error = err.reason
        out["input_ids"].append(ids)
        out["loss_mask"].append(mask)
        out["error"].append(error)
        out["flags"].append(flags)
    return out


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


def _build(path_or_id: str, split: str, tokenizer: Any, options: RowOptions, num_proc: int, tmp: Path) -> None:
    """Tokenise every row into `tmp/rows` (used rows only) and write `tmp/meta.json` (the accounting)."""
    import datasets

    raw = datasets.Dataset.from_generator(
        _raw_rows, gen_kwargs={"path_or_id": path_or_id, "split": split}, cache_dir=str(tmp / "build")
    )
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "loss_mask": datasets.Sequence(datasets.Value("int8")),
            "error": datasets.Value("string"),
            "flags": datasets.Value("int32"),
        }
    )
    tokenized = raw.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 and len(raw) > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "options": options},
        remove_columns=["line"],
        features=datasets.Features({"number": datasets.Value("int64"), **features}),
        new_fingerprint="dspark-tokenize",
        desc=f"tokenising {path_or_id}",
    )
    columns = tokenized.select_columns(["number", "error", "flags"]).to_dict()
    unit = "line" if path_or_id.endswith(".jsonl") else "row"
    report = _account(columns["number"], columns["error"], columns["flags"], unit)
    used = [i for i, error in enumerate(columns["error"]) if not error]
    rows = tokenized.select(used).select_columns(["input_ids", "loss_mask"])
    rows.save_to_disk(str(tmp / _TABLE))
    del raw, tokenized, rows
    shutil.rmtree(tmp / "build", ignore_errors=True)
    atomic_write_json(tmp / _META, {"report": report.__dict__, "rows": len(used)})


class ArrowRows:
    """Rows of a cache table, memory-mapped: item i → (input_ids [L] long, loss_mask [L] long)."""

    def __init__(self, folder: Path) -> None:
        import datasets

        table = datasets.load_from_disk(str(folder)).data.table  # memory-mapped Arrow files
        self._ids, self._mask = table.column("input_ids"), table.column("loss_mask")

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(self._ids[index].values, dtype=np.int64)  # one copy, out of the mapped file
        mask = np.asarray(self._mask[index].values, dtype=np.int64)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def lengths(self) -> list[int]:
        import pyarrow.compute as pc

        return pc.list_value_length(self._ids).to_pylist()


def open_cache(
    path_or_id: str, split: str, tokenizer: Any, options: RowOptions, *, root: str, num_proc: int
) -> tuple[ArrowRows, CacheReport]:
    """Open the cache of these inputs, building it first if no process has (under the folder's file lock)."""
    final = Path(root) / cache_fingerprint(path_or_id, split, tokenizer, options)
    if not (final / _META).exists():
        with _file_lock(final.with_suffix(".lock")):
            if not (final / _META).exists():
                tmp = temp_dir_for(final)  # one builder per fingerprint (the lock): a killed build's temp goes here
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                try:
                    _build(path_or_id, split, tokenizer, options, num_proc, tmp)
                    commit_dir(tmp, final)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((final / _META).read_text())
    return ArrowRows(final / _TABLE), CacheReport(**meta["report"])
