"""The correctness checks of `gpu_check.py`: each builds its own small models, compares two paths, returns a verdict.

Every check returns a dict with `passed` (bool), the measured figures and the `bound` they were held to. On CUDA the
compared path is the one real training takes (bf16 target, bf16 autocast or FSDP2 mixed precision, compiled
FlexAttention); on CPU (`--dry-run`) the same code runs in fp32 or CPU autocast, with eager FlexAttention.
`tests/test_gpu_check.py` runs these functions under `pytest -m gpu` with the same assertions.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from transformers import Qwen3ForCausalLM  # imported here, before any section's clock starts

from nemo_automodel_dspark import DSparkConfig, DSparkDrafter
from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.data import collate
from nemo_automodel_dspark.data.packing import collate_packed
from nemo_automodel_dspark.inference.speculative import SpeculativeDecoder
from nemo_automodel_dspark.loss import LossConfig
from nemo_automodel_dspark.masks import flex_block_mask, sample_anchors
from nemo_automodel_dspark.model import layers
from nemo_automodel_dspark.recipe.step import DSparkStep, MicroBatch
from nemo_automodel_dspark.target.capture import capture_target_features
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


def _eager_flex_on_cpu(draft: DSparkDrafter, device: torch.device) -> str:
    """CUDA uses the drafter's own path (BlockMask + compiled flex); CPU forces the BlockMask with eager flex."""
    if device.type == "cuda":
        return "compiled flex_attention + BlockMask (the training path)"
    from torch.nn.attention.flex_attention import flex_attention

    layers._compiled_flex = flex_attention
    block = draft.dspark.block_size
    draft.attention_mask = lambda anchors, keep, seq, *rest: flex_block_mask(anchors, keep, seq, block, *rest)  # type: ignore[method-assign]
    return "eager flex_attention + BlockMask (CPU dry run)"


# ------------------------------------------------------------------------------------------------ the checks
def check_flex_vs_sdpa(device: torch.device, p: Problem) -> dict:
    """FlexAttention BlockMask vs the dense SDPA mask: same draft logits and gradients (bf16 autocast on CUDA).

    FlexAttention has no CPU backward, so the CPU dry run compares the forward (logits, loss) only and says so.
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = build_target(p.target, device, dtype)
    sdpa = build_draft(target, p, "sdpa").to(device)
    flex = copy.deepcopy(sdpa)
    flex.dspark = dataclasses.replace(flex.dspark, attention_backend="flex_attention")  # options are frozen
    mode = _eager_flex_on_cpu(flex, device)
    batch, backward = make_batch(p, device), device.type == "cuda"
    loss_s, grads_s, logits_s = loss_and_grads(build_step(sdpa, sdpa, target, p, device), batch)
    loss_f, grads_f, logits_f = loss_and_grads(build_step(flex, flex, target, p, device), batch, backward=backward)
    logits_err = rel_max(logits_f, logits_s)
    lb, gb = bound("flex_logits", device), bound("flex_grads", device)
    out = {
        "flex": mode,
        "logits_rel_max_err": logits_err,
        "loss_flex": loss_f,
        "loss_sdpa": loss_s,
        "bound": {"logits_rel_max_err": lb, "grads_rel_l2_err": gb},
    }
    if not backward:
        out["grads"] = "not compared: FlexAttention does not support backward on CPU"
        return {"passed": logits_err <= lb, **out}
    grad_err, worst = rel_l2(grads_f, grads_s)
    return {"passed": logits_err <= lb and grad_err <= gb, **out, "grads_rel_l2_err": grad_err, "worst_grad": worst}


def check_bf16_step_vs_fp32_cpu(device: torch.device, p: Problem) -> dict:
    """One step with the bf16 target + bf16 autocast draft on `device` vs the fp32 CPU step on the same batch."""
    cpu = torch.device("cpu")
    target32 = build_target(p.target, cpu, torch.float32)
    draft32 = build_draft(target32, p, "sdpa")
    backend = "flex_attention" if device.type == "cuda" else "sdpa"  # the recipe's choice per device
    draft16 = copy.deepcopy(draft32).to(device)
    draft16.dspark = dataclasses.replace(draft16.dspark, attention_backend=backend)
    target16 = copy.deepcopy(target32).to(device, torch.bfloat16)
    ref_loss, ref_grads, _ = loss_and_grads(build_step(draft32, draft32, target32, p, cpu), make_batch(p, cpu))
    step16 = build_step(draft16, draft16, target16, p, device)
    if device.type == "cpu":  # the recipe autocasts on CUDA only; the dry run exercises CPU autocast instead
        step16.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    loss16, grads16, _ = loss_and_grads(step16, make_batch(p, device))
    loss_err = abs(loss16 - ref_loss) / abs(ref_loss)
    grad_err, worst = rel_l2(grads16, ref_grads)
    lb, gb = bound("bf16_loss", device), bound("bf16_grads", device)
    return {
        "passed": loss_err <= lb and grad_err <= gb,
        "autocast": str(step16.autocast.__class__.__name__),
        "loss_fp32_cpu": ref_loss,
        "loss_bf16": loss16,
        "loss_rel_err": loss_err,
        "grads_rel_l2_err": grad_err,
        "worst_grad": worst,
        "bound": {"loss_rel_err": lb, "grads_rel_l2_err": gb},
    }


def check_capture_vs_hf(device: torch.device, p: Problem) -> dict:
    """Hook capture of the bf16 target == HF `output_hidden_states` (ids +1), bit for bit."""
    target = build_target(p.target, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    batch = make_batch(p, device)
    layer_ids = [0, p.target.layers // 2, p.target.layers - 1]  # a layer output, a middle one, the final norm
    captured = capture_target_features(target, batch.input_ids, batch.attention_mask, layer_ids)
    with torch.no_grad():
        hs = target(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    expected = torch.cat([hs.hidden_states[i + 1] for i in layer_ids], dim=-1)
    feat_err = float((captured.features.float() - expected.float()).abs().max())
    last_err = float((captured.last_hidden.float() - hs.hidden_states[-1].float()).abs().max())
    return {
        "passed": feat_err == 0.0 and last_err == 0.0 and captured.features.dtype == expected.dtype,
        "dtype": str(captured.features.dtype),
        "layer_ids": layer_ids,
        "features_max_abs_diff": feat_err,
        "last_hidden_max_abs_diff": last_err,
        "bound": {"max_abs_diff": 0.0},
    }


def check_greedy_speculative(device: torch.device, p: Problem) -> dict:
    """Greedy speculative decoding (random draft) emits exactly the target's own greedy tokens."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = build_target(p.decode_target, device, dtype, init_range=0.5)  # peaked: no near-ties in bf16
    draft = build_draft(target, p, "sdpa", draft_layers=1).to(device, dtype).eval()
    decoder = SpeculativeDecoder(target, draft, temperature=0.0, eos=set())
    g = torch.Generator().manual_seed(3)
    mismatches, rounds, tokens = [], 0, 0
    for i in range(p.decode_prompts):
        prompt = torch.randint(0, p.decode_target.vocab - 1, (8 + 4 * i,), generator=g).tolist()
        state = decoder.generate(prompt, p.decode_tokens, torch.Generator().manual_seed(i))
        ids = torch.tensor([prompt], device=device)
        ref = target.generate(ids, do_sample=False, max_new_tokens=p.decode_tokens)[0, len(prompt) :].tolist()
        rounds, tokens = rounds + len(state.rounds), tokens + len(state.generated)
        if state.generated != ref:
            first = next((j for j, (a, b) in enumerate(zip(state.generated, ref, strict=False)) if a != b), None)
            mismatches.append({"prompt": i, "first_diff_at": first})
    return {
        "passed": not mismatches,
        "prompts": p.decode_prompts,
        "tokens": tokens,
        "rounds": rounds,
        "mismatches": mismatches,
        "bound": {"mismatching_prompts": 0},
    }


def check_fsdp2_world1(device: torch.device, p: Problem) -> dict:
    """FSDP2 (`fully_shard`, bf16 MixedPrecisionPolicy on CUDA) at world size 1 == the bare module under autocast."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        target = build_target(p.target, device, dtype)
        attn = "flex_attention" if device.type == "cuda" else "sdpa"
        bare = build_draft(target, p, attn).to(device)
        sharded = D.fully_shard_draft(copy.deepcopy(bare), device)
        batch = make_batch(p, device)
        bare_step = build_step(bare, bare, target, p, device)
        fsdp_step = build_step(sharded, sharded, target, p, device)
        loss_b, grads_b, _ = loss_and_grads(bare_step, batch)
        loss_f, grads_f, _ = loss_and_grads(fsdp_step, batch)
    finally:
        if owned:
            dist.destroy_process_group()
    loss_err = abs(loss_f - loss_b) / abs(loss_b)
    grad_err, worst = rel_l2(grads_f, grads_b)
    lb, gb = bound("fsdp_loss", device), bound("fsdp_grads", device)
    return {
        "passed": loss_err <= lb and grad_err <= gb,
        "backend": backend,
        "bare_autocast": type(bare_step.autocast).__name__,
        "fsdp_autocast": type(fsdp_step.autocast).__name__,
        "loss_bare": loss_b,
        "loss_fsdp2": loss_f,
        "loss_rel_err": loss_err,
        "grads_rel_l2_err": grad_err,
        "worst_grad": worst,
        "bound": {"loss_rel_err": lb, "grads_rel_l2_err": gb},
    }


def check_packed_vs_padded(device: torch.device, p: Problem) -> dict:
    """Three documents packed end to end (positions restarting per document, `packed_sequence_size` = seq) vs one
    per padded row, with the same anchors per document: the target's captured features of every document token,
    the objective's sums and the draft's gradients agree (bf16 target, autocast, compiled FlexAttention on CUDA; the
    recipe's SDPA path in fp32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = build_target(p.target, device, dtype)
    draft = build_draft(target, p, "flex_attention" if device.type == "cuda" else "sdpa").to(device)
    step = build_step(draft, draft, target, p, device)
    lengths = (p.seq * 5 // 8, p.seq * 3 // 8 - 2, p.seq // 4)  # documents 0 + 1 fill one packed row, 2 the next
    packs = ([0, 1], [2])
    g = torch.Generator().manual_seed(4)
    docs = []
    for n in lengths:
        loss_mask = torch.ones(n, dtype=torch.long)
        loss_mask[: n // 4] = 0
        docs.append({"input_ids": torch.randint(0, p.target.vocab - 1, (n,), generator=g), "loss_mask": loss_mask})
    padded_t = collate(docs, seq_length=p.seq, pad_token_id=0)
    packed_t = collate_packed([[docs[d] for d in pack] for pack in packs], packed_sequence_size=p.seq, pad_token_id=0)
    starts = [[sum(lengths[d] for d in pack[:i]) for i in range(len(pack))] for pack in packs]
    spans = [[(s, lengths[d]) for s, d in zip(st, pack, strict=True)] for st, pack in zip(starts, packs, strict=True)]
    padded = MicroBatch(*(padded_t[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask")), [0, 1, 2])
    packed = MicroBatch(
        *(packed_t[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask")),
        [0, 1, 2],
        packed_t["position_ids"].to(device),
        spans,
    )
    # the same anchors per document: [3, N] one document a row, shifted into the packed rows [2, 3 N] (zero-padded)
    per_doc = [
        sample_anchors(doc["loss_mask"][None], p.anchors, torch.Generator().manual_seed(10 + d))
        for d, doc in enumerate(docs)
    ]
    rows = []
    for pack, st in zip(packs, starts, strict=True):
        a = torch.cat([per_doc[d][0][0] + s for d, s in zip(pack, st, strict=True)])
        k = torch.cat([per_doc[d][1][0] for d in pack])
        fill = len(docs) * p.anchors - a.numel()
        rows.append((torch.cat([a, a.new_zeros(fill)]), torch.cat([k, k.new_zeros(fill)])))
    anchors = {
        "padded": (torch.cat([a for a, _ in per_doc]).to(device), torch.cat([k for _, k in per_doc]).to(device)),
        "packed": (torch.stack([a for a, _ in rows]).to(device), torch.stack([k for _, k in rows]).to(device)),
    }
    layer_ids = list(draft.dspark.target_layer_ids)
    feats_u = capture_target_features(target, padded.input_ids, padded.attention_mask, layer_ids).features
    feats_p = capture_target_features(target, packed.input_ids, None, layer_ids, packed.position_ids).features
    feat_u = torch.cat([feats_u[d, : lengths[d]] for d in range(len(docs))]).float()
    feat_p = torch.cat([feats_p[r, s : s + n] for r, row in enumerate(spans) for s, n in row]).float()
    results = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        step.model.zero_grad(set_to_none=True)
        loss = step._forward_loss(batch, *anchors[name])
        loss.numerator.backward()
        grads = {n: t.grad.float().cpu() for n, t in step.model.named_parameters() if t.grad is not None}
        results[name] = ({k: v.detach().float().cpu() for k, v in loss.sums.items()}, grads)
    (sums_u, grads_u), (sums_p, grads_p) = results["padded"], results["packed"]
    feat_err = rel_max(feat_p, feat_u)
    sums_err = max(rel_max(sums_p[k], sums_u[k]) for k in sums_u)  # each sum: a scalar or one per block slot
    grad_err, worst = rel_l2(grads_p, grads_u)
    fb, sb, gb = bound("packed_features", device), bound("packed_sums", device), bound("packed_grads", device)
    return {
        "passed": feat_err <= fb and sums_err <= sb and grad_err <= gb and bool(sums_u["weight"] > 0),
        "documents": list(lengths),
        "features_rel_max_err": feat_err,
        "sums_rel_max_err": sums_err,
        "grads_rel_l2_err": grad_err,
        "worst_grad": worst,
        "bound": {"features_rel_max_err": fb, "sums_rel_max_err": sb, "grads_rel_l2_err": gb},
    }


CHECKS = {
    "flex_vs_sdpa": check_flex_vs_sdpa,
    "bf16_step_vs_fp32_cpu": check_bf16_step_vs_fp32_cpu,
    "capture_vs_hf_hidden_states": check_capture_vs_hf,
    "greedy_speculative_vs_target": check_greedy_speculative,
    "fsdp2_world1_vs_bare": check_fsdp2_world1,
    "packed_vs_padded": check_packed_vs_padded,
}
