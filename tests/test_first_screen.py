"""A clean first screen: no dependency noise on any `dspark` command, and tools that do not need NeMo AutoModel
never import it. Each check runs in a fresh interpreter (this one may have imported anything already)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = (
    "Failed to load",  # torchao's optional CUDA kernels
    "is an Enum subclass and is now natively supported",  # torch's deprecation notice aimed at torchao
    "Transformer Engine and Apex are not installed",  # megatron_fsdp's fallback notice
)
TOOL_MODULES = (
    "nemo_automodel_dspark.cli",
    "nemo_automodel_dspark.demo",
    "nemo_automodel_dspark.tools.regenerate",
    "nemo_automodel_dspark.tools.generators",
    "nemo_automodel_dspark.tools.tiny_target",
    "nemo_automodel_dspark.inference.evaluate",
    "nemo_automodel_dspark.inference.calibration",
    "nemo_automodel_dspark.inference.scheduler",
    "nemo_automodel_dspark.model.serving",
    "nemo_automodel_dspark.export.engines",
    "nemo_automodel_dspark.target.loading",
)


def _python(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in NOISE)]


def test_help_and_schedule_print_no_dependency_noise(tmp_path):
    rounds = tmp_path / "rounds.jsonl"
    rows = [{"verify_len": 3, "num_accepted": i % 4, "confidence_logits": [2.0, 0.5, -1.0]} for i in range(40)]
    rounds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sps.json").write_text(json.dumps({"1": 100.0, "4": 90.0, "16": 40.0}))
    helped = _python("-m", "nemo_automodel_dspark", "--help")
    scheduled = _python(
        "-m", "nemo_automodel_dspark", "schedule", "--confidences", str(rounds), "--sps", str(tmp_path / "sps.json")
    )
    assert helped.returncode == 0 and "regenerate" in helped.stdout
    assert scheduled.returncode == 0 and "realised gain" in scheduled.stdout
    assert _noise(helped.stderr) == [] and _noise(scheduled.stderr) == []


def test_tools_import_neither_nemo_automodel_nor_noise():
    """The tools' modules (regenerate, evaluate, calibrate, schedule, serving) never import NeMo AutoModel, and
    loading a transformers model class (which imports torchao) after them prints no noise."""
    code = (
        "import importlib, sys\n"
        f"for name in {TOOL_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "    leaked = sorted(m for m in sys.modules if m.split('.')[0] == 'nemo_automodel')\n"
        "    print(name, leaked[:3])\n"
        "from transformers import Qwen3ForCausalLM\n"
        "print('torchao' in sys.modules)\n"
    )
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[:-1] == [f"{name} []" for name in TOOL_MODULES]
    assert lines[-1] == "True"  # torchao was imported (its noise was possible) ...
    assert _noise(result.stderr) == []  # ... and none of it showed


@pytest.mark.slow
def test_the_recipe_imports_nemo_automodel_without_noise():
    """Training needs NeMo AutoModel; its import chain's known noise is filtered."""
    result = _python("-c", "import nemo_automodel_dspark.train_dspark, sys; print('nemo_automodel' in sys.modules)")
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]
    assert _noise(result.stderr) == []


def test_the_filters_let_other_warnings_through():
    code = (
        "import logging, warnings\n"
        "import nemo_automodel_dspark\n"
        "logging.getLogger('torchao').warning('torchao says something else')\n"
        "logging.getLogger('torch.utils._pytree').warning('pytree says something else')\n"
        "warnings.warn('a real warning', UserWarning)\n"
    )
    stderr = _python("-c", code).stderr
    for expected in ("torchao says something else", "pytree says something else", "a real warning"):
        assert expected in stderr
