"""The hardware-aware prefix scheduler (paper §3.2.2, Algorithm 1) and its offline simulation on recorded rounds.

For R concurrent requests with per-position confidences c_{r,j}, the prefix survival is a_{r,j} = Π_{i≤j} c_{r,i}.
Candidates (r, j) are admitted in descending a_{r,j}; each admission adds one token to the verify batch
(B starts at R: every request verifies at least its anchor) and a_{r,j} to the expected accepted tokens τ*
(starting at R: each request gets at least its corrected/bonus token). Admission continues while Θ = τ*·SPS(B)
rises and stops at the **first** non-increase: the decision for (r, j) then never depends on a confidence that
needs the token x_{r,j} itself, which keeps verification lossless (the paper's Appendix A).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_automodel_dspark.inference.arguments import add_schedule_arguments
from nemo_automodel_dspark.inference.calibration import RoundsTable, read_rounds_table


class SPSCurve:
    """Profiled steps/s of the target per verify batch size B (tokens in one forward).

    Between profiled sizes the curve is linear; below the smallest it is that size's value; above the largest the
    token throughput B·SPS(B) is held constant (SPS ∝ 1/B: the compute-bound regime), so an extrapolated large
    batch is never free.
    """

    def __init__(self, points: dict[int, float]) -> None:
        if not points or any(b < 1 or s <= 0 for b, s in points.items()):
            raise ValueError("SPS table needs batch sizes >= 1 mapped to positive steps/s")
        self.sizes = sorted(points)
        self.values = [float(points[b]) for b in self.sizes]

    @classmethod
    def from_json(cls, path: str | Path) -> SPSCurve:
        return cls({int(b): float(s) for b, s in json.loads(Path(path).read_text()).items()})

    def __call__(self, batch: int) -> float:
        sizes, values = self.sizes, self.values
        if batch <= sizes[0]:
            return values[0]
        if batch >= sizes[-1]:
            return values[-1] * sizes[-1] / batch
        i = bisect.bisect_left(sizes, batch)
        if sizes[i] == batch:
            return values[i]
        w = (batch - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
        return values[i - 1] + w * (values[i] - values[i - 1])


@dataclass
class Schedule:
    lengths: list[int]  # ℓ*_r: draft tokens to verify per request
    throughput: float  # Θ_best = τ*·SPS(B) in expected tokens/s
    batch_tokens: int  # B = Σ (1 + ℓ*_r)
    expected_tokens: float  # τ* = Σ (1 + Σ_{j≤ℓ*_r} a_{r,j})


def prefix_survival(confidences: list[list[float]]) -> list[list[float]]:
    """a_{r,j} = Π_{i≤j} c_{r,i} (j 0-based here; the paper's j is ours + 1)."""
    return [[math.prod(c[: j + 1]) for j in range(len(c))] for c in confidences]


def schedule(confidences: list[list[float]], sps: SPSCurve, *, early_stop: bool = True) -> Schedule:
    """Algorithm 1. `early_stop=False` is the retrospective global search of Appendix A (not lossless)."""
    survival = prefix_survival(confidences)
    requests = len(confidences)
    # Ties keep (r, j) order, so a request's prefix is admitted in order even when some c = 1.
    candidates = sorted(
        ((a, r, j) for r, row in enumerate(survival) for j, a in enumerate(row) if a > 0),
        key=lambda c: (-c[0], c[1], c[2]),
    )
    lengths, best = [0] * requests, [0] * requests
    batch, tau = requests, float(requests)
    best_theta, best_batch, best_tau = tau * sps(batch), batch, tau
    for a, r, j in candidates:
        lengths[r] = j + 1
        batch += 1
        tau += a
        theta = tau * sps(batch)
        if theta > best_theta:
            best_theta, best_batch, best_tau, best = theta, batch, tau, list(lengths)
        elif early_stop:
            break
    return Schedule(best, best_theta, best_batch, best_tau)


def _policy_rates(
    table: RoundsTable, picks: list[int], lengths: list[int], expected: float, sps: SPSCurve
) -> tuple[float, float, float]:
    """(expected tokens/s, realised tokens/s, mean verify length) of verifying `lengths` drafts per picked round."""
    step_rate = sps(sum(1 + n for n in lengths))
    realised = sum(min(int(table.num_accepted[i]), n) + 1 for i, n in zip(picks, lengths, strict=True))
    return expected * step_rate, realised * step_rate, sum(lengths) / len(lengths)


def simulate(
    table: RoundsTable,
    confidences: torch.Tensor,
    sps: SPSCurve,
    concurrency: list[int],
    *,
    batches: int = 200,
    seed: int = 0,
) -> list[dict]:
    """Per R: batches of R recorded rounds scheduled by Algorithm 1 vs verifying every recorded position.

    Expected throughput uses the confidences; realised throughput uses what the target actually accepted
    (a round that accepted n drafts yields min(n, ℓ) + 1 tokens when only ℓ are verified).
    """
    generator = torch.Generator().manual_seed(seed)
    rows = len(table.verify_len)
    keys = ("expected_tokens_per_s", "realised_tokens_per_s", "mean_verify_len")
    results = []
    for r in concurrency:
        sched, full = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for _ in range(batches):
            draw = (
                torch.randperm(rows, generator=generator)[:r]
                if r <= rows
                else torch.randint(rows, (r,), generator=generator)
            )
            picks = draw.tolist()
            conf = [confidences[i, : int(table.verify_len[i])].tolist() for i in picks]
            plan = schedule(conf, sps)
            sched += torch.tensor(_policy_rates(table, picks, plan.lengths, plan.expected_tokens, sps))
            every = sum(1 + sum(a) for a in prefix_survival(conf))
            full += torch.tensor(_policy_rates(table, picks, [len(c) for c in conf], every, sps))
        sched_rates, full_rates = (sched / batches).tolist(), (full / batches).tolist()
        results.append(
            {
                "concurrency": r,
                "scheduled": dict(zip(keys, sched_rates, strict=True)),
                "full_block": dict(zip(keys, full_rates, strict=True)),
                "realised_gain": sched_rates[1] / full_rates[1],
            }
        )
    return results


# ---------------------------------------------------------------------------------------------------- CLI
add_arguments = add_schedule_arguments


def run(args: argparse.Namespace) -> int:
    from nemo_automodel_dspark.errors import ToolError, require_draft_dir, require_file
    from nemo_automodel_dspark.io import atomic_write_json

    try:
        sps = SPSCurve.from_json(require_file(args.sps, "--sps"))
    except (ValueError, AttributeError) as err:
        raise ToolError(f"--sps {args.sps}: expected a JSON object {{batch size: steps per second}} ({err})") from err
    table = read_rounds_table(args.confidences, "--confidences")
    temperatures = None
    if args.draft:
        require_draft_dir(args.draft)
        temperatures = json.loads((Path(args.draft) / "config.json").read_text()).get("confidence_temperatures")
    if args.concurrency:
        levels = [int(x) for x in args.concurrency.split(",")]
    else:
        levels = [2**i for i in range(20) if 2**i <= sps.sizes[-1]]
    results = simulate(table, table.confidences(temperatures), sps, levels, batches=args.batches, seed=args.seed)
    print(
        f"[dspark] scheduler on {len(table.verify_len)} rounds ({'calibrated' if temperatures else 'raw'} "
        "confidences); tokens/s expected | realised, mean verify length"
    )
    print("      R   scheduled                      full block                     realised gain")
    for row in results:
        s, f = row["scheduled"], row["full_block"]
        print(
            f"  {row['concurrency']:>5}   {s['expected_tokens_per_s']:9.3f} | {s['realised_tokens_per_s']:9.3f}"
            f"  ℓ={s['mean_verify_len']:4.2f}   {f['expected_tokens_per_s']:9.3f} | "
            f"{f['realised_tokens_per_s']:9.3f}  ℓ={f['mean_verify_len']:4.2f}   ×{row['realised_gain']:.3f}"
        )
    if args.output:
        atomic_write_json(args.output, {"temperatures": temperatures, "results": results})
    return 0
