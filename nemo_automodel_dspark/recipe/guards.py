"""What keeps a training run from going silently wrong: the divergence guard and the finite-weights check.

A step is never applied (see `DSparkStep.train_step`) when `DivergenceGuard.verdict` refuses it:

- its loss or gradient norm is non-finite on any rank, or
- its loss (the step's global objective, `Σ numerators / Σ denominators` over every rank) is finite but above
  `recipe_args.divergence_factor` × the median loss of the last `REFERENCE_STEPS` applied steps. The rule applies
  once that many steps were applied (the warm-up), so the reference is never a single noisy step. A healthy run's
  step loss stays within a few × its recent median (the embedded default run: at most 1.26×, README "Reliability");
  an exploding run's loss grows by orders of magnitude, so the default factor of 100 separates the two with
  room to spare. Only the loss is compared: with Adam the update size does not grow with the gradient norm, and
  clipping (`max_grad_norm`) already bounds it, so a large finite gradient norm alone is no sign of divergence.

A refused step counts like a non-finite one: the run stops with one line naming the step, the value, the reference
and the last good checkpoint, unless the user allowed a bounded number of skipped steps
(`recipe_args.max_skipped_steps`). A step's loss is computed with the weights of the step before, so the last good
checkpoint is the newest one written *before* that step's weights (`RunFiles.last_good(before=...)`). The
reference (the recent losses) is part of the checkpoint, so a resumed run decides exactly as an uninterrupted one.
A checkpoint with non-finite weights is never written.
"""

from __future__ import annotations

import errno
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_automodel_dspark.errors import ToolError

REFERENCE_STEPS = 8  # applied steps whose median loss is the reference (and the warm-up before the rule applies)


class RunStopped(ToolError):
    """The run stopped on purpose (divergence, full disk, a folder in the way); the message is the one line shown."""


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


NON_FINITE = "non-finite loss or gradient norm"


@dataclass
class DivergenceGuard:
    """Decides whether a step may be applied; holds the reference (recent applied losses), saved in checkpoints.

    Every rank feeds it the same global values in the same order, so every rank reaches the same verdict.
    """

    factor: float | None  # recipe_args.divergence_factor; None: only non-finite steps are refused
    window: int = REFERENCE_STEPS
    recent: list[float] = field(default_factory=list)  # losses of the last `window` applied steps, oldest first

    def reference(self) -> float | None:
        """The median of the recent applied losses, once the warm-up is over (None before, or when the rule is off)."""
        if self.factor is None or len(self.recent) < self.window:
            return None
        median = statistics.median(self.recent)
        return median if median > 0 else None  # a perfect fit (loss 0) gives no scale to compare with

    def verdict(self, loss: float | None, grad_norm: float) -> str | None:
        """None when the step may be applied, else why not (the start of the one line). `loss` is None for a step
        without a supervised token (nothing to compare)."""
        if not math.isfinite(grad_norm) or (loss is not None and not math.isfinite(loss)):
            return NON_FINITE
        reference = self.reference()
        if loss is not None and reference is not None and loss > self.factor * reference:  # type: ignore[operator]
            return (
                f"loss {loss:.4g} is above recipe_args.divergence_factor={self.factor:g} x {reference:.4g}, the median "
                f"loss of the last {self.window} applied steps"
            )
        return None

    def record(self, loss: float | None) -> None:
        """An applied step: its loss joins the reference window."""
        if loss is not None:
            self.recent = [*self.recent, loss][-self.window :]

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the reference; a checkpoint from before this rule has none and the warm-up starts again."""
        self.recent = [float(v) for v in (state or {}).get("recent", [])][-self.window :]


def divergence_message(step: int, reason: str, skipped: int, allowed: int, last_good: Path | None) -> str:
    """The one line a diverged run ends with: which step and why, how many were skipped, where to resume from."""
    allowance = f" ({skipped} refused steps, recipe_args.max_skipped_steps={allowed})" if allowed else ""
    if last_good:  # named in full: LATEST may be a newer checkpoint, written from the weights that diverged
        where = f"the last good checkpoint is {last_good}. Lower optimizer.lr and resume with checkpoint.restore_from: "
        where += str(last_good)
    else:
        where = (
            "no good checkpoint was written yet. Lower optimizer.lr and start again (recipe_args.overwrite_output_dir: "
            "true moves this run aside)"
        )
    return (
        f"step {step}: {reason}; the update was not applied and the run stopped{allowance}; {where}, or let the run "
        "skip such steps with recipe_args.max_skipped_steps"
    )


def refuse_non_finite_weights(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise RunStopped naming the first non-finite tensors of `state` (e.g. a draft about to be saved)."""
    bad = non_finite_tensors(state)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise RunStopped(f"{what}: non-finite weights in {shown}")


def is_disk_full(err: BaseException) -> bool:
    """Whether a write failed for lack of space: Python's OSError, a native writer's message, or an error raised
    while handling one (`torch.save` to a full disk ends in `RuntimeError: [enforce fail ...] unexpected pos`,
    raised during the ENOSPC of the file's write)."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(cause)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def disk_full_message(path: Path, last_complete: Path | None) -> str:
    return (
        f"no space left on device writing {path}; the last complete checkpoint is {last_complete or 'none'}; "
        "free space and resume with checkpoint.restore_from: LATEST"
    )
