"""Checkpoints (SPEC §8): `checkpoint_dir/epoch_{E}_step_{S}/` = servable draft + everything to resume exactly.

Layout: `config.json` + `model.safetensors` (the consolidated draft in the serving dialect), `optimizer.pt`
(consolidated optimizer state), `trainer_state.json` (step, epoch, data position, scheduler, the open metrics
window, and the fields a resumed run must agree on). Rank 0 writes into a hidden temp folder that is renamed into
place once complete, so a crash never leaves a half-written checkpoint that `LATEST` could pick.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from nemo_automodel_dspark.io import atomic_path, atomic_write_bytes, commit_dir
from nemo_automodel_dspark.model.serving import WEIGHTS_NAME, save_draft

TRAINER_STATE, OPTIMIZER_STATE = "trainer_state.json", "optimizer.pt"
COMPAT_FIELDS = ("block_size", "mask_token_id", "target_layer_ids", "target_model_name_or_path")
_STEP_DIR = re.compile(r"^epoch_(\d+)_step_(\d+)$")


def step_dir(root: str | Path, epoch: int, step: int) -> Path:
    return Path(root) / f"epoch_{epoch}_step_{step}"


def find_latest(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, if any."""
    best, best_step = None, -1
    for child in Path(root).glob("epoch_*_step_*"):
        match = _STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).exists() and int(match.group(2)) > best_step:
            best, best_step = child, int(match.group(2))
    return best


def resolve_restore(restore_from: str | None, root: str | Path) -> Path | None:
    """`LATEST` → newest checkpoint (None when there is none yet); a path must hold a complete checkpoint."""
    if restore_from is None:
        return None
    if restore_from == "LATEST":
        return find_latest(root)
    path = Path(restore_from)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"checkpoint.restore_from: {path} is not a complete checkpoint (no {TRAINER_STATE})")
    return path


def check_compatible(path: Path, saved: dict, current: dict) -> None:
    """Refuse a checkpoint whose block_size, mask_token_id, target_layer_ids or target differ from the config."""
    for field in COMPAT_FIELDS:
        if saved.get(field) != current.get(field):
            raise ValueError(
                f"checkpoint {path} was trained with {field}={saved.get(field)!r} but the config has "
                f"{field}={current.get(field)!r}; resume with the same {field} or start a new checkpoint_dir"
            )


def save_checkpoint(
    root: str | Path, epoch: int, step: int, *, draft, model_state: dict, optimizer_state: dict, trainer_state: dict
) -> Path:
    """Rank 0 only: write the whole checkpoint into a temp folder, then rename it into place."""
    final = step_dir(root, epoch, step)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_draft(draft, tmp, state_dict=model_state)
    with atomic_path(tmp / OPTIMIZER_STATE) as optimizer_file:
        torch.save(optimizer_state, optimizer_file)
    atomic_write_bytes(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2).encode())
    if final.exists():
        shutil.rmtree(final)
    commit_dir(tmp, final)
    return final


def load_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def load_weights(path: Path) -> tuple[dict, dict]:
    """(model state, optimizer state) as saved; read on rank 0 only."""
    model_state = load_file(str(path / WEIGHTS_NAME))
    return model_state, torch.load(path / OPTIMIZER_STATE, map_location="cpu", weights_only=True)
