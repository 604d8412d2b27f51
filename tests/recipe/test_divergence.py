"""Divergence guard: a NaN injected into one step is never applied; the run stops naming the step and the last good
checkpoint, or skips and counts it when `recipe_args.max_skipped_steps` allows; non-finite weights are never saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers.recipe_assets import base_config, write_config
from safetensors.torch import load_file

from nemo_automodel_dspark.recipe.guards import RunStopped
from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe, main


def poison_step(recipe: TrainDSparkRecipe, bad_step: int) -> None:
    """Make every loss of optimizer step `bad_step` (1-based) NaN, as an absurd learning rate would."""
    forward = recipe.runner._forward_loss

    def patched(batch, anchors, keep):
        loss = forward(batch, anchors, keep)
        if recipe.step + 1 == bad_step:
            loss.numerator = loss.numerator * float("nan")
            loss.sums = {k: v * float("nan") for k, v in loss.sums.items()}
        return loss

    recipe.runner._forward_loss = patched


def ckpt_weights(out: Path, step: int) -> dict:
    return load_file(str(out / "ckpt" / f"epoch_0_step_{step}" / "model.safetensors"))


def steps_logged(out: Path) -> list[int]:
    lines = (out / "dspark_train_metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_nan_step_stops_the_run_naming_the_step_and_last_checkpoint(tiny_assets, tmp_path):
    out = tmp_path / "run"
    recipe = TrainDSparkRecipe(base_config(tiny_assets, out, max_steps=4, ckpt_every_steps=1))
    recipe.setup()
    poison_step(recipe, 3)
    with pytest.raises(RunStopped) as info:
        recipe.run_train_validation_loop()
    message = str(info.value)
    assert message.startswith("step 3: non-finite loss or gradient norm; the update was not applied")
    assert f"the last good checkpoint is {out / 'ckpt' / 'epoch_0_step_2'}" in message
    assert not (out / "ckpt" / "epoch_0_step_3").exists()
    # nothing earlier was lost, and the weights in memory are still those of step 2 (the NaN was never applied)
    assert steps_logged(out) == [1, 2]
    saved = ckpt_weights(out, 2)
    assert all(torch.equal(saved[k], v) for k, v in recipe.draft.state_dict().items() if k in saved)
    assert all(torch.isfinite(p).all() for p in recipe.draft.parameters())


def test_allowed_skips_leave_weights_and_optimizer_untouched_and_are_counted(tiny_assets, tmp_path):
    out = tmp_path / "skip"
    recipe = TrainDSparkRecipe(base_config(tiny_assets, out, max_steps=3, ckpt_every_steps=1, max_skipped_steps=1))
    recipe.setup()
    poison_step(recipe, 2)
    recipe.run_train_validation_loop()
    one, two = ckpt_weights(out, 1), ckpt_weights(out, 2)
    assert all(torch.equal(one[k], two[k]) for k in one)  # the skipped step changed nothing
    opt1 = torch.load(out / "ckpt" / "epoch_0_step_1" / "optimizer.pt", weights_only=True)
    opt2 = torch.load(out / "ckpt" / "epoch_0_step_2" / "optimizer.pt", weights_only=True)
    for key, state in opt1["state"].items():
        assert all(torch.equal(v, opt2["state"][key][k]) for k, v in state.items())
    records = [json.loads(line) for line in (out / "dspark_train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3]  # step 2's window held only the skipped step
    assert records[-1]["skipped_steps"] == 1 and all(r["loss"] == r["loss"] for r in records)
    state = json.loads((out / "ckpt" / "epoch_0_step_3" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1


def test_second_non_finite_step_beyond_the_allowance_stops(tiny_assets, tmp_path):
    out = tmp_path / "two"
    recipe = TrainDSparkRecipe(base_config(tiny_assets, out, max_steps=3, max_skipped_steps=1))
    recipe.setup()
    for p in recipe.draft.parameters():  # poisoned weights make every later step non-finite
        if p.requires_grad:
            p.data.fill_(float("nan"))
            break
    with pytest.raises(RunStopped, match=r"step 2: .*\(2 non-finite steps, recipe_args.max_skipped_steps=1\); no "):
        recipe.run_train_validation_loop()


def test_a_checkpoint_with_non_finite_weights_is_never_written(tiny_assets, tmp_path):
    out = tmp_path / "save"
    recipe = TrainDSparkRecipe(base_config(tiny_assets, out, max_steps=1))
    recipe.setup()
    name, param = next((n, p) for n, p in recipe.draft.named_parameters() if p.requires_grad)
    param.data[0] = float("inf")
    recipe.step = 1
    with pytest.raises(RunStopped, match=rf"step 1: the draft has non-finite weights \({name}\); no checkpoint"):
        recipe._save(0)
    assert not (out / "ckpt").exists() or not any((out / "ckpt").iterdir())


def test_main_prints_one_line_and_exits_non_zero(tiny_assets, tmp_path, capsys):
    cfg = base_config(tiny_assets, tmp_path / "lr", max_steps=2)
    cfg["optimizer"]["lr"] = 1e30  # an absurd learning rate: the loss is non-finite from step 2
    path = write_config(cfg, tmp_path / "lr.yaml")
    with pytest.raises(SystemExit) as info:
        main(["-c", str(path)])
    assert info.value.code == 2  # every one-line stop exits like a refused option
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dspark train: error: step ") and "Traceback" not in "\n".join(err)
