"""The correctness checks of `gpu_check.py`: each builds its own small models, compares two paths, returns a verdict.

Every check returns a dict with `passed` (bool), the measured figures and the `bound` they were held to. On CUDA the
compared path is the one real training takes (bf16 target, bf16 autocast or FSDP2 mixed precision, compiled
FlexAttention); on CPU (`--dry-run`) the same code runs in fp32 or CPU autocast, with eager FlexAttention. The
problem sizes, bounds and builders are in `gpu_problem.py`. `tests/test_gpu_check.py` runs these functions under
`pytest -m gpu` with the same assertions.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import torch
from gpu_problem import (
    Problem,
    bound,
    build_draft,
    build_step,
    build_target,
    eager_flex_on_cpu,
    loss_and_grads,
    make_batch,
    rel_l2,
    rel_max,
)
from torch import Tensor

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.inference.speculative import SpeculativeDecoder
from nemo_automodel_dspark.masks import sample_anchors
from nemo_automodel_dspark.recipe.batching import plan_micro_batch
from nemo_automodel_dspark.recipe.step import DSparkStep, MicroBatch
from nemo_automodel_dspark.target.capture import capture_target_features


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
    mode = eager_flex_on_cpu(flex, device)
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
    docs, padded, packed = _packing_layouts(p, device)
    assert packed.spans is not None
    layer_ids = list(draft.dspark.target_layer_ids)
    feats_u = capture_target_features(target, padded.input_ids, padded.attention_mask, layer_ids).features
    feats_p = capture_target_features(target, packed.input_ids, None, layer_ids, packed.position_ids).features
    feat_u = torch.cat([feats_u[d, : len(doc["input_ids"])] for d, doc in enumerate(docs)]).float()
    feat_p = torch.cat([feats_p[r, s : s + n] for r, row in enumerate(packed.spans) for s, n in row]).float()
    anchors = _same_anchors(docs, packed.spans, p.anchors, device)
    sums_u, grads_u = _sums_and_grads(step, padded, *anchors[0])
    sums_p, grads_p = _sums_and_grads(step, packed, *anchors[1])
    feat_err = rel_max(feat_p, feat_u)
    sums_err = max(rel_max(sums_p[k], sums_u[k]) for k in sums_u)  # each sum: a scalar or one per block slot
    grad_err, worst = rel_l2(grads_p, grads_u)
    fb, sb, gb = bound("packed_features", device), bound("packed_sums", device), bound("packed_grads", device)
    return {
        "passed": feat_err <= fb and sums_err <= sb and grad_err <= gb and bool(sums_u["weight"] > 0),
        "documents": [len(doc["input_ids"]) for doc in docs],
        "features_rel_max_err": feat_err,
        "sums_rel_max_err": sums_err,
        "grads_rel_l2_err": grad_err,
        "worst_grad": worst,
        "bound": {"features_rel_max_err": fb, "sums_rel_max_err": sb, "grads_rel_l2_err": gb},
    }


def _packing_layouts(p: Problem, device: torch.device) -> tuple[list[dict], MicroBatch, MicroBatch]:
    """(documents, one a padded row, packed two rows: documents 0 + 1, then 2), both by the recipe's
    `plan_micro_batch`; random ids, the first quarter of each document unsupervised."""
    g = torch.Generator().manual_seed(4)
    docs = []
    for n in (p.seq * 5 // 8, p.seq * 3 // 8 - 2, p.seq // 4):
        loss_mask = torch.ones(n, dtype=torch.long)
        loss_mask[: n // 4] = 0
        docs.append({"input_ids": torch.randint(0, p.target.vocab - 1, (n,), generator=g), "loss_mask": loss_mask})
    padded = plan_micro_batch(docs, [[0], [1], [2]], SimpleNamespace(packed_sequence_size=0), pad_token_id=0)
    packed = plan_micro_batch(docs, [[0, 1], [2]], SimpleNamespace(packed_sequence_size=p.seq), pad_token_id=0)
    return docs, dataclasses.replace(padded, **_on(padded, device)), dataclasses.replace(packed, **_on(packed, device))


def _on(batch: MicroBatch, device: torch.device) -> dict[str, Tensor]:
    names = ("input_ids", "attention_mask", "loss_mask", "position_ids")
    return {n: getattr(batch, n).to(device) for n in names if getattr(batch, n) is not None}


def _same_anchors(docs: list[dict], spans: list[list[tuple[int, int]]], n: int, device: torch.device) -> list:
    """The same `n` anchors per document in both layouts: [(anchors, keep) [3, n] one document a row, (anchors,
    keep) [2, 3 n] shifted into the packed rows, zero-padded]."""
    per_doc = [
        sample_anchors(doc["loss_mask"][None], n, torch.Generator().manual_seed(10 + d)) for d, doc in enumerate(docs)
    ]
    first = iter(range(len(docs)))
    rows = []
    for row in spans:
        ids = [next(first) for _ in row]
        a = torch.cat([per_doc[d][0][0] + s for d, (s, _) in zip(ids, row, strict=True)])
        k = torch.cat([per_doc[d][1][0] for d in ids])
        fill = len(docs) * n - a.numel()
        rows.append((torch.cat([a, a.new_zeros(fill)]), torch.cat([k, k.new_zeros(fill)])))
    padded = torch.cat([a for a, _ in per_doc]), torch.cat([k for _, k in per_doc])
    packed = torch.stack([a for a, _ in rows]), torch.stack([k for _, k in rows])
    return [tuple(t.to(device) for t in padded), tuple(t.to(device) for t in packed)]


def _sums_and_grads(step: DSparkStep, batch: MicroBatch, anchors: Tensor, keep: Tensor) -> tuple[dict, dict]:
    """The objective's sums and the draft's gradients (fp32, CPU) of one micro-batch with these anchors."""
    step.model.zero_grad(set_to_none=True)
    loss = step._forward_loss(batch, anchors, keep)
    loss.numerator.backward()
    grads = {n: t.grad.float().cpu() for n, t in step.model.named_parameters() if t.grad is not None}
    return {k: v.detach().float().cpu() for k, v in loss.sums.items()}, grads


CHECKS = {
    "flex_vs_sdpa": check_flex_vs_sdpa,
    "bf16_step_vs_fp32_cpu": check_bf16_step_vs_fp32_cpu,
    "capture_vs_hf_hidden_states": check_capture_vs_hf,
    "greedy_speculative_vs_target": check_greedy_speculative,
    "fsdp2_world1_vs_bare": check_fsdp2_world1,
    "packed_vs_padded": check_packed_vs_padded,
}
