"""Where a DSpark training step spends its time, and what the fused objective costs against the unfused one.

Runs the recipe's own train step (`DSparkStep.train_step`, with collation of each micro-batch) on a small random
Qwen3 target, single process, with two objectives, steps interleaved so that machine noise hits both alike:

- `fused`: the recipe's (`dspark_head_loss`): the LM head, Markov bias and teacher projection run chunk by chunk
  inside the objective, and backward recomputes each chunk's logits;
- `unfused`: the recipe before it: draft and teacher logits `[rows, V]` materialised, then the chunked formula
  (`dspark_loss`).

It prints each phase's share of the fused step ("everything else": data, anchors, masks, metrics bookkeeping, host
syncs, must stay ≤ 15%), then step time and draft forward+backward time of both and their ratio fused / unfused.

    python benchmarks/step_time.py                 # CPU defaults (~2 minutes on 2 cores)
    python benchmarks/step_time.py --device cuda --hidden 1024 --layers 8 --vocab 151936 --seq 4096 --anchors 512

Ends with one JSON line: step_ms_{fused,unfused}, draft_fwd_bwd_ms_{fused,unfused}, step_time_ratio_fused_vs_unfused,
draft_fwd_bwd_ratio_fused_vs_unfused, other_share_fused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from types import SimpleNamespace

import torch
from transformers import Qwen3ForCausalLM

from nemo_automodel_dspark import DSparkConfig, DSparkDrafter
from nemo_automodel_dspark.data import collate
from nemo_automodel_dspark.distributed import DistInfo
from nemo_automodel_dspark.loss import LossConfig, dspark_loss
from nemo_automodel_dspark.recipe import step as step_module
from nemo_automodel_dspark.recipe.config import OptimizerConfig
from nemo_automodel_dspark.recipe.optim import build_optimizer, build_scheduler
from nemo_automodel_dspark.recipe.step import DSparkStep, MicroBatch
from nemo_automodel_dspark.target.tiny import tiny_config


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--anchors", type=int, default=64)
    p.add_argument("--block", type=int, default=7)
    p.add_argument("--draft-layers", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps per objective")
    return p.parse_args()


def build_target_and_draft(a: argparse.Namespace, device: torch.device, *, seq: int, anchors: int, block: int):
    """The benchmarks' random-weight Qwen3 target (`a.vocab`, `a.hidden`, `a.layers`) and a draft of `a.draft_layers`
    on it: bf16 target and FlexAttention on CUDA, fp32 and SDPA on CPU."""
    config = tiny_config(
        "qwen3",
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=3 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 64,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=max(4096, seq),
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = Qwen3ForCausalLM(config).to(device, dtype).eval().requires_grad_(False)
    dspark = DSparkConfig(
        mask_token_id=a.vocab - 1,
        draft_num_hidden_layers=a.draft_layers,
        block_size=block,
        num_anchors=anchors,
        attention_backend="flex_attention" if device.type == "cuda" else "sdpa",
    )
    return target, DSparkDrafter.from_target(target, dspark).to(device)


def build(a: argparse.Namespace, device: torch.device):
    target, draft = build_target_and_draft(a, device, seq=a.seq, anchors=a.anchors, block=a.block)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    args = SimpleNamespace(shuffle_seed=0, max_grad_norm=1.0, seq_length=a.seq, divergence_factor=None)
    step = DSparkStep(draft, draft, target, args, LossConfig(), info, defer_fsdp_sync=False)
    optimizer = build_optimizer(draft, OptimizerConfig(lr=1e-4))
    return step, optimizer, build_scheduler(optimizer, OptimizerConfig(lr=1e-4), 1000)


def rows(a: argparse.Namespace, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        length = int(torch.randint(a.seq // 2, a.seq + 1, (1,), generator=g))
        mask = torch.zeros(length, dtype=torch.long)
        mask[length // 4 :] = 1
        out.append({"input_ids": torch.randint(0, a.vocab - 1, (length,), generator=g), "loss_mask": mask})
    return out


def micro_batches(a: argparse.Namespace, data: list[dict], step: int) -> list[MicroBatch]:
    out = []
    for m in range(a.accum):
        idx = [(step * a.accum + m) * a.micro_batch + i for i in range(a.micro_batch)]
        batch = collate([data[i % len(data)] for i in idx], seq_length=a.seq, pad_token_id=0)
        out.append(MicroBatch(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], idx))
    return out


PHASES = ("target_forward", "draft_forward_backward", "optimizer", "other")


def phase_shares(totals: dict[str, float], total: float) -> dict[str, float]:
    """Each phase's share of `total` wall time; "other" is whatever the timed phases do not cover."""
    phases = dict(totals)
    phases["other"] = total - sum(phases.values()) + phases.pop("other", 0.0)
    return {name: phases.get(name, 0.0) / total for name in PHASES}


def unfused_head_loss(head, hidden, markov_features, teacher_hidden, target_ids, eval_mask, confidence, config):
    """The objective before fusion: `[B, N, K, V]` draft and teacher logits materialised, then `dspark_loss`."""
    logits = head.draft_logits(hidden, markov_features)
    teacher = head.teacher_logits(teacher_hidden)
    return dspark_loss(logits, teacher, target_ids, eval_mask, confidence, config)


@contextlib.contextmanager
def objective(name: str):
    """Run the recipe's step with the `fused` (its own) or the `unfused` objective."""
    fused = step_module.dspark_head_loss
    if name == "unfused":
        step_module.dspark_head_loss = unfused_head_loss
    try:
        yield
    finally:
        step_module.dspark_head_loss = fused


OBJECTIVES = ("fused", "unfused")


def timed_step(step: DSparkStep, batches: list[MicroBatch], optimizer, scheduler) -> tuple[float, dict[str, float]]:
    """(wall s, phase seconds) of one optimizer step."""
    step.timer.totals.clear()
    start = time.perf_counter()
    step.train_step(batches, 0, optimizer, scheduler)
    if step.info.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, dict(step.timer.totals)


def main() -> None:
    a = parse()
    device = torch.device(a.device)
    step, optimizer, scheduler = build(a, device)
    data = rows(a, 64)
    for s in range(2):  # warm-up (allocator, compile), both objectives
        with objective(OBJECTIVES[s % 2]):
            step.train_step(micro_batches(a, data, s), 0, optimizer, scheduler)
    step.timer.enabled = True
    total = dict.fromkeys(OBJECTIVES, 0.0)
    phases: dict[str, dict[str, float]] = {name: {} for name in OBJECTIVES}
    for s in range(2, 2 + a.steps):
        for name in OBJECTIVES if s % 2 else OBJECTIVES[::-1]:  # alternate which goes first
            with objective(name):
                wall, phase = timed_step(step, micro_batches(a, data, s), optimizer, scheduler)
            total[name] += wall
            phases[name] = {k: phases[name].get(k, 0.0) + v for k, v in phase.items()}
    shares = phase_shares(phases["fused"], total["fused"])
    print(
        f"device={device} steps={a.steps} per objective (micro_batch={a.micro_batch} x accum={a.accum}, "
        f"seq={a.seq}, anchors={a.anchors}, block={a.block}, vocab={a.vocab})"
    )
    print("phase shares of the fused step:")
    for name, value in shares.items():
        print(f"  {name:<24} {value:6.1%}")
    share = shares["other"]
    print(f"everything else: {share:.1%} of the step (limit 15%) -> {'PASS' if share <= 0.15 else 'FAIL'}")
    step_ms = {name: total[name] / a.steps * 1000 for name in OBJECTIVES}
    draft_ms = {name: phases[name].get("draft_forward_backward", 0.0) / a.steps * 1000 for name in OBJECTIVES}
    print(f"{'objective':<10}{'step ms':>10}{'draft fwd+bwd ms':>18}")
    for name in OBJECTIVES:
        print(f"{name:<10}{step_ms[name]:>10.1f}{draft_ms[name]:>18.1f}")
    step_ratio = step_ms["fused"] / step_ms["unfused"]
    draft_ratio = draft_ms["fused"] / max(draft_ms["unfused"], 1e-9)
    print(f"fused / unfused: step time {step_ratio:.3f}x, draft forward+backward {draft_ratio:.3f}x")
    figures = {
        "step_ms_fused": round(step_ms["fused"], 1),
        "step_ms_unfused": round(step_ms["unfused"], 1),
        "draft_fwd_bwd_ms_fused": round(draft_ms["fused"], 1),
        "draft_fwd_bwd_ms_unfused": round(draft_ms["unfused"], 1),
        "step_time_ratio_fused_vs_unfused": round(step_ratio, 3),
        "draft_fwd_bwd_ratio_fused_vs_unfused": round(draft_ratio, 3),
        "other_share_fused": round(share, 4),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
