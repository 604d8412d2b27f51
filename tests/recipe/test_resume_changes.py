"""A resume that changes things: a model-shape field is one line naming it; a changed optimizer option takes effect
from the resumed step and the run says so; a different optimizer class is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _helpers.recipe_assets import base_config

from nemo_automodel_dspark.recipe.optim import lr_factor
from nemo_automodel_dspark.recipe.resume import IncompatibleCheckpoint
from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_assets):
    out = tmp_path_factory.mktemp("resume") / "run"
    cfg = base_config(tiny_assets, out, max_steps=2)
    recipe = TrainDSparkRecipe(cfg)
    recipe.setup()
    recipe.run_train_validation_loop()
    return cfg, recipe.optimizer.param_groups[0]["lr"]


def resumed(cfg: dict, optimizer: dict | None = None, **args) -> dict:
    return {
        **cfg,
        "recipe_args": {**cfg["recipe_args"], **args},
        "optimizer": {**cfg["optimizer"], **(optimizer or {})},
        "checkpoint": {**cfg["checkpoint"], "restore_from": "LATEST"},
    }


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("draft_num_hidden_layers", 3, "draft_num_hidden_layers=2"),
        ("markov_rank", 4, "markov_rank=8"),
        ("markov_head_type", "gated", "markov_head_type='vanilla'"),
        ("confidence_head_alpha", 0.0, "enable_confidence_head=True"),
        ("freeze_embeddings", False, "freeze_embeddings=True"),
    ],
)
def test_changed_model_shape_is_one_line_naming_the_field(trained, key, value, field):
    cfg, _ = trained
    with pytest.raises(IncompatibleCheckpoint) as info:
        TrainDSparkRecipe(resumed(cfg, **{key: value})).setup()
    message = str(info.value)
    assert f"was trained with {field} but the config has" in message and f"recipe_args.{key}" in message
    assert "\n" not in message


def test_other_changed_options_take_effect_and_are_announced(trained, capsys):
    cfg, _ = trained
    recipe = TrainDSparkRecipe(resumed(cfg, num_anchors=3, max_steps=4, ce_loss_alpha=0.5))
    recipe.setup()
    log = capsys.readouterr().out
    for key, old, new in (("num_anchors", 6, 3), ("max_steps", 2, 4), ("ce_loss_alpha", 0.1, 0.5)):
        assert f"resume: recipe_args.{key} changed from {old!r} to {new!r}, in effect from step 3" in log
    assert recipe.draft.dspark.num_anchors == 3 and log.count("resume: recipe_args.") == 3


def test_unchanged_options_resume_the_schedule_exactly(trained, capsys):
    cfg, saved_lr = trained
    recipe = TrainDSparkRecipe(resumed(cfg))
    recipe.setup()
    assert recipe.optimizer.param_groups[0]["lr"] == saved_lr and "resume: optimizer" not in capsys.readouterr().out


def test_changed_lr_and_weight_decay_take_effect_and_are_announced(trained, capsys):
    cfg, _ = trained
    recipe = TrainDSparkRecipe(resumed(cfg, optimizer={"lr": 1e-3, "weight_decay": 0.1}))
    recipe.setup()
    log = capsys.readouterr().out
    assert "resume: optimizer.lr changed from 0.003 to 0.001, in effect from step 3" in log
    assert "resume: optimizer.weight_decay changed from 0.0 to 0.1, in effect from step 3" in log
    group = recipe.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-3 * lr_factor(2, recipe.total_steps, 0.2, 0.1))
    assert group["weight_decay"] == 0.1 and recipe.lr_scheduler.base_lrs == [1e-3]
    recipe.run_train_validation_loop()  # the next scheduler steps follow the new base lr
    assert group["lr"] == pytest.approx(1e-3 * lr_factor(recipe.step, recipe.total_steps, 0.2, 0.1))


def test_another_optimizer_class_is_refused(trained):
    cfg, _ = trained
    sgd = {**cfg, "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.01}}
    with pytest.raises(IncompatibleCheckpoint, match=r"optimizer is AdamW but the config asks for .*SGD"):
        TrainDSparkRecipe(resumed(sgd)).setup()


def test_old_checkpoint_without_shape_fields_still_fails_as_one_line(trained, tmp_path):
    cfg, _ = trained
    out = tmp_path / "old"
    shutil.copytree(cfg["recipe_args"]["output_dir"], out)
    ckpt = out / "ckpt" / "epoch_0_step_2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["compat"] = {k: state["compat"][k] for k in ("block_size", "mask_token_id", "target_layer_ids")}
    state["compat"]["target_model_name_or_path"] = cfg["recipe_args"]["target_model_name_or_path"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    (ckpt / "manifest.json").unlink()  # as written before manifests existed
    moved = {
        **cfg,
        "recipe_args": {**cfg["recipe_args"], "output_dir": str(out), "draft_num_hidden_layers": 3},
        "checkpoint": {**cfg["checkpoint"], "checkpoint_dir": str(out / "ckpt"), "restore_from": "LATEST"},
    }
    with pytest.raises(IncompatibleCheckpoint, match=rf"checkpoint {ckpt} does not fit the configured draft \("):
        TrainDSparkRecipe(moved).setup()
    assert Path(ckpt / "model.safetensors").exists()
