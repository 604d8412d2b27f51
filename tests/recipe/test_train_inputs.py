"""Training checks its inputs before it starts: each mistake is one line naming the key, and nothing is written."""

from __future__ import annotations

import json

import pytest
from _helpers.recipe_assets import base_config

from nemo_automodel_dspark.data.dataset import DSparkChatDataset
from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.target.loading import load_tokenizer
from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe


def refused(cfg: dict) -> str:
    with pytest.raises(ToolError) as info:
        TrainDSparkRecipe(cfg).setup()
    return str(info.value)


def test_a_missing_local_target_is_one_line_before_anything_is_written(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path / "run", target_model_name_or_path="./dspark_demo/no_target")
    assert refused(cfg) == "recipe_args.target_model_name_or_path ./dspark_demo/no_target: no such folder"
    assert not (tmp_path / "run").exists()


def test_a_model_folder_given_as_data_is_one_line(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path / "run", train_data_path=str(tiny_assets["target"]))
    assert refused(cfg).startswith(
        f"recipe_args.train_data_path {tiny_assets['target']}: a model folder (config.json and weights), not data"
    )


def test_a_bad_eval_decode_path_fails_before_training(tiny_assets, tmp_path):
    cfg = base_config(tiny_assets, tmp_path / "run", max_steps=1)
    cfg["recipe_args"]["eval_decode"] = {"every_steps": 1, "data_path": str(tmp_path / "nope.jsonl")}
    assert refused(cfg) == f"recipe_args.eval_decode.data_path {tmp_path / 'nope.jsonl'}: no such file"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2, 3]\n")
    cfg["recipe_args"]["eval_decode"]["data_path"] = str(bad)
    assert refused(cfg) == f"recipe_args.eval_decode.data_path: {bad}:1: row is not a JSON object"
    assert not (tmp_path / "run" / "dspark_train_metrics.jsonl").exists()


def test_nearly_all_empty_answers_is_a_warning_with_the_count(tiny_assets, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": ""}]}] * 19
    rows.append({"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2 w3"}]})
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_tokenizer(str(tiny_assets["target"]))
    report = DSparkChatDataset(str(path), tokenizer, 48).report()
    assert "warning: 19 of 20 answers are empty" in report
    assert "warning" not in DSparkChatDataset(str(tiny_assets["train"]), tokenizer, 48).report()


def test_output_and_checkpoint_folders_that_cannot_be_written_are_one_line(tiny_assets, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = base_config(tiny_assets, blocker / "run")
    assert (
        refused(cfg)
        == f"recipe_args.output_dir {blocker / 'run'}: cannot write there ({blocker} is not a writable folder)"
    )
    cfg = base_config(tiny_assets, tmp_path / "run")
    cfg["checkpoint"]["checkpoint_dir"] = str(blocker / "ckpt")
    assert refused(cfg).startswith(f"checkpoint.checkpoint_dir {blocker / 'ckpt'}: cannot write there")
    cfg["checkpoint"]["enabled"] = False  # a run without checkpoints never writes there
    TrainDSparkRecipe({**cfg, "recipe_args": {**cfg["recipe_args"], "max_steps": 1}}).setup()
