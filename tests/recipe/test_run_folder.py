"""One run per folder: a second run into a folder holding a run is refused (or moves the old run aside when asked),
shipped YAMLs keep checkpoints under output_dir, and keep_last_n prunes only after a newer checkpoint is complete."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import yaml
from _helpers.recipe_assets import base_config

from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.recipe.config import ConfigError, parse_config
from nemo_automodel_dspark.recipe.guards import RunStopped
from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dspark"


def train(cfg: dict) -> TrainDSparkRecipe:
    recipe = TrainDSparkRecipe(cfg)
    recipe.setup()
    recipe.run_train_validation_loop()
    return recipe


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path / "run", max_steps=1)
    train(cfg)
    return cfg, tmp_path / "run"


def test_second_run_into_the_same_folder_is_refused_and_loses_nothing(finished):
    cfg, out = finished
    before = snapshot(out)
    with pytest.raises(ToolError) as info:
        TrainDSparkRecipe(cfg).setup()
    message = str(info.value)
    assert message.startswith(f"{out} holds the metrics of a run (dspark_train_metrics.jsonl); resume it with ")
    assert "checkpoint.restore_from: LATEST" in message and "recipe_args.overwrite_output_dir: true" in message
    assert snapshot(out) == before


def test_checkpoint_dir_holding_a_run_is_refused(finished, tiny_assets, tmp_path):
    cfg, out = finished
    other = base_config(tiny_assets, tmp_path / "fresh", max_steps=1)
    other["checkpoint"]["checkpoint_dir"] = str(out / "ckpt")
    with pytest.raises(ToolError, match=rf"^{out / 'ckpt'} holds 1 checkpoint\(s\) of a run \(latest epoch_0_step_1\)"):
        TrainDSparkRecipe(other).setup()


def test_a_run_without_checkpoints_neither_claims_nor_moves_a_checkpoint_dir(finished, tiny_assets, tmp_path):
    cfg, out = finished
    before = snapshot(out / "ckpt")
    other = base_config(tiny_assets, tmp_path / "fresh", max_steps=1, overwrite_output_dir=True)
    other["checkpoint"] = {**cfg["checkpoint"], "enabled": False}  # still naming the finished run's checkpoint_dir
    train(other)
    assert snapshot(out / "ckpt") == before and not list(tmp_path.glob("run/ckpt.previous-*"))
    assert (tmp_path / "fresh" / "dspark_train_metrics.jsonl").exists()


def test_overwrite_moves_the_old_run_aside(finished):
    cfg, out = finished
    before = snapshot(out)
    cfg = {**cfg, "recipe_args": {**cfg["recipe_args"], "overwrite_output_dir": True, "max_steps": 2}}
    train(cfg)
    aside = [p for p in out.parent.iterdir() if p.name.startswith("run.previous-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # the old run, whole
    steps = [json.loads(line)["step"] for line in (out / "dspark_train_metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and sorted(p.name for p in (out / "ckpt").iterdir()) == ["epoch_0_step_2"]


def test_keep_last_n_prunes_only_after_a_newer_checkpoint_is_complete(tiny_assets, tmp_path, monkeypatch):
    out = tmp_path / "keep"
    cfg = base_config(tiny_assets, out, max_steps=4, ckpt_every_steps=1)
    cfg["checkpoint"]["keep_last_n"] = 2
    recipe = TrainDSparkRecipe(cfg)
    recipe.setup()
    real_save, calls = torch.save, []

    def full_disk_at_step_4(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_step_4)
    with pytest.raises(RunStopped, match="no space left on device"):
        recipe.run_train_validation_loop()
    # step 4 never completed, so the two newest complete checkpoints are still there
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["epoch_0_step_2", "epoch_0_step_3"]


def test_keep_last_n_must_be_positive():
    cfg = {"recipe_args": {}, "optimizer": {"lr": 1.0}, "checkpoint": {"keep_last_n": 0}}
    cfg["recipe_args"] = dict(target_model_name_or_path="t", train_data_path="d", output_dir="o", seq_length=8)
    cfg["recipe_args"]["mask_token_id"] = 3
    with pytest.raises(ConfigError, match=r"'checkpoint.keep_last_n' must be >= 1 or null, got 0"):
        parse_config(cfg)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yamls_keep_checkpoints_under_output_dir(path):
    assert parse_config(yaml.safe_load(path.read_text())).checkpoint.checkpoint_dir is None
