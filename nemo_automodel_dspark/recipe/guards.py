"""What keeps a training run from going silently wrong: the divergence guard and the finite-weights check.

A step whose loss or gradient norm is non-finite on any rank is never applied (see `DSparkStep.train_step`).
The run then stops with one line naming the step and the last good checkpoint, unless the user allowed a bounded
number of skipped steps (`recipe_args.max_skipped_steps`). A checkpoint with non-finite weights is never written.
"""

from __future__ import annotations

import errno
from pathlib import Path

import torch

from nemo_automodel_dspark.errors import ToolError


class RunStopped(ToolError):
    """The run stopped on purpose (divergence, full disk, a folder in the way); the message is the one line shown."""


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def divergence_message(step: int, skipped: int, allowed: int, last_good: Path | None) -> str:
    """The one line a diverged run ends with: which step, how many were skipped, where to resume from."""
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    allowance = f" ({skipped} non-finite steps, recipe_args.max_skipped_steps={allowed})" if allowed else ""
    return (
        f"step {step}: non-finite loss or gradient norm; the update was not applied and the run stopped{allowance}; "
        f"{where}. Lower optimizer.lr and resume with checkpoint.restore_from, or let the run skip such steps "
        "with recipe_args.max_skipped_steps"
    )


def refuse_non_finite_weights(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise RunStopped naming the first non-finite tensors of `state` (e.g. a draft about to be saved)."""
    bad = non_finite_tensors(state)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise RunStopped(f"{what}: non-finite weights in {shown}")


def is_disk_full(err: BaseException) -> bool:
    """Whether a write failed for lack of space (Python's OSError, or a native writer's message)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def disk_full_message(path: Path, last_complete: Path | None) -> str:
    return (
        f"no space left on device writing {path}; the last complete checkpoint is {last_complete or 'none'}; "
        "free space and resume with checkpoint.restore_from: LATEST"
    )
