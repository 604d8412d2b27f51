"""One optimizer step of DSpark training: frozen-target capture → draft forward → objective, exact over the step.

The loss of a step is `Σ numerators / Σ denominators` where both sums run over every micro-batch on every rank
(SPEC §4). The denominators depend only on the data and the anchors, so they are computed and all-reduced once
before any forward; each micro-batch then back-propagates `numerator · world_size / global_denominator` (DDP and
FSDP2 average gradients over ranks). The only host sync is the end-of-step check (`DivergenceGuard`, one
all-reduce): a step whose loss or grad norm is non-finite on any rank, or whose loss exploded, updates neither the
weights nor the optimizer state.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.loss import LossConfig, dspark_head_loss, slot_weights
from nemo_automodel_dspark.masks import build_eval_mask, pack_anchor_count, sample_anchors, sample_pack_anchors
from nemo_automodel_dspark.recipe.config import RecipeArgs
from nemo_automodel_dspark.recipe.guards import DivergenceGuard
from nemo_automodel_dspark.target.capture import capture_target_features, is_right_padded

_TRAIN, _VAL = 0, 1


@dataclass
class MicroBatch:
    input_ids: Tensor  # [B, S]
    attention_mask: Tensor  # [B, S]
    loss_mask: Tensor  # [B, S]
    indices: list[int]  # dataset rows, for per-row anchor seeds
    position_ids: Tensor | None = None  # [B, S] packed rows only: positions restart at 0 per document
    spans: list[list[tuple[int, int]]] | None = None  # packed rows only: (start, length) per document, row order


class PhaseTimer:
    """Wall time per phase with device syncs; disabled (free) unless a benchmark turns it on."""

    def __init__(self, device: torch.device, enabled: bool = False) -> None:
        self.device, self.enabled = device, enabled
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.totals[phase] += time.perf_counter() - start


def anchor_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    """Anchors of a row depend only on (run seed, train/val, epoch, row): identical for any world size or split."""
    return ((seed * 1_000_003 + stream) * 10_000_019 + epoch) * 1_000_000_007 + index & (2**62 - 1)


def _add(total: dict, sums: dict) -> None:
    for key, value in sums.items():
        total[key] = total[key] + value if key in total else value.clone()


class DSparkStep:
    """Runs training and validation steps for a (wrapped) draft against a frozen target."""

    def __init__(
        self, model, draft, target, args: RecipeArgs, loss: LossConfig, info: D.DistInfo, *, defer_fsdp_sync: bool
    ) -> None:
        """`args` gives the run's seed, sequence length and clipping; `loss` the objective; the draft its options."""
        self.model, self.draft, self.target, self.args, self.info = model, draft, target, args, info
        self.loss, self.defer_fsdp_sync = loss, defer_fsdp_sync
        self.timer = PhaseTimer(info.device)
        self.guard = DivergenceGuard(args.divergence_factor)  # its reference is saved in checkpoints
        self.last_verdict: str | None = None  # why the last train_step was not applied; None: it was
        self.last_loss: float | None = None  # the last step's global loss (None: no supervised token)
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # fixed once wrapped
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if info.device.type == "cuda" and not hasattr(model, "set_requires_gradient_sync")
            else contextlib.nullcontext()
        )

    def _generator(self, stream: int, epoch: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(anchor_seed(self.args.shuffle_seed, stream, epoch, index))

    def anchors(self, batch: MicroBatch, stream: int, epoch: int) -> tuple[Tensor, Tensor]:
        """Anchors [B, N] and keep [B, N] on the batch's device; a packed row's documents draw their own shares of
        the row's blocks (rule: `masks` docstring), which are counted on the host: give packed rows on the CPU."""
        if batch.spans is not None:
            return self._pack_anchors(batch, stream, epoch)
        rows = []
        for b, index in enumerate(batch.indices):
            generator = self._generator(stream, epoch, index)
            rows.append(sample_anchors(batch.loss_mask[b : b + 1], self.draft.dspark.num_anchors, generator))
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def _pack_anchors(self, batch: MicroBatch, stream: int, epoch: int) -> tuple[Tensor, Tensor]:
        assert batch.spans is not None
        documents = iter(batch.indices)
        total = pack_anchor_count(batch.loss_mask.shape[1], self.draft.dspark.num_anchors, self.args.seq_length)
        rows = []
        for b, spans in enumerate(batch.spans):
            generators = [self._generator(stream, epoch, next(documents)) for _ in spans]
            rows.append(sample_pack_anchors(batch.loss_mask[b], spans, generators, total=total))
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def _device_anchors(self, batch: MicroBatch, stream: int, epoch: int) -> tuple[Tensor, Tensor]:
        """`anchors` of a CPU micro-batch (no host sync for packed rows), moved to the device."""
        anchors, keep = self.anchors(batch, stream, epoch)
        return anchors.to(self.info.device, non_blocking=True), keep.to(self.info.device, non_blocking=True)

    def _to_device(self, batch: MicroBatch) -> MicroBatch:
        if not is_right_padded(batch.attention_mask):  # a CPU batch from the loader: no device sync
            raise ValueError("micro-batch rows must be right-padded: the target forward runs without a padding mask")

        def move(t: Tensor) -> Tensor:
            return t.to(self.info.device, non_blocking=True)

        position_ids = None if batch.position_ids is None else move(batch.position_ids)
        return MicroBatch(
            move(batch.input_ids),
            move(batch.attention_mask),
            move(batch.loss_mask),
            batch.indices,
            position_ids,
            batch.spans,
        )

    def _forward_loss(self, batch: MicroBatch, anchors: Tensor, keep: Tensor):
        with self.timer("target_forward"):
            # Rows are right-padded (checked in `_to_device`): causal attention keeps padding away from every real
            # token, so the target runs without a padding mask and can use fused causal kernels.
            captured = capture_target_features(
                self.target,
                batch.input_ids,
                None,
                self.draft.dspark.target_layer_ids,
                position_ids=batch.position_ids,
            )
        with self.timer("draft_forward_backward"), self.autocast:
            out = self.model(
                batch.input_ids,
                captured.features,
                batch.loss_mask,
                anchors,
                keep,
                target_hidden=captured.last_hidden,
                position_ids=batch.position_ids,
            )
            return dspark_head_loss(
                out.head,
                out.hidden,
                out.markov_features,
                out.teacher_hidden,
                out.target_ids,
                out.eval_mask,
                out.confidence_logits,
                self.loss,
            )

    def train_step(self, micro_batches: list[MicroBatch], epoch: int, optimizer, scheduler) -> tuple[dict, Tensor]:
        """One optimizer step over this rank's micro-batches; returns (detached sums, grad norm) as tensors."""
        self.last_lr = optimizer.param_groups[0]["lr"]
        with self.timer("other"):
            blocks = [self._device_anchors(mb, _TRAIN, epoch) for mb in micro_batches]
            batches = [self._to_device(mb) for mb in micro_batches]
            local = sum(
                slot_weights(
                    build_eval_mask(mb.loss_mask, a, k, self.draft.dspark.block_size, mb.position_ids),
                    self.loss.loss_decay_gamma,
                ).sum()
                for mb, (a, k) in zip(batches, blocks, strict=True)
            )
            global_den = D.all_reduce_sum(torch.as_tensor(local, dtype=torch.float32, device=self.info.device))
            scale = self.info.world_size / global_den.clamp(min=1e-12)
        totals: dict[str, Tensor] = {}
        numerator = torch.zeros((), dtype=torch.float32, device=self.info.device)
        for i, (mb, (anchors, keep)) in enumerate(zip(batches, blocks, strict=True)):
            with D.grad_sync(self.model, i == len(batches) - 1, self.defer_fsdp_sync):
                loss = self._forward_loss(mb, anchors, keep)
                with self.timer("draft_forward_backward"):
                    (loss.numerator * scale).backward()
            _add(totals, loss.sums)
            numerator = numerator + loss.numerator.detach().float()
        with self.timer("optimizer"):
            max_norm = self.args.max_grad_norm if self.args.max_grad_norm else float("inf")
            grad_norm = D.full_norm(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
            self.last_loss, norm = self._global_loss_and_norm(totals, numerator, global_den, grad_norm)
            self.last_verdict = self.guard.verdict(self.last_loss, norm)
            if self.last_verdict is None:  # a refused step never reaches the weights or the optimizer state
                optimizer.step()
                self.guard.record(self.last_loss)
            with warnings.catch_warnings():  # a refused first step still advances the schedule: torch's warning
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)  # says so
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return totals, grad_norm.detach()

    def _global_loss_and_norm(
        self, sums: dict[str, Tensor], numerator: Tensor, global_den: Tensor, grad_norm: Tensor
    ) -> tuple[float | None, float]:
        """(the step's loss over every rank, its grad norm) on the host, identical on every rank (one all-reduce,
        one host sync). A sum or grad norm that is non-finite on any rank makes the loss NaN; no supervised token:
        loss None."""
        bad = torch.zeros((), dtype=torch.bool, device=self.info.device)
        for value in sums.values():
            bad = bad | ~torch.isfinite(value.detach().float()).all()
        bad = bad | ~torch.isfinite(grad_norm.detach().float()).all()  # every rank then refuses the step alike
        summed = D.all_reduce_sum(torch.stack([bad.float(), numerator]))
        step_wide = torch.stack([global_den.float(), grad_norm.detach().float().reshape(()).to(global_den.device)])
        total_bad, total_numerator, den, norm = torch.cat([summed, step_wide]).tolist()
        if total_bad:
            return float("nan"), norm
        return (total_numerator / den if den > 0 else None), norm

    @torch.no_grad()
    def eval_sums(self, micro_batches, epoch: int = 0) -> dict:
        """Detached objective sums over validation micro-batches, with anchors from the validation stream only."""
        totals: dict[str, Tensor] = {}
        self.model.eval()
        try:
            for mb in micro_batches:
                anchors, keep = self._device_anchors(mb, _VAL, epoch)
                mb = self._to_device(mb)
                _add(totals, self._forward_loss(mb, anchors, keep).sums)
        finally:
            self.model.train()
        return totals
