from pathlib import Path

import pytest
import yaml

from nemo_automodel_dspark.recipe.config import ConfigError, parse_config

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").rglob("*.yaml"))


def _minimal(**recipe_args):
    args = dict(
        target_model_name_or_path="t", train_data_path="d.jsonl", output_dir="o", seq_length=64, mask_token_id=3
    )
    args.update(recipe_args)
    return {"recipe_args": args, "optimizer": {"lr": 1e-3}}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_yaml_validates(path):
    raw = yaml.safe_load(path.read_text())
    cfg = parse_config(raw)
    assert raw["recipe"] == "nemo_automodel_dspark.train_dspark.TrainDSparkRecipe"
    assert cfg.recipe_args.block_size == raw["recipe_args"]["block_size"]


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"qwen3_0.6b_dspark.yaml", "gemma4_12b_dspark.yaml"} <= names


def test_upstream_values_and_defaults():
    cfg = parse_config(
        yaml.safe_load((Path(__file__).parents[2] / "examples/dspark/qwen3_0.6b_dspark.yaml").read_text())
    )
    assert cfg.checkpoint.save_consolidated == "every"  # upstream `true` means every
    assert cfg.recipe_args.target_layer_ids == [1, 7, 14, 20, 26] and cfg.optimizer.betas == [0.9, 0.95]
    defaults = parse_config(_minimal())
    assert defaults.recipe_args.loss_decay_gamma == 4.0 and defaults.recipe_args.markov_rank == 256
    assert defaults.dist.strategy == "fsdp2" and defaults.optimizer.warmup_ratio == 0.04
    assert defaults.optimizer.min_lr_ratio == 0.1 and defaults.checkpoint.save_consolidated == "final"


def test_unknown_key_suggests_nearest():
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'recipe_args.blok_size'; did you mean "
        r"'recipe_args.block_size'",
    ):
        parse_config(_minimal(blok_size=7))
    raw = _minimal()
    raw["optimiser"] = {}
    with pytest.raises(ConfigError, match="did you mean '<top level>.optimizer'"):
        parse_config(raw)


def test_unimplemented_upstream_key_is_refused_unless_noop():
    with pytest.raises(ConfigError, match="'recipe_args.multimodal' is an upstream .* does not implement"):
        parse_config(_minimal(multimodal=True))
    parse_config(_minimal(cached_target_path=None, multimodal=False))  # no-op values load
    raw = _minimal()
    raw["wandb"] = {"project": "x"}
    with pytest.raises(ConfigError, match="'wandb' is an upstream"):
        parse_config(raw)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("seq_length", 0, "recipe_args.seq_length"),
        ("max_steps", 0, "recipe_args.max_steps"),
        ("micro_batch_size", "two", "recipe_args.micro_batch_size"),
    ],
)
def test_bad_values_name_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(_minimal(**{key: value}))


def test_required_keys_are_named():
    raw = _minimal()
    del raw["recipe_args"]["mask_token_id"]
    with pytest.raises(ConfigError, match="'recipe_args.mask_token_id' is required"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="'optimizer.lr' is required"):
        parse_config({"recipe_args": _minimal()["recipe_args"], "optimizer": {}})


def test_bad_strategy_and_consolidation():
    raw = _minimal()
    raw["distributed"] = {"strategy": "zero3"}
    with pytest.raises(ConfigError, match="distributed.strategy"):
        parse_config(raw)
    raw = _minimal()
    raw["checkpoint"] = {"save_consolidated": "sometimes"}
    with pytest.raises(ConfigError, match="checkpoint.save_consolidated"):
        parse_config(raw)


def test_automodel_confignode_is_accepted(tmp_path):
    from nemo_automodel.components.config._arg_parser import parse_args_and_load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    node = parse_args_and_load_config(argv=["-c", str(path), "--recipe_args.max_steps=5"])
    cfg = parse_config(node)
    assert cfg.recipe_args.max_steps == 5 and cfg.recipe_args.seq_length == 64


def test_batching_keys_default_off_and_are_checked():
    args = parse_config(_minimal()).recipe_args
    assert args.packed_sequence_size == 0 and args.max_tokens_per_batch == 0
    assert parse_config(_minimal(packed_sequence_size=4096)).recipe_args.packed_sequence_size == 4096
    with pytest.raises(ConfigError, match=r"'recipe_args.packed_sequence_size' must be 0 \(off\) or >= seq_length=64"):
        parse_config(_minimal(packed_sequence_size=32))
    with pytest.raises(ConfigError, match=r"'recipe_args.max_tokens_per_batch' must be 0 \(off\) or >= seq_length"):
        parse_config(_minimal(max_tokens_per_batch=-1))
    with pytest.raises(ConfigError, match="'recipe_args.packed_sequence_size' and 'recipe_args.max_tokens_per_batch'"):
        parse_config(_minimal(packed_sequence_size=128, max_tokens_per_batch=128))
