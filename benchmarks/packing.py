"""Padding and documents/s: padded rows vs packed rows vs token-budget micro-batches, measured side by side.

Lengths are synthetic and seeded: log-normal with median ~900 and p90 ~3,000 tokens, capped at 4,096 (regenerated
chat data). The padding fractions are computed on 20,000 such documents at full scale with the recipe's own plans
(`data/packing.py`). Documents/s runs the recipe's train step (`DSparkStep.train_step`, one micro-batch per
optimizer step, collation included) over the same documents in each mode, on a random Qwen3 target several times
the draft's cost (the printed phase ratio); on CPU every length is divided by `--scale` (shape kept).
It also prints documents per CPU-second (process time), steadier than wall time on a shared host.

    python benchmarks/packing.py                      # CPU defaults (a few minutes on 2 cores)
    python benchmarks/packing.py --device cuda --scale 1 --hidden 2048 --layers 16 --vocab 151936 --docs 512

Besides documents/s it counts the anchors each mode trains (kept blocks, the recipe's anchor rule: a padded row
draws min(num_anchors, candidates) whatever its document's length, a packed row spreads its num_anchors · P /
seq_length blocks over its documents) and the supervised slot weight, per second.

Ends with one JSON line: padding_fraction_{padded,packed,token_budget},
docs_per_s_ratio_{packed,token_budget}_vs_padded, anchors_per_s_ratio_{packed,token_budget}_vs_padded and
slot_weight_per_s_ratio_{packed,token_budget}_vs_padded.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from types import SimpleNamespace

import torch
from step_time import build_target_and_draft

from nemo_automodel_dspark.data.packing import (
    DEFAULT_BUFFER_ROWS,
    PlanOptions,
    epoch_permutation,
    epoch_plan,
    pack_rows,
)
from nemo_automodel_dspark.distributed import DistInfo
from nemo_automodel_dspark.loss import LossConfig
from nemo_automodel_dspark.masks import pack_anchor_count, split_anchor_budget
from nemo_automodel_dspark.recipe import batching
from nemo_automodel_dspark.recipe.config import OptimizerConfig
from nemo_automodel_dspark.recipe.optim import build_optimizer, build_scheduler
from nemo_automodel_dspark.recipe.step import DSparkStep

FULL_SEQ, FULL_ANCHORS, MEDIAN, P90 = 4096, 512, 900.0, 3000.0
MODES = ("padded", "packed", "token_budget")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=int, default=16, help="divide every length (and seq_length, anchors) by this")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=4, help="rows (padded) or packs (packed) per micro-batch")
    p.add_argument("--docs", type=int, default=48, help="documents per timed pass")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per mode, interleaved across modes")
    return p.parse_args()


def lognormal_lengths(n: int, scale: int, seed: int = 0) -> list[int]:
    """Median MEDIAN/scale, p90 P90/scale, clipped to [2, FULL_SEQ/scale]."""
    sigma = math.log(P90 / MEDIAN) / 1.2816  # z of the 90th percentile
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(math.log(MEDIAN / scale) + sigma * torch.randn(n, generator=g))
    return x.round().clamp(2, FULL_SEQ // scale).long().tolist()


def options(mode: str, seq: int, micro_batch: int) -> PlanOptions | None:
    if mode == "padded":
        return None
    if mode == "packed":
        return PlanOptions(packed_sequence_size=seq, packs_per_batch=micro_batch)
    return PlanOptions(max_tokens=micro_batch * seq)


def candidates(n: int) -> int:
    """Candidate anchors of a synthetic document of n tokens (`documents`: loss on all but the first quarter)."""
    return max(0, n - n // 4 - 1)


def anchors_per_doc_full_scale(lengths: list[int]) -> dict[str, float]:
    """Anchors per document at full scale (P = seq_length = 4,096, 512 anchors): padded rows, the recipe's packed
    rule, and the per-document rule it replaced (⌊num_anchors · L / seq_length⌋, capped by the candidates)."""
    packs = pack_rows(epoch_permutation(len(lengths), 0, 0), lengths, FULL_SEQ, DEFAULT_BUFFER_ROWS)
    budget = pack_anchor_count(FULL_SEQ, FULL_ANCHORS, FULL_SEQ)
    packed = sum(sum(split_anchor_budget([candidates(lengths[r]) for r in pack], budget)) for pack in packs)
    floor_rule = sum(min(FULL_ANCHORS * n // FULL_SEQ, candidates(n)) for n in lengths)
    padded = sum(min(FULL_ANCHORS, candidates(n)) for n in lengths)
    return {"padded": padded / len(lengths), "packed": packed / len(lengths), "floor": floor_rule / len(lengths)}


def padding_fractions(lengths: list[int], seq: int, micro_batch: int) -> dict[str, float]:
    """1 − document tokens / tokens the target processes, per mode, with the recipe's plans."""
    real = sum(lengths)
    packed = pack_rows(epoch_permutation(len(lengths), 0, 0), lengths, seq, DEFAULT_BUFFER_ROWS)
    budget = epoch_plan(lengths, PlanOptions(max_tokens=micro_batch * seq), 0, 0)
    budget_tokens = sum(len(mb) * max(lengths[r[0]] for r in mb) for mb in budget)
    budget_real = sum(lengths[r[0]] for mb in budget for r in mb)
    return {
        "padded": 1 - real / (len(lengths) * seq),
        "packed": 1 - real / (len(packed) * seq),
        "token_budget": 1 - budget_real / budget_tokens,
    }


def build(a: argparse.Namespace, device: torch.device, seq: int, anchors: int):
    target, draft = build_target_and_draft(a, device, seq=seq, anchors=anchors, block=7)
    args = SimpleNamespace(
        shuffle_seed=0,
        seq_length=seq,
        max_grad_norm=1.0,
        divergence_factor=None,
        max_tokens_per_batch=0,
        packed_sequence_size=0,
        micro_batch_size=a.micro_batch,
    )
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    step = DSparkStep(draft, draft, target, args, LossConfig(), info, defer_fsdp_sync=False)
    optimizer = build_optimizer(draft, OptimizerConfig(lr=1e-4))
    return step, optimizer, build_scheduler(optimizer, OptimizerConfig(lr=1e-4), 100_000)


def documents(a: argparse.Namespace, lengths: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        mask = torch.zeros(n, dtype=torch.long)
        mask[n // 4 :] = 1  # a prompt, then the response
        out.append({"input_ids": torch.randint(0, a.vocab - 1, (n,), generator=g), "loss_mask": mask})
    return out


def micro_batches(mode: str, docs: list[dict], lengths: list[int], a, seq: int) -> list:
    """Every micro-batch of one pass over `docs` in `mode` (collation is timed with the step, as in the recipe)."""
    plan_options = options(mode, seq, a.micro_batch)
    if plan_options is None:
        order = epoch_permutation(len(docs), 0, 0)
        return [("rows", order[i : i + a.micro_batch]) for i in range(0, len(order), a.micro_batch)]
    return [("plan", mb) for mb in epoch_plan(lengths, plan_options, 0, 0)]


def collate(item, docs: list[dict], step: DSparkStep, mode: str, seq: int):
    kind, payload = item
    if kind == "rows":
        return batching.padded_micro_batches(
            docs, payload, micro_batch_size=len(payload), seq_length=seq, pad_token_id=0
        )
    args = SimpleNamespace(packed_sequence_size=seq if mode == "packed" else 0)
    return [batching.plan_micro_batch(docs, payload, args, 0)]


def kept_anchors(mode, docs, lengths, a, seq, step) -> int:
    """Anchors (kept blocks) one pass trains: the recipe's anchor rule, counted outside the timed passes."""
    total = 0
    for item in micro_batches(mode, docs, lengths, a, seq):
        for batch in collate(item, docs, step, mode, seq):
            total += int(step.anchors(batch, 0, 0)[1].sum())
    return total


def timed_pass(mode, docs, lengths, a, seq, step, optimizer, scheduler) -> tuple[float, float, int, float, dict]:
    """(wall s, CPU s, documents, Σ supervised slot weight, phase seconds) of one pass over the documents."""
    items = micro_batches(mode, docs, lengths, a, seq)
    step.timer.totals.clear()
    weight, count = 0.0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for item in items:
        batch = collate(item, docs, step, mode, seq)
        sums, _ = step.train_step(batch, 0, optimizer, scheduler)
        weight += float(sums["weight"])
        count += len(batch[0].indices)
    if step.info.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, count, weight, dict(step.timer.totals)


def measure_modes(a, docs, lengths, seq: int, runner) -> tuple[dict[str, list], dict[str, float]]:
    """Warm every mode up once, then time `a.rounds` interleaved passes of each: per mode [wall s, documents, slot
    weight, CPU s], and the padded mode's phase split."""
    step, optimizer, scheduler = runner
    for mode in MODES:  # warm-up: allocator, kernels, every shape class once
        items = micro_batches(mode, docs, lengths, a, seq)
        if not items:
            raise SystemExit(f"--docs {a.docs} fill no {mode} micro-batch of {a.micro_batch}; use more documents")
        step.train_step(collate(items[0], docs, step, mode, seq), 0, optimizer, scheduler)
    step.timer.enabled = True
    totals = {m: [0.0, 0, 0.0, 0.0] for m in MODES}
    phases: dict[str, float] = {}
    for _ in range(a.rounds):
        for mode in MODES:  # interleaved, so that machine noise hits every mode alike
            wall, cpu, count, weight, phase = timed_pass(mode, docs, lengths, a, seq, step, optimizer, scheduler)
            totals[mode] = [t + x for t, x in zip(totals[mode], (wall, count, weight, cpu), strict=True)]
            if mode == "padded":
                phases = {k: phases.get(k, 0.0) + v for k, v in phase.items()}
    return totals, phases


def print_table(full, rate, cpu_rate, slots, anchor_rate, totals, anchors_run) -> None:
    """One row per mode: padding at full scale, documents/s, anchors and slot weight per document, ratios to padded."""
    header = (
        ("padding (4096)", 16),
        ("docs/s", 10),
        ("vs padded", 11),
        ("anchors/doc", 13),
        ("anchors/s vs padded", 21),
        ("slot weight/doc", 17),
        ("slots/s vs padded", 19),
        ("docs/CPU-s vs padded", 22),
    )
    print(f"{'mode':<14}" + "".join(f"{name:>{width}}" for name, width in header))
    for m in MODES:
        per_doc = totals[m][2] / max(totals[m][1], 1)
        anchors_per_doc = anchors_run[m] / max(totals[m][1], 1)
        ratio, slot_ratio = rate[m] / rate["padded"], slots[m] / slots["padded"]
        anchor_ratio = anchor_rate[m] / anchor_rate["padded"]
        cpu_ratio = cpu_rate[m] / cpu_rate["padded"]
        print(
            f"{m:<14}{full[m]:>16.2%}{rate[m]:>10.2f}{ratio:>10.2f}x{anchors_per_doc:>13.1f}{anchor_ratio:>20.2f}x"
            f"{per_doc:>17.1f}{slot_ratio:>18.2f}x{cpu_ratio:>21.2f}x"
        )


def main() -> None:
    a = parse()
    device = torch.device(a.device)
    full_lengths = lognormal_lengths(20_000, 1)
    full = padding_fractions(full_lengths, FULL_SEQ, a.micro_batch)
    full_anchors = anchors_per_doc_full_scale(full_lengths)
    seq, anchors = FULL_SEQ // a.scale, max(1, FULL_ANCHORS // a.scale)
    lengths = lognormal_lengths(a.docs, a.scale, seed=1)
    docs = documents(a, lengths)
    step, optimizer, scheduler = build(a, device, seq, anchors)
    anchors_per_pass = {m: kept_anchors(m, docs, lengths, a, seq, step) for m in MODES}
    totals, phases = measure_modes(a, docs, lengths, seq, (step, optimizer, scheduler))
    rate = {m: totals[m][1] / totals[m][0] for m in MODES}
    cpu_rate = {m: totals[m][1] / totals[m][3] for m in MODES}  # documents per CPU second: steadier on a shared host
    cost = phases.get("target_forward", 0.0) / max(phases.get("draft_forward_backward", 0.0), 1e-9)
    print(f"device={device} scale=1/{a.scale} seq={seq} anchors={anchors} docs/pass={a.docs} rounds={a.rounds}")
    print(f"target forward / draft forward+backward time (padded): {cost:.1f}x")
    print(
        f"anchors per document at full scale (20,000 documents, 512 anchors, P = seq = 4,096): padded "
        f"{full_anchors['padded']:.1f}, packed {full_anchors['packed']:.1f} (the per-document floor rule it replaced: "
        f"{full_anchors['floor']:.1f}); a packed row's {pack_anchor_count(FULL_SEQ, FULL_ANCHORS, FULL_SEQ)} blocks "
        f"train {full_anchors['packed'] / full_anchors['floor']:.3f}x the floor rule's anchors"
    )
    slots = {m: totals[m][2] / totals[m][0] for m in MODES}  # supervised slot weight per second
    anchor_rate = {m: anchors_per_pass[m] * a.rounds / totals[m][0] for m in MODES}  # kept anchors per second
    print_table(full, rate, cpu_rate, slots, anchor_rate, totals, {m: anchors_per_pass[m] * a.rounds for m in MODES})
    figures = {
        "padding_fraction_padded": round(full["padded"], 4),
        "padding_fraction_packed": round(full["packed"], 4),
        "padding_fraction_token_budget": round(full["token_budget"], 4),
        "docs_per_s_ratio_packed_vs_padded": round(rate["packed"] / rate["padded"], 3),
        "docs_per_s_ratio_token_budget_vs_padded": round(rate["token_budget"] / rate["padded"], 3),
        "anchors_per_doc_full_scale_padded": round(full_anchors["padded"], 1),
        "anchors_per_doc_full_scale_packed": round(full_anchors["packed"], 1),
        "anchors_per_doc_full_scale_floor_rule": round(full_anchors["floor"], 1),
        "anchors_per_s_ratio_packed_vs_padded": round(anchor_rate["packed"] / anchor_rate["padded"], 3),
        "anchors_per_s_ratio_token_budget_vs_padded": round(anchor_rate["token_budget"] / anchor_rate["padded"], 3),
        "slot_weight_per_s_ratio_packed_vs_padded": round(slots["packed"] / slots["padded"], 3),
        "slot_weight_per_s_ratio_token_budget_vs_padded": round(slots["token_budget"] / slots["padded"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
