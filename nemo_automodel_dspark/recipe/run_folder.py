"""One run per folder: a new run never writes into an `output_dir` / `checkpoint_dir` that holds another run.

A folder holds a run when it has a metrics file with records or a checkpoint. A new run there (no
`checkpoint.restore_from`) is refused with the two ways on; `recipe_args.overwrite_output_dir: true` moves the old
run aside to `<folder>.previous-<time>` (never deletes it). `checkpoint.keep_last_n` prunes old checkpoints only
once a newer one is complete.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.recipe.checkpoint import checkpoints
from nemo_automodel_dspark.recipe.metrics import METRICS_FILE


def held_run(output_dir: Path, ckpt_root: Path) -> str | None:
    """What shows that a run already wrote here (None for a fresh or empty folder)."""
    metrics = output_dir / METRICS_FILE
    if metrics.exists() and metrics.stat().st_size > 0:
        return f"{output_dir} holds the metrics of a run ({METRICS_FILE})"
    found = checkpoints(ckpt_root)
    if found:
        return f"{ckpt_root} holds {len(found)} checkpoint(s) of a run (latest {found[-1].name})"
    return None


def _aside(folder: Path, stamp: str) -> Path:
    target = folder.with_name(f"{folder.name}.previous-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.previous-{stamp}-{n}")
    shutil.move(str(folder), str(target))
    return target


def claim(output_dir: Path, ckpt_root: Path, *, overwrite: bool, is_main: bool) -> list[tuple[Path, Path]]:
    """Refuse a new run into a folder holding one, or (overwrite, rank 0) move the old run aside; returns the moves."""
    held = held_run(output_dir, ckpt_root)
    if held is None:
        return []
    if not overwrite:
        raise ToolError(
            f"{held}; resume it with checkpoint.restore_from: LATEST, or start the new run in a new "
            "recipe_args.output_dir (or set recipe_args.overwrite_output_dir: true to move the old run aside)"
        )
    if not is_main:
        return []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moves = []
    for folder in (output_dir, ckpt_root):  # a checkpoint_dir inside output_dir has moved with it
        if folder.exists():
            moves.append((folder, _aside(folder, stamp)))
    return moves


def prune(ckpt_root: Path, keep_last_n: int | None) -> list[Path]:
    """Delete all but the newest `keep_last_n` complete checkpoints (call only after a newer one is in place)."""
    if not keep_last_n:
        return []
    old = checkpoints(ckpt_root)[:-keep_last_n]
    for path in old:
        shutil.rmtree(path)
    return old
