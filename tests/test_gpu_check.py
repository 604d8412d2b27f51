"""benchmarks/gpu_check.py: the CPU dry run passes every verdict (CI); the same checks on CUDA under `pytest -m gpu`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import gpu_checks  # noqa: E402
import gpu_problem  # noqa: E402


def test_a_failing_section_is_a_verdict_not_a_crash():
    def broken() -> dict:
        raise ValueError("row 3 is bad")

    result = gpu_check.run_section("broken", broken, budget=10, deadline=time.monotonic() + 60)
    assert result["passed"] is False
    assert result["error"].startswith("ValueError: row 3 is bad at ")
    assert "test_gpu_check.py" in result["error"]  # names the file:line that raised


def test_a_section_over_its_budget_is_stopped_and_recorded():
    def slow() -> dict:
        time.sleep(5)
        return {"passed": True}

    start = time.monotonic()
    result = gpu_check.run_section("slow", slow, budget=1, deadline=time.monotonic() + 60)
    assert time.monotonic() - start < 3
    assert result["passed"] is False and "exceeded its budget of 1 s" in result["error"]


def test_a_section_is_not_started_past_the_overall_deadline():
    result = gpu_check.run_section("late", lambda: {"passed": True}, budget=10, deadline=time.monotonic() + 2.5)
    assert result == {"passed": False, "error": "not started: 2 s left of the run's overall budget"}


def test_gradient_error_is_relative_and_names_the_worst_tensor():
    ref = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 1.0])}
    got = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 1.5])}
    err, worst = gpu_problem.rel_l2(got, ref)
    assert err == pytest.approx(0.5 / (26.0**0.5)) and worst == "b"
    with pytest.raises(ValueError, match="different trainable parameters: \\['c'\\]"):
        gpu_problem.rel_l2({**got, "c": torch.zeros(1)}, ref)


@pytest.mark.slow
def test_dry_run_passes_every_verdict(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == {*gpu_checks.CHECKS, "throughput"}
    assert {name: r.get("passed") for name, r in sections.items()} == {name: True for name in sections}
    tp = sections["throughput"]
    assert tp["ours"]["tokens_per_s"] > 0 and tp["ours"]["steps_timed"] >= 1
    assert sum(tp["ours"]["phase_split"].values()) == pytest.approx(1.0)
    assert tp["config"]["block_size"] == 7  # the shipped qwen3_0.6b_dspark.yaml's draft options
    if not tp["theirs"]["ran"]:  # on CPU: the exact reason, down to NeMo AutoModel's own line
        assert "CUDA" in tp["theirs"]["reason"] and "nemo_automodel/" in tp["theirs"]["reason"]
        assert tp["theirs"]["data"]["tokens_per_row"] == tp["config"]["seq_length"]  # their data path read our rows
    assert json.loads(proc.stdout.strip().splitlines()[-1])["fsdp2_world1_vs_bare"] is True


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(gpu_checks.CHECKS))
def test_check_on_cuda(name):
    result = gpu_checks.CHECKS[name](torch.device("cuda", 0), gpu_problem.REAL)
    assert result["passed"], result


@pytest.mark.gpu
def test_both_recipes_train_on_cuda(tmp_path):
    """The tiny plan on CUDA: ours on compiled FlexAttention, and NeMo AutoModel's recipe runs (no reason given)."""
    import gpu_throughput

    result = gpu_throughput.run_throughput(torch.device("cuda", 0), gpu_throughput.DRY_PLAN, tmp_path)
    assert result["ours"]["attention_backend"] == "flex_attention"
    assert result["ours"]["tokens_per_s"] > 0 and result["ours"]["peak_cuda_memory_gib"] > 0
    assert result["theirs"]["ran"], result["theirs"].get("reason")
    assert result["comparison"]["ratio_tokens_per_s"] > 0
