"""The Python standard library as a small, deterministic code corpus for the tiny target and the demo.

Files are listed in sorted order and split into train / held-out sets by a hash of their relative path, so the
split never depends on the machine's file-system order or on the seed: the two sets are disjoint by construction.
"""

from __future__ import annotations

import functools
import hashlib
import random
import sysconfig
from pathlib import Path

# Test suites and generated tables are large and unlike ordinary code; site-packages is not the stdlib.
_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "lib2to3"}
)
_MAX_FILE_BYTES = 200_000
_HELD_OUT_BUCKETS = 10  # one file in ten (by path hash) is held out

SPLITS = ("train", "held_out")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def stdlib_files() -> tuple[str, ...]:
    """Sorted POSIX paths (relative to the stdlib root) of the usable `.py` files."""
    root = stdlib_root()
    paths = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & _EXCLUDED_DIRS or path.stat().st_size > _MAX_FILE_BYTES:
            continue
        paths.append(rel.as_posix())
    return tuple(sorted(paths))


def file_list_hash() -> str:
    """Hash of the file list and sizes: two machines with the same hash train on the same corpus."""
    root = stdlib_root()
    digest = hashlib.sha256()
    for rel in stdlib_files():
        digest.update(f"{rel}\t{(root / rel).stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def split_of(rel_path: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:4], "big") % _HELD_OUT_BUCKETS
    return "held_out" if bucket == 0 else "train"


def split_files(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return tuple(rel for rel in stdlib_files() if split_of(rel) == split)


@functools.cache
def read_lines(rel_path: str) -> tuple[str, ...]:
    """The file's lines with line endings kept; an undecodable file reads as empty."""
    try:
        text = (stdlib_root() / rel_path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ()
    return tuple(text.splitlines(keepends=True))


def tokenizer_corpus(max_chars: int) -> list[str]:
    """Whole train-split files, every k-th in sorted order, up to about `max_chars` characters in all."""
    files = split_files("train")
    total = sum(len("".join(read_lines(rel))) for rel in files)
    stride = max(1, total // max(max_chars, 1))
    texts: list[str] = []
    used = 0
    for rel in files[::stride]:
        text = "".join(read_lines(rel))
        if used + len(text) > max_chars and texts:
            break
        texts.append(text)
        used += len(text)
    return texts


def _chat_row(rel_path: str, rng: random.Random) -> dict | None:
    """One "continue this code" exchange cut from a random window of the file, or None if the window is blank."""
    lines = read_lines(rel_path)
    n_prompt, n_answer = rng.randint(3, 8), rng.randint(10, 30)
    if len(lines) < n_prompt + n_answer:
        return None
    start = rng.randrange(len(lines) - n_prompt - n_answer + 1)
    prompt = "".join(lines[start : start + n_prompt])
    answer = "".join(lines[start + n_prompt : start + n_prompt + n_answer]).rstrip()
    if not prompt.strip() or len(answer.strip()) < 40:
        return None
    user = f"Continue this Python code from {rel_path}:\n{prompt}"
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def stdlib_chat_rows(split: str, n: int, seed: int) -> list[dict]:
    """`n` OpenAI-format chat rows from one split's files; the same (split, n, seed) always gives the same rows."""
    files = split_files(split)
    rng = random.Random(f"stdlib-chat:{split}:{seed}")
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 20 * n + 1000:  # blank windows are rare; this only guards against an unusable split
            raise RuntimeError(f"could not cut {n} chat rows from the {split!r} stdlib files ({len(files)} files)")
        row = _chat_row(rng.choice(files), rng)
        if row is not None:
            rows.append(row)
    return rows
