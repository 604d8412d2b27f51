"""Crash-consistent file writes: every file this package writes goes through here.

A write goes to a temporary name in the destination folder, is flushed and fsynced, renamed over the destination,
and the folder is fsynced so the rename itself survives a power loss. A reader therefore sees the old file or the
new one, never a prefix; a crash leaves at most a hidden temp, never a truncated `NAME`.

Temp names, the only ones any writer of this package leaves behind when killed: `.NAME.<12 hex digits>` (a file,
`atomic_path`) and `.NAME.tmp` (a folder filled and then renamed into place by `commit_dir`, see `temp_dir_for`).
`remove_leftover_temps` deletes them; the owner of a folder calls it before writing there again (a training run
at start-up, `save_draft`, `export`, `calibrate`, `regenerate`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the entries of `directory` (a rename, a new file) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}$")  # `_new_temp`
_TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.tmp$")  # `temp_dir_for`


def temp_dir_for(final: str | os.PathLike) -> Path:
    """The hidden folder a whole-folder write fills before `commit_dir` renames it to `final`."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp")


def leftover_temps(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """The temps under `folder` (not recursive) that writers of this package left when interrupted; with `names`,
    only those of these destination names. A missing folder has none."""
    folder, wanted = Path(folder), None if names is None else set(names)
    if not folder.is_dir():
        return []
    found = []
    for child in sorted(folder.iterdir()):
        pattern = _TEMP_DIR if child.is_dir() and not child.is_symlink() else _TEMP_FILE
        match = pattern.match(child.name)
        if match and (wanted is None or match.group("name") in wanted):
            found.append(child)
    return found


def remove_leftover_temps(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Delete `leftover_temps(folder, names)`; returns what was removed. Call only on a folder this process owns:
    another live writer's temp would go too."""
    removed = []
    for path in leftover_temps(folder, names):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _new_temp(path: Path) -> Path:
    """An empty, new `.NAME.<random>` beside `path`, with the permissions a plain `open(path, "w")` would give
    (0666 less the umask: a served draft must stay readable by other users; `mkstemp` would make it 0600)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"cannot create a temp file beside {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on a clean exit it is fsynced and renamed over `path` (folder fsynced).

    For writers that want a file name (`safetensors.save_file`, `torch.save`, `save_pretrained` of one file). On an
    exception the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data`, crash-consistently."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with UTF-8 `text`, crash-consistently."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    """Replace `path` with `value` as indented JSON (non-ASCII kept as is) and a final newline."""
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Replace `path` with one JSON object per line, streamed (the records are never all held as text)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def append_line_durably(path: str | os.PathLike, line: str) -> None:
    """Append one line (a log record) and fsync it: a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file under `directory` and the folders themselves: before a folder written by a third-party
    writer (`save_pretrained`) is renamed into place."""
    for root, _, files in os.walk(os.fspath(directory)):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def commit_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a fully written folder `tmp` into place as `final` (which must not exist) and fsync the parent."""
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)
