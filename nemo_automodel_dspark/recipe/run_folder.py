"""The files a training run owns (`RunFiles`), and one run per folder.

A new run never writes into an `output_dir` / `checkpoint_dir` that holds another run.

A folder holds a run when it has a metrics file with records or a checkpoint. A new run there (no
`checkpoint.restore_from`) is refused with the two ways on; `recipe_args.overwrite_output_dir: true` moves the old
run aside to `<folder>.previous-<time>` (never deletes it). `checkpoint.keep_last_n` prunes old checkpoints only
once a newer one is complete.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from nemo_automodel_dspark.errors import ToolError, require_output_dir
from nemo_automodel_dspark.io import remove_leftover_temps
from nemo_automodel_dspark.recipe import checkpoint as ckpt
from nemo_automodel_dspark.recipe.checkpoint import checkpoints
from nemo_automodel_dspark.recipe.config import CheckpointConfig
from nemo_automodel_dspark.recipe.guards import disk_full_message, is_disk_full
from nemo_automodel_dspark.recipe.metrics import METRICS_FILE, MetricsWriter


def held_run(output_dir: Path, ckpt_root: Path | None) -> str | None:
    """What shows that a run already wrote here (None for a fresh or empty folder); `ckpt_root` None: a run that
    writes no checkpoints, which neither claims nor moves a checkpoint folder."""
    metrics = output_dir / METRICS_FILE
    if metrics.exists() and metrics.stat().st_size > 0:
        return f"{output_dir} holds the metrics of a run ({METRICS_FILE})"
    found = checkpoints(ckpt_root) if ckpt_root is not None else []
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


def claim(output_dir: Path, ckpt_root: Path | None, *, overwrite: bool, is_main: bool) -> list[tuple[Path, Path]]:
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
        if folder is not None and folder.exists():
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


class RunFiles:
    """A run's metrics log and checkpoints. Writes are crash-consistent; a full disk comes back as the one line
    the run stops with (see `TrainDSparkRecipe._stop_if`), with nothing half-written left behind."""

    def __init__(self, output_dir: str, checkpoint: CheckpointConfig, is_main: bool, log: Callable[[str], None]):
        self.output_dir = Path(output_dir)
        self.ckpt_root = Path(checkpoint.checkpoint_dir or self.output_dir / "checkpoints")
        self.checkpoint, self.is_main, self.log = checkpoint, is_main, log
        self.metrics: MetricsWriter | None = None

    def claim(self, overwrite: bool) -> None:
        """Before anything is written: the run's folders must be writable; refuse a folder holding another run, or
        move that run aside (rank 0)."""
        require_output_dir(self.output_dir, "recipe_args.output_dir")
        if self.checkpoint.enabled:
            require_output_dir(self.ckpt_root, "checkpoint.checkpoint_dir")
        if self.checkpoint.restore_from is None:
            for old, new in claim(self.output_dir, self._own_ckpt_root(), overwrite=overwrite, is_main=self.is_main):
                self.log(f"recipe_args.overwrite_output_dir: moved the previous run {old} aside to {new}")

    def open(self) -> None:
        """Start writing: the metrics log, after the temps of writes that never finished (a kill inside a checkpoint,
        a draft save or a metrics rewrite) are removed from the run's folders (`io.leftover_temps`)."""
        self.metrics = MetricsWriter(str(self.output_dir), enabled=self.is_main)
        if self.is_main:
            for folder in dict.fromkeys((self.output_dir, self._own_ckpt_root())):  # the same folder once
                for leftover in remove_leftover_temps(folder) if folder is not None else []:
                    self.log(f"removed {leftover}, left by a write that never finished")

    def set_aside_newer(self, step: int) -> None:
        """Resuming from a checkpoint of `step` starts the run again from there: checkpoints of later steps under
        checkpoint_dir (written from weights that then diverged, or skipped as damaged) move aside to
        `<checkpoint_dir>.after-step-<S>-<time>/` (rank 0), so that `LATEST` never goes back to them. Nothing is
        deleted."""
        newer = [path for path in checkpoints(self.ckpt_root) if ckpt.step_of(path) > step]
        if not (self.is_main and newer):
            return
        aside = self.ckpt_root.with_name(f"{self.ckpt_root.name}.after-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.mkdir()
        for path in newer:
            shutil.move(str(path), str(aside / path.name))
        self.log(f"resumed from step {step}: moved the {len(newer)} later checkpoint(s) aside to {aside}")

    def _own_ckpt_root(self) -> Path | None:
        """The checkpoint folder this run writes, None when checkpoints are off (it is then another run's to keep)."""
        return self.ckpt_root if self.checkpoint.enabled else None

    def last_good(self, before: int | None = None) -> Path | None:
        """The newest checkpoint (of a step < `before`, when given): where a stopped run can resume from."""
        if not self.checkpoint.enabled:
            return None
        return ckpt.find_latest(self.ckpt_root, before=before)

    def truncate_metrics(self, step: int) -> None:
        assert self.metrics is not None
        warning = self.metrics.truncate_after(step)
        if warning:
            self.log(warning)

    def write_metrics(self, record: dict) -> str | None:
        """Append `record` (rank 0); returns the line to stop with when the disk is full."""
        assert self.metrics is not None
        try:
            self.metrics.write(record)
        except OSError as err:
            if not is_disk_full(err):
                raise
            return disk_full_message(self.metrics.path, self.last_good())
        return None

    def write_checkpoint(self, epoch: int, step: int, **contents) -> str | None:
        """Write `epoch_{E}_step_{S}/` (rank 0), then prune to `keep_last_n`; returns the line to stop with when the
        disk is full (the temp folder is gone and earlier checkpoints are untouched)."""
        try:
            path = ckpt.save_checkpoint(self.ckpt_root, epoch, step, **contents)
        except Exception as err:
            if not is_disk_full(err):
                raise
            return disk_full_message(ckpt.step_dir(self.ckpt_root, epoch, step), self.last_good())
        self.log(f"saved checkpoint {path}")
        for old in prune(self.ckpt_root, self.checkpoint.keep_last_n):
            self.log(f"checkpoint.keep_last_n: removed {old}")
        return None
