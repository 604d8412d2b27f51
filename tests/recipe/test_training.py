"""End-to-end recipe runs on CPU: equivalences (ranks, accumulation, resume) and failure modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers.recipe_assets import base_config, write_config, write_rows
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(
    cfg_path: Path, nproc: int, *extra: str, module: str = "nemo_automodel_dspark.train_dspark", wait: bool = True
):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
    cmd += [str(cfg_path)] if module == "nemo_automodel.cli.app" else ["-c", str(cfg_path)]
    cmd += list(extra)
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run(tmp: Path, assets: dict, name: str, nproc: int = 1, *, distributed: dict | None = None, **args) -> Path:
    out = tmp / name
    cfg = base_config(assets, out, **args)
    if distributed:
        cfg["distributed"] = distributed
    torchrun(write_config(cfg, tmp / f"{name}.yaml"), nproc)
    return out


def weights(out: Path, step: int) -> dict:
    return load_file(str(out / "ckpt" / f"epoch_0_step_{step}" / "model.safetensors"))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "dspark_train_metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


def assert_same_metrics(a: list[dict], b: list[dict], keys=("loss", "ce_loss", "l1_loss", "tau", "accept_rate")):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            if key in ra or key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_assets):
    """1 rank, micro_batch_size 2, 3 steps: the reference the other layouts must reproduce."""
    return run(tmp_path_factory.mktemp("base"), tiny_assets, "one", max_steps=3, micro_batch_size=2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_equal_one_rank(tmp_path, tiny_assets, baseline, strategy):
    out = run(
        tmp_path, tiny_assets, strategy, nproc=2, distributed={"strategy": strategy}, max_steps=3, micro_batch_size=1
    )
    assert_same_weights(weights(out, 3), weights(baseline, 3))
    assert_same_metrics(records(out), records(baseline))


def test_accumulation_equals_big_batch(tmp_path, tiny_assets, baseline):
    out = run(tmp_path, tiny_assets, "accum", max_steps=3, micro_batch_size=1, grad_accumulation_steps=2)
    assert_same_weights(weights(out, 3), weights(baseline, 3))
    assert_same_metrics(records(out), records(baseline))


def test_checkpoint_is_servable_and_metrics_complete(baseline):
    from nemo_automodel_dspark import DSparkDrafter

    final = baseline / "ckpt" / "epoch_0_step_3"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["block_size"] == 4
    draft = DSparkDrafter.from_pretrained(final)
    assert draft.dspark.target_layer_ids == [0, 2] and draft.dspark.mask_token_id == 3
    recs = records(baseline)
    assert [r["step"] for r in recs] == [1, 2, 3]
    expected = {
        "loss",
        "ce_loss",
        "l1_loss",
        "confidence_loss",
        "accept_rate",
        "tau",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mem",
        "confidence_abs_error",
        "confidence_bias",
        "epoch",
        "timestamp",
    }
    expected |= {f"accept_rate@{k}" for k in range(4)}
    for r in recs:
        assert expected <= r.keys()
        assert r["loss"] == pytest.approx(0.1 * r["ce_loss"] + 0.9 * r["l1_loss"] + 1.0 * r["confidence_loss"])
        assert 1.0 <= r["tau"] <= 5.0


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, tiny_assets):
    """A 6-step run killed (SIGKILL of the torchrun job) after its step-3 checkpoint, resumed with LATEST."""
    big_val = write_rows(tmp_path / "val.jsonl", 160, seed=7)  # slow validation after every step gives time to kill
    args = dict(max_steps=6, micro_batch_size=1, ckpt_every_steps=3, val_data_path=str(big_val), val_every_steps=1)
    full = run(tmp_path, tiny_assets, "full", nproc=2, **args)

    out = tmp_path / "killed"
    cfg_path = write_config(base_config(tiny_assets, out, **args), tmp_path / "killed.yaml")
    proc = torchrun(cfg_path, 2, wait=False)
    marker = out / "ckpt" / "epoch_0_step_3" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never wrote its step-3 checkpoint"
    assert not (out / "ckpt" / "epoch_0_step_6").exists(), "the kill came too late to test a resume"

    torchrun(cfg_path, 2, "--checkpoint.restore_from=LATEST")
    assert_same_weights(weights(out, 6), weights(full, 6), tol=0.0)
    states = [json.loads((run / "ckpt" / "epoch_0_step_6" / "trainer_state.json").read_text()) for run in (out, full)]
    assert states[0]["divergence"] == states[1]["divergence"]  # the guard's reference resumed exactly
    assert_same_metrics(records(out), records(full))
    val_keys = ("val/loss", "val/tau", "val/l1_loss")
    assert_same_metrics(
        [r for r in records(out) if "val/loss" in r], [r for r in records(full) if "val/loss" in r], keys=val_keys
    )


def test_automodel_recipe_loader_runs_it(tmp_path, tiny_assets):
    out = tmp_path / "am"
    cfg_path = write_config(base_config(tiny_assets, out), tmp_path / "am.yaml")
    torchrun(cfg_path, 2, "--recipe_args.max_steps=2", module="nemo_automodel.cli.app")
    assert [r["step"] for r in records(out)] == [1, 2]
    assert (out / "ckpt" / "epoch_0_step_2" / "model.safetensors").exists()


PACKED = dict(packed_sequence_size=96, micro_batch_size=1)
TOKEN_BUDGET = dict(max_tokens_per_batch=96)


def checkpoint_at(out: Path, step: int) -> Path:
    (path,) = (out / "ckpt").glob(f"epoch_*_step_{step}")
    return path


def last_weights(out: Path) -> tuple[int, dict]:
    step = max(int(p.name.rsplit("_", 1)[1]) for p in (out / "ckpt").glob("epoch_*_step_*"))
    return step, load_file(str(checkpoint_at(out, step) / "model.safetensors"))


@pytest.mark.parametrize("mode", [PACKED, TOKEN_BUDGET], ids=["packed", "token_budget"])
def test_batch_plans_resume_mid_epoch_exactly(tmp_path, tiny_assets, mode):
    """Two epochs (plans of different lengths); a second run restored from the step-3 checkpoint ends identical."""
    args = dict(num_epochs=2, ckpt_every_steps=3, **mode)
    full = run(tmp_path, tiny_assets, "full", **args)
    steps, final = last_weights(full)
    assert steps >= 6 and {r["epoch"] for r in records(full)} == {0, 1}
    out = tmp_path / "resumed"
    cfg_path = write_config(base_config(tiny_assets, out, **args), tmp_path / "resumed.yaml")
    torchrun(cfg_path, 1, f"--checkpoint.restore_from={checkpoint_at(full, 3)}")
    assert last_weights(out)[0] == steps
    assert_same_weights(last_weights(out)[1], final, tol=0.0)
    assert_same_metrics(records(out), [r for r in records(full) if r["step"] > 3])


def test_packed_two_ranks_equal_one_rank_with_accumulation(tmp_path, tiny_assets):
    """Training and validation (packed too, the same packs on any number of ranks) agree."""
    val = dict(val_data_path=str(write_rows(tmp_path / "val.jsonl", 10, seed=7)), val_every_steps=1)
    one = run(tmp_path, tiny_assets, "one", max_steps=2, grad_accumulation_steps=2, **PACKED, **val)
    two = run(tmp_path, tiny_assets, "two", nproc=2, max_steps=2, **PACKED, **val)
    assert_same_weights(last_weights(two)[1], last_weights(one)[1])
    train = lambda out: [r for r in records(out) if "loss" in r]  # noqa: E731
    assert_same_metrics(train(two), train(one))
    validation = lambda out: [r for r in records(out) if "val/loss" in r]  # noqa: E731
    assert len(validation(one)) == 2
    assert_same_metrics(validation(two), validation(one), keys=("val/loss", "val/tau", "val/l1_loss"))
