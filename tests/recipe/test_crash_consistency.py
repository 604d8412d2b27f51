"""Crash-consistent files: a torn metrics line, a full disk during a checkpoint or a metrics append, a damaged
latest checkpoint and leftover temp folders each give one clear line, lose nothing earlier and never block a resume."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from _helpers.recipe_assets import base_config
from safetensors.torch import load_file

from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.recipe import checkpoint as ckpt
from nemo_automodel_dspark.recipe import metrics as metrics_module
from nemo_automodel_dspark.recipe.guards import RunStopped, is_disk_full
from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe

DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


def train(cfg: dict) -> TrainDSparkRecipe:
    recipe = TrainDSparkRecipe(cfg)
    recipe.setup()
    recipe.run_train_validation_loop()
    return recipe


def resume(cfg: dict, **args) -> dict:
    return {
        **cfg,
        "recipe_args": {**cfg["recipe_args"], **args},
        "checkpoint": {**cfg["checkpoint"], "restore_from": "LATEST"},
    }


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "dspark_train_metrics.jsonl").read_text().splitlines()]


def weights(out: Path, step: int) -> dict:
    return load_file(str(out / "ckpt" / f"epoch_0_step_{step}" / "model.safetensors"))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, tiny_assets):
    """A finished 2-step run with a checkpoint after each step, and an uninterrupted 3-step run to compare with."""
    root = tmp_path_factory.mktemp("crash")
    cfg = base_config(tiny_assets, root / "run", max_steps=3, ckpt_every_steps=1)
    recipe = TrainDSparkRecipe(cfg)
    recipe.setup()
    recipe.total_steps = 2  # stop after step 2 of a 3-step schedule: the prefix of the reference run
    recipe.run_train_validation_loop()
    train(base_config(tiny_assets, root / "ref", max_steps=3, ckpt_every_steps=1))
    return cfg, root / "ref"


@pytest.fixture
def copy(two_steps, tmp_path):
    """A private copy of the 2-step run (config pointing at it) for a test to damage."""
    cfg, _ = two_steps
    out = tmp_path / "run"
    shutil.copytree(cfg["recipe_args"]["output_dir"], out)
    return {
        **cfg,
        "recipe_args": {**cfg["recipe_args"], "output_dir": str(out)},
        "checkpoint": {**cfg["checkpoint"], "checkpoint_dir": str(out / "ckpt")},
    }


def test_torn_metrics_line_is_cut_off_on_resume_with_one_warning(copy, two_steps, capsys):
    out = Path(copy["recipe_args"]["output_dir"])
    metrics = out / "dspark_train_metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"timestamp": 1.0, "step": 3, "loss": 1.2')  # the half line a full disk leaves
    train(resume(copy, max_steps=3))
    log = capsys.readouterr().out
    assert f"warning: {metrics}: cut off the incomplete record at line 3" in log
    assert logged_steps(out) == [1, 2, 3]
    ref = weights(two_steps[1], 3)
    assert all(torch.equal(ref[k], v) for k, v in weights(out, 3).items())


def test_full_disk_during_a_checkpoint_is_one_line_and_the_run_resumes(copy, two_steps, monkeypatch):
    out = Path(copy["recipe_args"]["output_dir"])
    shutil.rmtree(out / "ckpt" / "epoch_0_step_2")
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        f.write(b"partial optimizer bytes")
        raise DISK_FULL

    monkeypatch.setattr(torch, "save", full_disk_save)
    recipe = TrainDSparkRecipe(resume(copy, max_steps=3))
    recipe.setup()
    with pytest.raises(RunStopped) as info:
        recipe.run_train_validation_loop()
    monkeypatch.setattr(torch, "save", real_save)
    assert str(info.value).startswith(
        f"no space left on device writing {out / 'ckpt' / 'epoch_0_step_2'}; "
        f"the last complete checkpoint is {out / 'ckpt' / 'epoch_0_step_1'}"
    )
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["epoch_0_step_1"]  # no temp folder left behind
    assert ckpt.verify(out / "ckpt" / "epoch_0_step_1") is None
    train(resume(copy, max_steps=3))  # space is back: the run resumes from step 1 and finishes as if never stopped
    ref = weights(two_steps[1], 3)
    assert all(torch.equal(ref[k], v) for k, v in weights(out, 3).items())
    assert logged_steps(out) == [1, 2, 3]
    # the divergence guard's reference (recent losses) is restored exactly: resumed == uninterrupted, bit for bit
    states = [ckpt.load_trainer_state(run / "ckpt" / "epoch_0_step_3") for run in (out, two_steps[1])]
    assert states[0]["divergence"] == states[1]["divergence"] and len(states[0]["divergence"]["recent"]) == 3


class FillingFile:
    """A file whose disk fills after `room` bytes: the write that crosses it raises ENOSPC, as on a real full disk."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_torch_save_into_a_full_disk_is_recognised_through_its_runtime_error(tmp_path):
    with open(tmp_path / "optimizer.pt", "wb") as f, pytest.raises(RuntimeError) as info:
        torch.save({"exp_avg": torch.zeros(10_000)}, FillingFile(f, room=100))
    assert "No space left" not in str(info.value)  # torch's own message names no cause
    assert is_disk_full(info.value) and not is_disk_full(RuntimeError("unexpected pos 15168 vs 15120"))


def test_real_torch_save_failing_on_a_full_disk_is_one_line(copy, monkeypatch):
    out = Path(copy["recipe_args"]["output_dir"])
    shutil.rmtree(out / "ckpt" / "epoch_0_step_2")
    write_synced = ckpt._write_synced
    monkeypatch.setattr(
        ckpt, "_write_synced", lambda path, write: write_synced(path, lambda f: write(FillingFile(f, 64)))
    )
    recipe = TrainDSparkRecipe(resume(copy, max_steps=3))
    recipe.setup()
    with pytest.raises(
        RunStopped, match=r"^no space left on device writing .*epoch_0_step_2; the last complete checkpoint"
    ):
        recipe.run_train_validation_loop()
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["epoch_0_step_1"]  # no temp folder left behind


def test_full_disk_during_a_metrics_append_rolls_the_line_back(copy, monkeypatch):
    out = Path(copy["recipe_args"]["output_dir"])
    before = (out / "dspark_train_metrics.jsonl").read_text()

    def full_disk_append(path, text):
        with open(path, "a") as f:
            f.write(text[: len(text) // 2])
        raise DISK_FULL

    monkeypatch.setattr(metrics_module, "_append", full_disk_append)
    recipe = TrainDSparkRecipe(resume(copy, max_steps=3))
    recipe.setup()
    with pytest.raises(RunStopped) as info:
        recipe.run_train_validation_loop()
    assert str(info.value).startswith(
        f"no space left on device writing {out / 'dspark_train_metrics.jsonl'}; "
        f"the last complete checkpoint is {out / 'ckpt' / 'epoch_0_step_2'}"
    )
    assert (out / "dspark_train_metrics.jsonl").read_text() == before  # the torn half line was rolled back


def test_damaged_latest_checkpoint_falls_back_with_a_warning(copy, capsys):
    out = Path(copy["recipe_args"]["output_dir"])
    weights_file = out / "ckpt" / "epoch_0_step_2" / "model.safetensors"
    size = weights_file.stat().st_size
    with open(weights_file, "r+b") as f:
        f.truncate(size // 2)
    recipe = TrainDSparkRecipe(resume(copy, max_steps=3))
    recipe.setup()
    log = capsys.readouterr().out
    assert (
        f"checkpoint {out / 'ckpt' / 'epoch_0_step_2'} is damaged ({weights_file} has {size // 2} bytes, the "
        f"manifest says {size}); falling back to the previous complete checkpoint" in log
    )
    assert recipe.step == 1 and logged_steps(out) == [1]
    # the damaged checkpoint moved aside (kept, so LATEST never goes back to it); pointed at, it is named as damaged
    (aside,) = out.glob("ckpt.after-step-1-*")
    moved = aside / "epoch_0_step_2" / "model.safetensors"
    assert moved.stat().st_size == size // 2 and not weights_file.parent.exists()
    explicit = {**copy, "checkpoint": {**copy["checkpoint"], "restore_from": str(moved.parent)}}
    with pytest.raises(ToolError, match=rf"restore_from: .*epoch_0_step_2 is damaged \({moved} has"):
        TrainDSparkRecipe(explicit).setup()


def test_resuming_from_an_older_checkpoint_moves_the_later_ones_aside(copy, two_steps, capsys):
    """What the divergence message asks for: resume from the checkpoint before the diverging weights."""
    out = Path(copy["recipe_args"]["output_dir"])
    later = (out / "ckpt" / "epoch_0_step_2" / "model.safetensors").read_bytes()
    older = {**copy, "checkpoint": {**copy["checkpoint"], "restore_from": str(out / "ckpt" / "epoch_0_step_1")}}
    older["recipe_args"] = {**copy["recipe_args"], "max_steps": 3}
    recipe = TrainDSparkRecipe(older)
    recipe.setup()
    (aside,) = out.glob("ckpt.after-step-1-*")
    assert f"resumed from step 1: moved the 1 later checkpoint(s) aside to {aside}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["epoch_0_step_1"]
    assert (aside / "epoch_0_step_2" / "model.safetensors").read_bytes() == later  # nothing was deleted
    recipe.run_train_validation_loop()
    ref = weights(two_steps[1], 3)
    assert all(torch.equal(ref[k], v) for k, v in weights(out, 3).items()) and logged_steps(out) == [1, 2, 3]


def test_restore_from_a_folder_that_is_no_checkpoint_is_one_line(copy, tmp_path):
    missing = {**copy, "checkpoint": {**copy["checkpoint"], "restore_from": str(tmp_path / "nope")}}
    with pytest.raises(ToolError, match=rf"^checkpoint.restore_from: {tmp_path / 'nope'} is not a complete checkpoint"):
        TrainDSparkRecipe(missing).setup()


def test_leftover_temps_are_removed_at_start(copy, capsys):
    """What a kill leaves in each writer: a checkpoint temp folder (killed inside `save_draft`, so with its own
    weights temp inside), a metrics rewrite's temp in output_dir, a draft save's temp in checkpoint_dir."""
    out = Path(copy["recipe_args"]["output_dir"])
    folder = out / "ckpt" / ".epoch_0_step_3.tmp"
    folder.mkdir()
    (folder / ".model.safetensors.0123456789ab").write_bytes(b"half")
    leftovers = [folder, out / ".dspark_train_metrics.jsonl.a1b2c3d4e5f6", out / "ckpt" / ".config.json.00aa11bb22cc"]
    for path in leftovers[1:]:
        path.write_bytes(b"half")
    metrics_before = (out / "dspark_train_metrics.jsonl").read_bytes()
    TrainDSparkRecipe(resume(copy, max_steps=3)).setup()
    log = capsys.readouterr().out
    for path in leftovers:
        assert not path.exists() and f"removed {path}, left by a write that never finished" in log
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["epoch_0_step_1", "epoch_0_step_2"]
    assert (out / "dspark_train_metrics.jsonl").read_bytes() == metrics_before  # nothing earlier was lost
