"""Training against a sharded target (2 gloo ranks): same weights and metrics as replicated, resumes, `auto`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers.recipe_assets import base_config, write_config
from safetensors.torch import load_file

from nemo_automodel_dspark.recipe.config import parse_config
from nemo_automodel_dspark.recipe.plan import plan_for_config
from nemo_automodel_dspark.target.loading import load_target_config

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TINY_BUDGET_GIB = 1e-5  # below the tiny run's replicated plan, so `auto` shards


def train(tmp: Path, assets: dict, name: str, *, distributed: dict, extra: tuple[str, ...] = (), **args) -> str:
    out = tmp / name
    cfg = base_config(assets, out, max_steps=4, micro_batch_size=1, ckpt_every_steps=2, **args)
    cfg["distributed"] = distributed
    path = write_config(cfg, tmp / f"{name}.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "nemo_automodel_dspark.train_dspark", "-c", str(path), *extra]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def weights(out: Path, step: int) -> dict:
    return load_file(str(out / "ckpt" / f"epoch_0_step_{step}" / "model.safetensors"))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "dspark_train_metrics.jsonl").read_text().splitlines()]


def assert_same(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = weights(a, 4), weights(b, 4)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= tol
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "ce_loss", "l1_loss", "tau", "accept_rate"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)


def auto_choice(assets: dict, tmp: Path, **args) -> bool:
    """What the plan says `auto` should pick for this run on 2 CPU ranks."""
    config = parse_config(base_config(assets, tmp / "unused", max_steps=4, micro_batch_size=1, **args))
    budget = config.recipe_args.memory_budget_gib or 1e9
    return plan_for_config(config, load_target_config(str(assets["target"]), "target"), 2, budget, "cpu").target_sharded


def test_sharded_target_trains_like_replicated_and_resumes(tmp_path, tiny_assets):
    replicated_log = train(tmp_path, tiny_assets, "replicated", distributed={"strategy": "fsdp2"})
    assert "shard_dense_target: auto -> replicated" in replicated_log
    assert auto_choice(tiny_assets, tmp_path) is False

    # auto with a budget the replicated plan exceeds: sharded, with the draft under FSDP2 + activation checkpointing
    tiny = dict(memory_budget_gib=TINY_BUDGET_GIB)
    log = train(
        tmp_path,
        tiny_assets,
        "auto_sharded",
        distributed={"strategy": "fsdp2", "activation_checkpointing": True},
        **tiny,
    )
    assert "shard_dense_target: auto -> sharded over 2 ranks" in log
    assert auto_choice(tiny_assets, tmp_path, **tiny) is True
    assert_same(tmp_path / "auto_sharded", tmp_path / "replicated")

    # forced sharding with a DDP draft, then a resume from its step-2 checkpoint
    ddp = tmp_path / "ddp_sharded"
    train(tmp_path, tiny_assets, "ddp_sharded", distributed={"strategy": "ddp"}, shard_dense_target=True)
    assert_same(ddp, tmp_path / "replicated")
    final, full_records = weights(ddp, 4), records(ddp)
    shutil.rmtree(ddp / "ckpt" / "epoch_0_step_4")
    log = train(
        tmp_path,
        tiny_assets,
        "ddp_sharded",
        distributed={"strategy": "ddp"},
        shard_dense_target=True,
        extra=("--checkpoint.restore_from=LATEST",),
    )
    assert "resumed from" in log and "epoch_0_step_2" in log
    resumed = weights(ddp, 4)
    assert max((resumed[k] - final[k]).abs().max().item() for k in final) == 0.0
    assert [r["loss"] for r in records(ddp)] == [r["loss"] for r in full_records]
