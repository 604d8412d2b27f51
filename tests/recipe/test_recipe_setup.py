"""In-process recipe checks (single process, no torchrun): resume refusals, optimizer, schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _helpers.recipe_assets import base_config

from nemo_automodel_dspark.recipe.config import ConfigError
from nemo_automodel_dspark.recipe.optim import lr_factor
from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe


def train(cfg: dict) -> TrainDSparkRecipe:
    recipe = TrainDSparkRecipe(cfg)
    recipe.setup()
    recipe.run_train_validation_loop()
    return recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_assets):
    out = tmp_path_factory.mktemp("inproc") / "run"
    cfg = base_config(tiny_assets, out, max_steps=2)
    train(cfg)
    return cfg


@pytest.mark.parametrize("field, value", [("block_size", 5), ("mask_token_id", 0), ("target_layer_ids", [1, 2])])
def test_resume_refuses_a_different_field(trained, field, value):
    cfg = {
        **trained,
        "recipe_args": {**trained["recipe_args"], field: value},
        "checkpoint": {**trained["checkpoint"], "restore_from": "LATEST"},
    }
    with pytest.raises(ValueError, match=f"trained with {field}="):
        TrainDSparkRecipe(cfg).setup()


def test_resume_at_the_end_continues_to_a_longer_run(trained):
    cfg = {
        **trained,
        "recipe_args": {**trained["recipe_args"], "max_steps": 3},
        "checkpoint": {**trained["checkpoint"], "restore_from": "LATEST"},
    }
    recipe = TrainDSparkRecipe(cfg)
    recipe.setup()
    assert recipe.step == 2 and recipe.sampler.consumed == 4
    recipe.run_train_validation_loop()
    assert recipe.step == 3


def test_explicit_optimizer_target_is_honoured(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path / "sgd", max_steps=1)
    cfg["optimizer"] = {"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.5}
    recipe = TrainDSparkRecipe(cfg)
    recipe.setup()
    assert isinstance(recipe.optimizer, torch.optim.SGD) and recipe.optimizer.defaults["momentum"] == 0.5
    trainable = {id(p) for p in recipe.draft.parameters() if p.requires_grad}
    optimised = {id(p) for g in recipe.optimizer.param_groups for p in g["params"]}
    assert optimised == trainable and id(recipe.draft.lm_head.weight) not in optimised


def test_too_little_data_for_one_step_names_the_file(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path / "big", micro_batch_size=16, grad_accumulation_steps=2)
    with pytest.raises(ConfigError, match=r"train\.jsonl: 24 usable rows cannot fill one optimizer step"):
        TrainDSparkRecipe(cfg).setup()


@pytest.mark.parametrize(
    "recipe_args, match",
    [
        (dict(target_layer_ids=[0, 7]), r"'recipe_args.target_layer_ids': id 7 is out of range .* valid ids are -1..2"),
        (dict(mask_token_id=64), r"'recipe_args.mask_token_id' must be in \[0, 64\) for this target, got 64"),
    ],
)
def test_target_dependent_options_fail_before_data_or_weights(tiny_assets, tmp_path, recipe_args, match):
    """Checked right after reading the target's config.json: no data, tokenizer or weights are loaded."""
    cfg = base_config(tiny_assets, tmp_path / "bad")
    cfg["recipe_args"].update(recipe_args)
    recipe = TrainDSparkRecipe(cfg)
    with pytest.raises(ConfigError, match=match):
        recipe.setup()
    assert not any(hasattr(recipe, name) for name in ("info", "tokenizer", "train_set", "frozen"))


def test_target_layer_ids_resolved_once_without_mutating_the_parsed_config(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path / "spread", max_steps=1, target_layer_ids=None, draft_num_hidden_layers=2)
    recipe = TrainDSparkRecipe(cfg)
    recipe.setup()
    assert recipe.config.draft.target_layer_ids is None  # the parsed config is untouched
    assert recipe.draft_config.target_layer_ids == [1]  # the servable default for the 3-layer tiny target
    assert recipe.draft.dspark is recipe.draft_config  # the drafter holds the resolved copy itself


def test_warmup_then_cosine_to_min_lr():
    total, ratio, floor = 100, 0.04, 0.1
    assert lr_factor(0, total, ratio, floor) == pytest.approx(1 / 4)
    assert lr_factor(3, total, ratio, floor) == pytest.approx(1.0)
    mid = 4 + (total - 4) // 2
    assert lr_factor(mid, total, ratio, floor) == pytest.approx(
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.5))
    )
    assert lr_factor(total, total, ratio, floor) == pytest.approx(floor)
    assert lr_factor(0, 10, 0.0, floor) == pytest.approx(1.0)  # at least one warm-up step


def test_eval_decode_logs_real_tau_without_changing_training(trained, tiny_assets, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "decode"
    cfg = base_config(tiny_assets, out, max_steps=2)
    cfg["recipe_args"]["eval_decode"] = {
        "every_steps": 1,
        "data_path": str(tiny_assets["val"]),
        "num_prompts": 2,
        "max_new_tokens": 6,
        "temperature": 0.0,
    }
    train(cfg)
    records = [json.loads(line) for line in (out / "dspark_train_metrics.jsonl").read_text().splitlines()]
    decode = [r for r in records if "decode/tau" in r]
    assert [r["step"] for r in decode] == [1, 2] and all(1.0 <= r["decode/tau"] <= 5.0 for r in decode)
    ref_dir = Path(trained["checkpoint"]["checkpoint_dir"]) / "epoch_0_step_2"
    ref = load_file(str(ref_dir / "model.safetensors"))
    got = load_file(str(out / "ckpt" / "epoch_0_step_2" / "model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
