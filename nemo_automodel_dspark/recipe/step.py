"""One optimizer step of DSpark training: frozen-target capture → draft forward → objective, exact over the step.

The loss of a step is `Σ numerators / Σ denominators` where both sums run over every micro-batch on every rank
(SPEC §4). The denominators depend only on the data and the anchors, so they are computed and all-reduced once
before any forward; each micro-batch then back-propagates `numerator · world_size / global_denominator` (DDP and
FSDP2 average gradients over ranks). No host sync happens inside the step.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.loss import LossConfig, dspark_loss, slot_weights
from nemo_automodel_dspark.masks import build_eval_mask, sample_anchors
from nemo_automodel_dspark.target.capture import capture_target_features

_TRAIN, _VAL = 0, 1


@dataclass
class MicroBatch:
    input_ids: Tensor  # [B, S]
    attention_mask: Tensor  # [B, S]
    loss_mask: Tensor  # [B, S]
    indices: list[int]  # dataset rows, for per-row anchor seeds


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
        self,
        model,
        draft,
        target,
        loss: LossConfig,
        info: D.DistInfo,
        *,
        seed: int,
        max_grad_norm: float | None,
        defer_fsdp_sync: bool,
    ) -> None:
        self.model, self.draft, self.target, self.loss, self.info = model, draft, target, loss, info
        self.seed, self.max_grad_norm, self.defer_fsdp_sync = seed, max_grad_norm, defer_fsdp_sync
        self.timer = PhaseTimer(info.device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # fixed once wrapped
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if info.device.type == "cuda" and not hasattr(model, "set_requires_gradient_sync")
            else contextlib.nullcontext()
        )

    def anchors(self, batch: MicroBatch, stream: int, epoch: int) -> tuple[Tensor, Tensor]:
        rows = []
        for b, index in enumerate(batch.indices):
            generator = torch.Generator().manual_seed(anchor_seed(self.seed, stream, epoch, index))
            rows.append(sample_anchors(batch.loss_mask[b : b + 1], self.draft.dspark.num_anchors, generator))
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def _to_device(self, batch: MicroBatch) -> MicroBatch:
        move = lambda t: t.to(self.info.device, non_blocking=True)  # noqa: E731
        return MicroBatch(move(batch.input_ids), move(batch.attention_mask), move(batch.loss_mask), batch.indices)

    def _forward_loss(self, batch: MicroBatch, anchors: Tensor, keep: Tensor):
        with self.timer("target_forward"):
            captured = capture_target_features(
                self.target, batch.input_ids, batch.attention_mask, self.draft.dspark.target_layer_ids
            )
        with self.timer("draft_forward_backward"), self.autocast:
            out = self.model(
                batch.input_ids, captured.features, batch.loss_mask, anchors, keep, target_hidden=captured.last_hidden
            )
            return dspark_loss(
                out.draft_logits,
                out.target_logits,
                out.target_ids,
                out.eval_mask,
                out.confidence_logits,
                self.loss,
            )

    def train_step(self, micro_batches: list[MicroBatch], epoch: int, optimizer, scheduler) -> tuple[dict, Tensor]:
        """One optimizer step over this rank's micro-batches; returns (detached sums, grad norm) as tensors."""
        self.last_lr = optimizer.param_groups[0]["lr"]
        with self.timer("other"):
            batches = [self._to_device(mb) for mb in micro_batches]
            blocks = [self.anchors(mb, _TRAIN, epoch) for mb in batches]
            local = sum(
                slot_weights(
                    build_eval_mask(mb.loss_mask, a, k, self.draft.dspark.block_size), self.loss.loss_decay_gamma
                ).sum()
                for mb, (a, k) in zip(batches, blocks, strict=True)
            )
            global_den = D.all_reduce_sum(torch.as_tensor(local, dtype=torch.float32, device=self.info.device))
            scale = self.info.world_size / global_den.clamp(min=1e-12)
        totals: dict[str, Tensor] = {}
        for i, (mb, (anchors, keep)) in enumerate(zip(batches, blocks, strict=True)):
            with D.grad_sync(self.model, i == len(batches) - 1, self.defer_fsdp_sync):
                loss = self._forward_loss(mb, anchors, keep)
                with self.timer("draft_forward_backward"):
                    (loss.numerator * scale).backward()
            _add(totals, loss.sums)
        with self.timer("optimizer"):
            max_norm = self.max_grad_norm if self.max_grad_norm else float("inf")
            grad_norm = D.full_norm(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return totals, grad_norm.detach()

    @torch.no_grad()
    def eval_sums(self, micro_batches, epoch: int = 0) -> dict:
        """Detached objective sums over validation micro-batches, with anchors from the validation stream only."""
        totals: dict[str, Tensor] = {}
        self.model.eval()
        try:
            for mb in micro_batches:
                mb = self._to_device(mb)
                anchors, keep = self.anchors(mb, _VAL, epoch)
                _add(totals, self._forward_loss(mb, anchors, keep).sums)
        finally:
            self.model.train()
        return totals
