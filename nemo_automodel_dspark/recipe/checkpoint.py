"""Checkpoints (SPEC §8): `checkpoint_dir/epoch_{E}_step_{S}/` = servable draft + everything to resume exactly.

Layout: `config.json` + `model.safetensors` (the consolidated draft in the serving dialect), `optimizer.pt`
(consolidated optimizer state), `trainer_state.json` (step, epoch, data position, scheduler, the open metrics
window, and the fields a resumed run must agree on), and `manifest.json` (size and SHA-256 of every other file),
written last. Rank 0 writes into a hidden temp folder that is renamed into place once complete, so a crash never
leaves a half-written checkpoint that `LATEST` could pick; a checkpoint damaged later (a truncated copy, a bad disk)
fails its manifest check and `LATEST` falls back to the previous complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.io import commit_dir, fsync_dir, temp_dir_for
from nemo_automodel_dspark.manifest import MANIFEST, manifest_bytes, verify
from nemo_automodel_dspark.model.serving import WEIGHTS_NAME, save_draft

TRAINER_STATE, OPTIMIZER_STATE = "trainer_state.json", "optimizer.pt"
_STEP_DIR = re.compile(r"^epoch_(\d+)_step_(\d+)$")


def step_dir(root: str | Path, epoch: int, step: int) -> Path:
    return Path(root) / f"epoch_{epoch}_step_{step}"


def checkpoints(root: str | Path) -> list[Path]:
    """Every checkpoint folder under `root` that was renamed into place (i.e. completely written), oldest first."""
    found = []
    for child in Path(root).glob("epoch_*_step_*"):
        match = _STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).exists():
            found.append((int(match.group(2)), child))
    return [path for _, path in sorted(found)]


def step_of(path: Path) -> int:
    """The step of a checkpoint folder `epoch_{E}_step_{S}`."""
    match = _STEP_DIR.match(path.name)
    assert match, path
    return int(match.group(2))


def find_latest(root: str | Path, warn: Callable[[str], None] | None = None, before: int | None = None) -> Path | None:
    """The newest checkpoint under `root` (of a step < `before`, when given) that passes its manifest check;
    damaged ones are skipped with a warning."""
    for path in reversed(checkpoints(root)):
        if before is not None and step_of(path) >= before:
            continue
        damage = verify(path) if warn is not None else None
        if damage is None or warn is None:
            return path
        warn(f"checkpoint {path} is damaged ({damage}); falling back to the previous complete checkpoint")
    return None


def resolve_restore(restore_from: str | None, root: str | Path, warn: Callable[[str], None]) -> Path | None:
    """`LATEST` → newest sound checkpoint (None when there is none yet); a path must hold a sound checkpoint."""
    if restore_from is None:
        return None
    if restore_from == "LATEST":
        return find_latest(root, warn)
    path = Path(restore_from)
    if not (path / TRAINER_STATE).exists():
        raise ToolError(
            f"checkpoint.restore_from: {path} is not a complete checkpoint (no {TRAINER_STATE}); pass a folder "
            "epoch_E_step_S under checkpoint_dir, or LATEST"
        )
    damage = verify(path)
    if damage is not None:
        raise ToolError(f"checkpoint.restore_from: {path} is damaged ({damage}); pass an earlier checkpoint")
    return path


def _write_synced(path: Path, write: Callable) -> None:
    """Open `path` in Python (so a full disk is an OSError naming ENOSPC), let `write(f)` fill it, fsync it.

    Not `io.atomic_path`: the whole checkpoint folder is the unit that is renamed into place.
    """
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file in `folder`; written last, so its presence means complete."""
    data = manifest_bytes(folder)
    _write_synced(folder / MANIFEST, lambda f: f.write(data))


def save_checkpoint(
    root: str | Path, epoch: int, step: int, *, draft, model_state: dict, optimizer_state: dict, trainer_state: dict
) -> Path:
    """Rank 0 only: write the whole checkpoint into a temp folder, then rename it into place.

    On any failure (a full disk included) the temp folder is removed and the earlier checkpoints stay as they were.
    """
    final = step_dir(root, epoch, step)
    tmp = temp_dir_for(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_draft(draft, tmp, state_dict=model_state)
        _write_synced(tmp / OPTIMIZER_STATE, lambda f: torch.save(optimizer_state, f))
        _write_synced(tmp / TRAINER_STATE, lambda f: f.write(json.dumps(trainer_state, indent=2).encode()))
        write_manifest(tmp)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    commit_dir(tmp, final)
    return final


def load_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def load_weights(path: Path) -> tuple[dict, dict]:
    """(model state, optimizer state) as saved; a file that cannot be read is a ToolError naming it."""
    readers = (
        (WEIGHTS_NAME, lambda file: load_file(str(file))),
        (OPTIMIZER_STATE, lambda file: torch.load(file, map_location="cpu", weights_only=True)),
    )
    loaded = []
    for name, read in readers:
        try:
            loaded.append(read(path / name))
        except Exception as err:
            raise ToolError(f"checkpoint {path}: {name} cannot be read ({err}); pass an earlier checkpoint") from err
    return loaded[0], loaded[1]
