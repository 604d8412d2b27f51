"""A folder's manifest: the size and SHA-256 of every other file, in `manifest.json`, written last.

Checkpoints carry one (recipe/checkpoint.py writes it; `LATEST` skips a folder that fails `verify`). A tool that
edits a file of a saved draft in place (`dspark calibrate` sets `confidence_temperatures` in its `config.json`)
goes through `rewrite_file`, so a checkpoint that was intact stays intact and resumable.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nemo_automodel_dspark.io import atomic_write_bytes

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record(path: Path) -> dict:
    """One file's entry: {"size", "sha256"}."""
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def manifest_bytes(folder: Path) -> bytes:
    """The manifest of every file in `folder` (the manifest itself excluded), as written to `MANIFEST`."""
    files = {p.name: record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    return _encode(files)


def _encode(files: dict) -> bytes:
    return json.dumps({"files": files}, indent=2).encode()


def verify(path: Path) -> str | None:
    """None when every file listed in the manifest has its recorded size and checksum, else what is wrong.

    A folder without a manifest (checkpoints written before manifests existed, a draft saved by hand) is trusted.
    """
    manifest = path / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{manifest} is unreadable: {err}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{file} has {size} bytes, the manifest says {expected['size']}"
        if sha256(file) != expected["sha256"]:
            return f"{file} does not match its checksum"
    return None


def rewrite_file(folder: str | Path, name: str, data: bytes) -> None:
    """Replace `folder/name` with `data` crash-consistently and keep the folder's manifest true.

    Only a manifest that verified before the change is updated: a damaged checkpoint stays detectably damaged. A kill
    between the two writes leaves a checkpoint that fails `verify` (LATEST then falls back), never a wrong record.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    intact = manifest.exists() and verify(folder) is None
    atomic_write_bytes(folder / name, data)
    if intact:
        files = json.loads(manifest.read_text())["files"]
        files[name] = record(folder / name)
        atomic_write_bytes(manifest, _encode(files))
