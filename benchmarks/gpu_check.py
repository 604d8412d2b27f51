"""The GPU path in one command: CUDA correctness verdicts + training throughput vs NeMo AutoModel's `train_dspark`.

Sized for <= 5 minutes on one H200. Each section runs under its own time budget and any failure (an exception,
a budget overrun) is written into the report as that section's verdict instead of ending the run. Writes a JSON
report, prints a summary table, and ends with one JSON line of the figures; exits 1 if any verdict failed.

    python benchmarks/gpu_check.py --dry-run           # CPU: tiny sizes, same code paths where CPU allows (CI)
    python benchmarks/gpu_check.py --preflight         # CPU: the real throughput plan is accepted (setup, data)
    bash benchmarks/gpu_wheels.sh                      # on a CPU machine with registry access, before the GPU run
    # on the GPU machine, from the repository root (.gpu_wheels/ carried along):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --find-links .gpu_wheels \\
        --target /tmp/site .gpu_wheels/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmarks/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# The sibling modules (also when the tests import this file), and this checkout's package ahead of an installed wheel.
sys.path[:0] = [str(HERE), str(HERE.parent)]

import gpu_checks  # noqa: E402
import gpu_problem  # noqa: E402
import gpu_throughput  # noqa: E402

# Seconds per section: (CUDA, CPU dry run). On CUDA the overall budget keeps the whole run under 5 minutes; the dry
# run's budgets only stop a hung section on a slow, shared CI machine.
BUDGETS = {
    "flex_vs_sdpa": (60, 240),  # includes the first FlexAttention compile (forward and backward)
    "bf16_step_vs_fp32_cpu": (30, 120),
    "capture_vs_hf_hidden_states": (15, 60),
    "greedy_speculative_vs_target": (25, 120),
    "fsdp2_world1_vs_bare": (25, 120),
    "packed_vs_padded": (30, 120),  # includes compiling FlexAttention for the packed block masks
    "throughput": (200, 300),  # both recipes: target build, setup, compile, 10 steps each; capped by the total
}
TOTAL_BUDGET_S = (270, 900)  # CUDA: + imports, start-up and the report stay under 5 minutes


class BudgetExceeded(Exception):
    pass


@contextlib.contextmanager
def time_budget(seconds: int) -> Iterator[None]:
    """Raise BudgetExceeded inside the block after `seconds` (SIGALRM; a CUDA kernel in flight finishes first)."""

    def expire(signum, frame):
        raise BudgetExceeded(f"section exceeded its budget of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_section(name: str, fn: Callable[[], dict], budget: int, deadline: float) -> dict:
    """One section's result, with `passed`, `seconds` and, on any failure, `error` (never raises)."""
    left = int(deadline - time.monotonic())
    if left < 5:
        return {"passed": False, "error": f"not started: {max(left, 0)} s left of the run's overall budget"}
    start = time.monotonic()
    try:
        with time_budget(min(budget, left)):
            result = fn()
    except Exception as exc:  # every failure becomes a verdict, never a crash
        result = {"passed": False, "error": gpu_throughput.where(exc)}
    result["seconds"] = round(time.monotonic() - start, 2)
    print(f"[gpu_check] {name}: {'PASS' if result.get('passed') else 'FAIL'} ({result['seconds']} s)", flush=True)
    return result


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import nemo_automodel

        env["nemo_automodel"] = getattr(nemo_automodel, "__version__", "?")
    except Exception as exc:
        env["nemo_automodel"] = gpu_throughput.where(exc)
    return env


def run_all(dry_run: bool, workdir: Path, total_budget_s: int) -> dict:
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    gpu_throughput.warm_imports()
    deadline = time.monotonic() + total_budget_s
    problem = gpu_problem.DRY if dry_run else gpu_problem.REAL
    plan = gpu_throughput.DRY_PLAN if dry_run else gpu_throughput.REAL_PLAN
    column = 1 if dry_run else 0
    sections: dict[str, dict] = {}
    for name, check in gpu_checks.CHECKS.items():
        sections[name] = run_section(name, lambda c=check: c(device, problem), BUDGETS[name][column], deadline)
    sections["throughput"] = run_section(
        "throughput",
        lambda: gpu_throughput.run_throughput(device, plan, workdir),
        BUDGETS["throughput"][column],
        deadline,
    )
    return {"dry_run": dry_run, "environment": environment(device), "sections": sections}


# ------------------------------------------------------------------------------------------------ report
def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def check_line(name: str, r: dict) -> str:
    verdict = "PASS" if r.get("passed") else "FAIL"
    figures = [(k, v) for k, v in r.items() if isinstance(v, float | int) and k not in ("seconds", "passed")]
    figures.sort(key=lambda kv: not kv[0].endswith(("_err", "_diff")))  # the compared errors first
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in figures[:3])
    bound = ", ".join(f"{k}<={_fmt(v)}" for k, v in (r.get("bound") or {}).items())
    detail = r.get("error") or shown
    return f"| {name} | {verdict} | {detail} | {bound or '-'} | {_fmt(r.get('seconds'))} |"


def throughput_lines(r: dict) -> list[str]:
    if "ours" not in r:
        return []
    ours, theirs, cmp = r["ours"], r["theirs"], r["comparison"]
    rows = ["", "| recipe | tokens/s | median step s | peak CUDA GiB |", "|---|---|---|---|"]
    rows.append(
        f"| ours | {_fmt(ours['tokens_per_s'])} | {_fmt(ours['step_time_s_median'])} | "
        f"{_fmt(ours['peak_cuda_memory_gib'])} |"
    )
    if theirs.get("ran"):
        rows.append(
            f"| NeMo AutoModel 0.7.0 | {_fmt(theirs['tokens_per_s'])} | {_fmt(theirs['step_time_s_median'])} | "
            f"{_fmt(theirs['peak_cuda_memory_gib'])} |"
        )
        rows.append(f"| ours/theirs | {_fmt(cmp['ratio_tokens_per_s'])} | | {_fmt(cmp.get('ratio_peak_memory'))} |")
    else:
        rows.append(f"| NeMo AutoModel 0.7.0 | did not run: {theirs.get('reason')} | | |")
    split = ", ".join(f"{k} {v:.1%}" for k, v in ours["phase_split"].items())
    rows.append(f"\nphase split (ours, {ours['phase_steps']} steps): {split}")
    return rows


def summary_table(report: dict) -> str:
    env = report["environment"]
    kind = "dry run" if report["dry_run"] else "real"
    head = f"gpu_check on {env['gpu'] or env['device']} ({kind}, {env['date_utc']})"
    lines = [head, "", "| section | verdict | figures | bound | s |", "|---|---|---|---|---|"]
    lines += [check_line(name, r) for name, r in report["sections"].items()]
    return "\n".join(lines + throughput_lines(report["sections"]["throughput"]))


def figures(report: dict) -> dict:
    """The one-line JSON summary: every verdict, and the throughput figures side by side."""
    s = report["sections"]
    out: dict = {name: bool(r.get("passed")) for name, r in s.items()}
    tp = s["throughput"]
    if "ours" in tp:
        out["ours_tokens_per_s"] = tp["ours"]["tokens_per_s"]
        out["theirs_tokens_per_s"] = tp["theirs"].get("tokens_per_s")
        out["ratio_tokens_per_s"] = tp["comparison"].get("ratio_tokens_per_s")
        out["ours_peak_gib"] = tp["ours"]["peak_cuda_memory_gib"]
        out["theirs_peak_gib"] = tp["theirs"].get("peak_cuda_memory_gib")
    return out


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (what CI runs)")
    p.add_argument("--out", default="gpu_check.json", help="where the JSON report goes")
    p.add_argument(
        "--budget-s",
        type=int,
        help=f"overall time budget (default {TOTAL_BUDGET_S[0]} s, dry run {TOTAL_BUDGET_S[1]} s)",
    )
    p.add_argument(
        "--preflight",
        action="store_true",
        help="CPU, real sizes, no training: our setup() and their data path accept the throughput plan (~1.5 min)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.preflight:
        with tempfile.TemporaryDirectory(prefix="gpu_preflight_") as work:
            result = gpu_throughput.preflight(gpu_throughput.REAL_PLAN, Path(work))
        print(json.dumps(result))
        return 0 if result["passed"] else 1
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        report = run_all(a.dry_run, Path(work), a.budget_s or TOTAL_BUDGET_S[1 if a.dry_run else 0])
    report["total_seconds"] = round(time.monotonic() - start, 1)
    Path(a.out).write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    print(summary_table(report))
    print(f"total {report['total_seconds']} s; report written to {a.out}")
    print(json.dumps(figures(report)))
    return 0 if all(r.get("passed") for r in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
