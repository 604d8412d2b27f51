"""What `gpu_check.py`'s correctness checks share: the problem sizes (CUDA and the CPU dry run), the bounds, and the
builders of the target, draft, step and batch, with the error measures the checks report."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from transformers import Qwen3ForCausalLM  # imported here, before any section's clock starts

from nemo_automodel_dspark import DSparkConfig, DSparkDrafter
from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.loss import LossConfig
from nemo_automodel_dspark.masks import flex_block_mask
from nemo_automodel_dspark.model import layers
from nemo_automodel_dspark.recipe.step import DSparkStep, MicroBatch
from nemo_automodel_dspark.target.tiny import tiny_config


@dataclass(frozen=True)
class TargetShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Problem:
    """One batch and one draft for the correctness checks."""

    target: TargetShape
    seq: int
    anchors: int
    block: int
    draft_layers: int
    markov_rank: int
    batch: int
    decode_target: TargetShape  # small peaked target for the decoding check
    decode_prompts: int
    decode_tokens: int


QWEN3_0_6B = TargetShape(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=151936)
# Correctness on CUDA: Qwen3-0.6B widths and vocabulary, 8 layers, so the fp32 CPU reference step stays seconds.
REAL = Problem(
    target=TargetShape(1024, 8, 16, 8, 128, 3072, 151936),
    seq=512,
    anchors=64,
    block=7,
    draft_layers=2,
    markov_rank=256,
    batch=2,
    decode_target=TargetShape(256, 4, 4, 2, 64, 512, 4096),
    decode_prompts=3,
    decode_tokens=48,
)
DRY = Problem(
    target=TargetShape(64, 4, 4, 2, 16, 128, 512),
    seq=48,
    anchors=6,
    block=4,
    draft_layers=2,
    markov_rank=16,
    batch=2,
    decode_target=TargetShape(16, 3, 2, 1, 8, 32, 64),
    decode_prompts=3,
    decode_tokens=16,
)

# Bounds, (CUDA bf16, CPU fp32 dry run). bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 4e-3); a few roundings
# along a layer stack give ~1e-2 on activations; gradients through two attention kernels' different accumulation
# orders get the looser bound.
BOUNDS = {
    "flex_logits": (2e-2, 1e-4),
    "flex_grads": (5e-2, 1e-4),
    "bf16_loss": (2e-2, 2e-2),
    "bf16_grads": (1.5e-1, 1.5e-1),
    "fsdp_loss": (1e-2, 1e-5),
    "fsdp_grads": (5e-2, 1e-5),
    "packed_features": (2e-2, 1e-5),  # one kernel call over two documents vs two calls: other accumulation orders
    "packed_sums": (2e-2, 1e-5),
    "packed_grads": (5e-2, 1e-4),
}


def bound(name: str, device: torch.device) -> float:
    return BOUNDS[name][0 if device.type == "cuda" else 1]


# ------------------------------------------------------------------------------------------------ builders
def build_target(shape: TargetShape, device: torch.device, dtype: torch.dtype, *, init_range: float = 0.02):
    """A random Qwen3 target of `shape` (seed 0), built directly on `device` in `dtype`, frozen."""
    config = tiny_config(
        "qwen3",
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=4096,
        initializer_range=init_range,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device(device):
        target = Qwen3ForCausalLM(config)
    target.generation_config.pad_token_id = 0
    return target.to(dtype).eval().requires_grad_(False)


def build_draft(target: nn.Module, p: Problem, backend: str, *, draft_layers: int | None = None) -> DSparkDrafter:
    """A fresh fp32 draft (seed 1) for `target`; the mask token is the last vocabulary row."""
    torch.manual_seed(1)
    config = DSparkConfig(
        mask_token_id=target.config.vocab_size - 1,
        draft_num_hidden_layers=draft_layers or p.draft_layers,
        block_size=p.block,
        num_anchors=p.anchors,
        markov_rank=p.markov_rank,
        attention_backend=backend,
    )
    return DSparkDrafter.from_target(target, config).float()


def build_step(model: nn.Module, draft: DSparkDrafter, target: nn.Module, p: Problem, device) -> DSparkStep:
    """The recipe's step object (its autocast choice included) with the shipped loss options."""
    args = SimpleNamespace(shuffle_seed=0, seq_length=p.seq, max_grad_norm=1.0, divergence_factor=None)
    info = D.DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    return DSparkStep(model, draft, target, args, LossConfig(), info, defer_fsdp_sync=False)


def make_batch(p: Problem, device: torch.device, seed: int = 2) -> MicroBatch:
    """Random ids [B, S] (never the mask id), loss on the last three quarters of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, p.target.vocab - 1, (p.batch, p.seq), generator=g)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, p.seq // 4 :] = 1
    return MicroBatch(ids.to(device), torch.ones_like(ids).to(device), loss_mask.to(device), list(range(p.batch)))


def loss_and_grads(
    step: DSparkStep, batch: MicroBatch, *, backward: bool = True
) -> tuple[float, dict[str, Tensor], Tensor]:
    """One micro-batch through the recipe's forward: (loss, fp32 CPU grads by name, draft logits [B, N, K, V])."""
    seen: dict[str, Tensor] = {}
    hook = step.draft.register_forward_hook(lambda m, i, out: seen.__setitem__("logits", out.draft_logits.detach()))
    try:
        anchors, keep = step.anchors(batch, 0, 0)
        with contextlib.nullcontext() if backward else torch.no_grad():
            loss = step._forward_loss(batch, anchors, keep)
        if backward:
            (loss.numerator / loss.denominator).backward()
    finally:
        hook.remove()
    grads = {n: _full(p.grad).float().cpu() for n, p in step.model.named_parameters() if p.grad is not None}
    value = float(loss.numerator.detach().float() / loss.denominator.float())
    return value, grads, seen["logits"].float().cpu()


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 gradients are DTensors


def rel_max(a: Tensor, ref: Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def rel_l2(grads: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[float, str]:
    """Global relative L2 error of a gradient set, and the parameter with the largest own relative error."""
    if grads.keys() != ref.keys():
        raise ValueError(f"different trainable parameters: {sorted(grads.keys() ^ ref.keys())}")
    diff = math.sqrt(sum(float((grads[n] - ref[n]).pow(2).sum()) for n in ref))
    norm = math.sqrt(sum(float(ref[n].pow(2).sum()) for n in ref))
    worst = max(ref, key=lambda n: float((grads[n] - ref[n]).norm() / ref[n].norm().clamp(min=1e-30)))
    return diff / max(norm, 1e-30), worst


def eager_flex_on_cpu(draft: DSparkDrafter, device: torch.device) -> str:
    """CUDA uses the drafter's own path (BlockMask + compiled flex); CPU forces the BlockMask with eager flex."""
    if device.type == "cuda":
        return "compiled flex_attention + BlockMask (the training path)"
    from torch.nn.attention.flex_attention import flex_attention

    layers._compiled_flex = flex_attention
    block = draft.dspark.block_size
    draft.attention_mask = lambda anchors, keep, seq, *rest: flex_block_mask(anchors, keep, seq, block, *rest)  # type: ignore[method-assign]
    return "eager flex_attention + BlockMask (CPU dry run)"
