"""The recipe's state as objects that own their rules: run progress, the open metrics window, and the cadences.

`Progress` and `MetricsWindow` each have `state_dict` / `load_state_dict`; the recipe's checkpoint is their
union plus the sampler, scheduler and compatibility fields (assembled in `TrainDSparkRecipe._trainer_state`).
`due_after_step` is every cadence (log / validate / decode / checkpoint every N steps, epoch end, last step) as
named predicates, so the training loop reads as a list of "if due: do".
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.loss import flatten_sums, unflatten_sums
from nemo_automodel_dspark.recipe.config import DSparkRecipeConfig
from nemo_automodel_dspark.recipe.metrics import peak_memory_gib


@dataclass
class Progress:
    """Where the run is: optimizer steps taken, the current epoch, and the steps skipped as non-finite."""

    step: int = 0
    epoch: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.skipped_steps = int(state.get("skipped_steps", 0))  # checkpoints from before the divergence guard


class ProgressField:
    """`recipe.step` / `.epoch` / `.skipped_steps` read and write `recipe.progress` (the one owner of them)."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, recipe, owner=None) -> int:
        return getattr(recipe.progress, self.name)

    def __set__(self, recipe, value: int) -> None:
        setattr(recipe.progress, self.name, value)


@dataclass
class ReducedWindow:
    """A window summed over every rank: what one log record is computed from."""

    sums: dict[str, torch.Tensor]
    grad_norm: float  # mean over the window's optimizer steps
    tokens: float  # attended tokens over every rank
    peak_memory_gib: float  # the largest over ranks


@dataclass
class MetricsWindow:
    """Objective sums, grad norm, step and token counts accumulated since the last log record.

    Every rank accumulates its own micro-batches; `reduce` sums the window over ranks once per log step. The grad
    norm of a step is the same global norm on every rank, so the sum over ranks is `world_size ×` the per-rank
    sum, and `reduce` divides by `world_size` (and by the step count) to log the mean.

    A checkpoint stores the window *already reduced* (`state_dict`), and `load_state_dict` puts it back on rank 0
    only: the next `reduce` sums over ranks again, so restoring it on every rank would count it `world_size` times.
    For the same reason its grad norm is stored pre-multiplied by `world_size`: after the next reduce (rank 0 alone
    holds it) the division by `world_size` yields the mean again. Only rank 0 writes records, so only its step
    count must include the restored steps. Tokens and the timer restart (tokens/s measures the resumed run).
    """

    sums: dict[str, torch.Tensor] | None = None
    grad_norm: float | torch.Tensor = 0.0
    steps: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        """Start the next window (in place: NeMo's BaseRecipe refuses to re-bind a tracked attribute)."""
        self.sums, self.grad_norm, self.steps, self.tokens = None, 0.0, 0, 0
        self.start = time.perf_counter()

    def add(self, sums: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        """One applied optimizer step: its detached sums (any device) and its grad norm (a tensor: no host sync)."""
        if self.sums is None:
            self.sums = dict(sums)
        else:
            self.sums = {k: self.sums[k] + v.to(self.sums[k].device) for k, v in sums.items()}
        self.grad_norm = self.grad_norm + grad_norm
        self.steps += 1

    def reduce(self, info: D.DistInfo) -> ReducedWindow:
        """All-reduce the window once (every rank must call this together)."""
        assert self.sums is not None
        flat = flatten_sums(self.sums).to(info.device)
        extra = torch.tensor([float(self.grad_norm), float(self.tokens)], device=info.device)
        total = D.all_reduce_sum(torch.cat([flat, extra]))
        mem = D.all_reduce_max(torch.tensor([peak_memory_gib(info.device)], device=info.device))
        sums = unflatten_sums(total[: flat.numel()].cpu(), self.sums)
        grad_norm = float(total[-2]) / max(self.steps, 1) / info.world_size
        return ReducedWindow(sums, grad_norm, float(total[-1]), float(mem))

    def state_dict(self, info: D.DistInfo) -> dict | None:
        """The window reduced over ranks, JSON-friendly (every rank must call this together); None when empty."""
        if self.sums is None:
            return None
        sums = self.reduce(info).sums
        return {
            "sums": flatten_sums(sums).tolist(),
            "shapes": {k: list(v.shape) for k, v in sums.items()},
            "grad_norm": float(self.grad_norm) * info.world_size,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict | None, info: D.DistInfo) -> None:
        """Restore a saved window on rank 0 only (see the class docstring); other ranks start empty."""
        if state is None or not info.is_main:
            return
        like = {k: torch.empty(shape) for k, shape in state["shapes"].items()}
        self.sums = unflatten_sums(torch.tensor(state["sums"]), like)
        self.grad_norm, self.steps = state["grad_norm"], state["steps"]


def every(n: int | None, step: int) -> bool:
    """True on steps N, 2N, ... (never when N is null or 0)."""
    return n is not None and n > 0 and step % n == 0


@dataclass(frozen=True)
class Due:
    """What the loop does after optimizer step `step` (in this order)."""

    log: bool
    validate: bool
    end_epoch: bool
    decode: bool
    checkpoint: bool


def due_after_step(config: DSparkRecipeConfig, step: int, *, epoch_done: bool, last: bool, has_val: bool) -> Due:
    """The cadences: a record every `log_every_steps` and at each epoch end and the last step; validation every
    `val_every_steps` and at each epoch end; decoding every `eval_decode.every_steps` and at the last step; a
    checkpoint every `ckpt_every_steps` and at the last step (when checkpoints are enabled)."""
    args, checkpoint, decode = config.recipe_args, config.checkpoint, config.recipe_args.eval_decode
    return Due(
        log=every(args.log_every_steps, step) or epoch_done or last,
        validate=has_val and (epoch_done or every(args.val_every_steps, step)),
        end_epoch=epoch_done,
        decode=decode is not None and (every(decode.every_steps, step) or last),
        checkpoint=checkpoint.enabled and (every(checkpoint.ckpt_every_steps, step) or last),
    )
