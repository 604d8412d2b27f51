"""Every option is checked when the YAML is parsed (types, ranges, allowed values, cross-field rules), with one
line naming the key; YAML files and command-line overrides are read with the same strict rules."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from nemo_automodel_dspark.loss.config import LossConfig
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.recipe.config import _SECTIONS, ConfigError, load_config, parse_config

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))
TINY = ROOT / "examples/dspark/tiny_cpu_dspark.yaml"


def _minimal(**recipe_args):
    args = dict(
        target_model_name_or_path="t", train_data_path="d.jsonl", output_dir="o", seq_length=64, mask_token_id=3
    )
    args.update(recipe_args)
    return {"recipe_args": args, "optimizer": {"lr": 1e-3}}


def _with(section: str, key: str, value) -> dict:
    raw = _minimal()
    raw.setdefault(section, {})[key] = value
    return raw


def _parsed_value(cfg, section: str, key: str):
    """The value `section.key` ended up with, whichever typed object owns it."""
    owners = {"recipe_args": (cfg.recipe_args, cfg.draft, cfg.loss)}.get(section, (getattr(cfg, section),))
    for owner in owners:
        if key in {f.name for f in dataclasses.fields(owner)}:
            value = getattr(owner, key)
            return list(value) if isinstance(value, tuple) else value
    raise AssertionError(f"{section}.{key} was accepted but landed in no typed object")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_yaml_validates(path):
    raw = yaml.safe_load(path.read_text())
    assert load_config(["-c", str(path)]) == raw  # the strict reader reads the shipped files as PyYAML does
    cfg = parse_config(raw)
    assert cfg.recipe == "nemo_automodel_dspark.train_dspark.TrainDSparkRecipe"
    upstream_only = {("checkpoint", "save_consolidated"), ("recipe_args", "num_workers")}
    for section in _SECTIONS:
        for key, value in (raw.get(section) or {}).items():
            if (section, key) not in upstream_only:
                assert _parsed_value(cfg, section, key) == value, f"{path.name}: {section}.{key}"


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"qwen3_0.6b_dspark.yaml", "gemma4_12b_dspark.yaml", "tiny_cpu_dspark.yaml"} <= names


def test_defaults_are_declared_once():
    cfg = parse_config(_minimal())
    assert cfg.loss == LossConfig() and cfg.loss.loss_decay_gamma == 4.0
    assert cfg.draft == DSparkConfig(mask_token_id=3) and cfg.draft.attention_backend == "flex_attention"
    assert cfg.draft.markov_rank == 256 and cfg.draft.target_layer_ids is None
    assert cfg.distributed.strategy == "fsdp2" and cfg.optimizer.warmup_ratio == 0.04
    assert cfg.optimizer.betas == (0.9, 0.95) and cfg.optimizer.min_lr_ratio == 0.1
    assert parse_config(_minimal(confidence_head_alpha=0)).draft.enable_confidence_head is False


def test_parsed_objects_are_frozen():
    cfg = parse_config(_minimal())
    for obj in (cfg, cfg.recipe_args, cfg.draft, cfg.loss, cfg.optimizer, cfg.checkpoint):
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.__setattr__("recipe" if obj is cfg else dataclasses.fields(obj)[0].name, None)


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


def test_unknown_key_suggests_nearest():
    did_you_mean = r"unknown config key 'recipe_args.blok_size'; did you mean 'recipe_args.block_size'"
    with pytest.raises(ConfigError, match=did_you_mean):
        parse_config(_minimal(blok_size=7))
    raw = _minimal()
    raw["optimiser"] = {}
    with pytest.raises(ConfigError, match="did you mean '<top level>.optimizer'"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="unknown config key 'recipe_args.eval_decode.every'"):
        parse_config(_minimal(eval_decode={"every": 5, "data_path": "p"}))


def test_unimplemented_upstream_key_is_refused_unless_noop():
    with pytest.raises(ConfigError, match="'recipe_args.multimodal' is an upstream .* does not implement"):
        parse_config(_minimal(multimodal=True))
    parse_config(_minimal(cached_target_path=None, multimodal=False, num_workers=4))  # no-op values load
    with pytest.raises(ConfigError, match="'checkpoint.save_consolidated' .* set it to True"):
        parse_config(_with("checkpoint", "save_consolidated", False))
    raw = _minimal()
    raw["wandb"] = {"project": "x"}
    with pytest.raises(ConfigError, match="'wandb' is an upstream"):
        parse_config(raw)


BAD = [
    # the four of issue 10
    ("recipe_args", "markov_head_type", "gatd", r"'recipe_args.markov_head_type' must be one of vanilla, gated, rnn"),
    ("recipe_args", "attention_backend", "xformers", r"'recipe_args.attention_backend' must be one of flex_attention"),
    ("recipe_args", "block_size", 0, r"'recipe_args.block_size' must be >= 1, got 0"),
    ("recipe_args", "loss_decay_gamma", "four", r"'recipe_args.loss_decay_gamma' must be a number or null, got 'four'"),
    # types
    ("recipe_args", "micro_batch_size", "two", r"'recipe_args.micro_batch_size' must be an integer"),
    ("recipe_args", "seq_length", 64.5, r"'recipe_args.seq_length' must be an integer"),
    ("recipe_args", "freeze_embeddings", "no", r"'recipe_args.freeze_embeddings' must be true or false, got 'no'"),
    ("recipe_args", "confidence_head_with_markov", 1, r"'recipe_args.confidence_head_with_markov' must be true or"),
    ("recipe_args", "target_layer_ids", 1, r"'recipe_args.target_layer_ids' must be a list of integers or null"),
    ("recipe_args", "target_layer_ids", [1, "x"], r"'recipe_args.target_layer_ids' must be a list of integers"),
    ("recipe_args", "ce_loss_alpha", "abc", r"'recipe_args.ce_loss_alpha' must be a number, got 'abc'"),
    ("recipe_args", "val_data_path", 3, r"'recipe_args.val_data_path' must be a string or null"),
    ("optimizer", "lr", "fast", r"'optimizer.lr' must be a number, got 'fast'"),
    ("optimizer", "betas", [0.9], r"'optimizer.betas' must be a list of 2 numbers"),
    ("checkpoint", "enabled", "yes", r"'checkpoint.enabled' must be true or false"),
    ("dist_env", "timeout_minutes", "30m", r"'dist_env.timeout_minutes' must be an integer"),
    # ranges
    ("recipe_args", "seq_length", 0, r"'recipe_args.seq_length' must be >= 1"),
    ("recipe_args", "max_steps", 0, r"'recipe_args.max_steps' must be >= 1"),
    ("recipe_args", "num_anchors", -2, r"'recipe_args.num_anchors' must be >= 1"),
    ("recipe_args", "markov_rank", -1, r"'recipe_args.markov_rank' must be >= 0"),
    ("recipe_args", "mask_token_id", -1, r"'recipe_args.mask_token_id' must be >= 0"),
    ("recipe_args", "target_layer_ids", [-2, 3], r"'recipe_args.target_layer_ids' must be >= -1"),
    ("recipe_args", "confidence_head_alpha", -0.5, r"'recipe_args.confidence_head_alpha' must be >= 0"),
    ("recipe_args", "max_grad_norm", 0.0, r"'recipe_args.max_grad_norm' must be > 0"),
    ("optimizer", "lr", 0, r"'optimizer.lr' must be > 0"),
    ("optimizer", "betas", [0.9, 1.5], r"'optimizer.betas' must be < 1"),
    ("optimizer", "warmup_ratio", 1.5, r"'optimizer.warmup_ratio' must be <= 1"),
    ("checkpoint", "ckpt_every_steps", 0, r"'checkpoint.ckpt_every_steps' must be >= 1"),
    # allowed values
    ("distributed", "strategy", "zero3", r"'distributed.strategy' must be one of fsdp2, ddp; got 'zero3'"),
    ("dist_env", "backend", "mpi", r"'dist_env.backend' must be one of nccl, gloo"),
    ("checkpoint", "model_save_format", "torch_save", r"'checkpoint.model_save_format' must be one of safetensors"),
]


@pytest.mark.parametrize("section, key, value, match", BAD, ids=lambda x: str(x)[:40])
def test_bad_values_name_the_key(section, key, value, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(_with(section, key, value))


def _yaml_keys() -> list[tuple[str, str, typing.Any]]:
    out = []
    for section, classes in _SECTIONS.items():
        for cls in classes:
            hints = typing.get_type_hints(cls)
            out += [(section, key, hints[key]) for key in cls.yaml_keys()]
    return out


@pytest.mark.parametrize("section, key, hint", _yaml_keys(), ids=lambda x: str(x)[:30])
def test_every_key_refuses_a_value_of_the_wrong_type(section, key, hint):
    """No key takes whatever it is given: a mapping is wrong for every scalar or list option."""
    wrong = {"not": "this"} if "Config" not in str(hint) else "a string"
    with pytest.raises(ConfigError, match=f"'{section}.{key}"):
        parse_config(_with(section, key, wrong))


@pytest.mark.parametrize(
    "recipe_args, match",
    [
        (dict(val_every_steps=5), r"'recipe_args.val_every_steps' needs 'recipe_args.val_data_path'"),
        (dict(ce_loss_alpha=0, l1_loss_alpha=0), r"'recipe_args.ce_loss_alpha' and 'recipe_args.l1_loss_alpha'"),
        (dict(markov_rank=0), r"'recipe_args.confidence_head_with_markov': true needs the Markov embedding"),
        (dict(target_layer_ids=[3, 1]), r"'recipe_args.target_layer_ids' must be strictly increasing"),
        (dict(target_layer_ids=[]), r"'recipe_args.target_layer_ids' must not be empty"),
        (dict(eval_decode={"every_steps": 0, "data_path": "p"}), r"'recipe_args.eval_decode.every_steps' must be >= 1"),
        (dict(eval_decode={"data_path": "p"}), r"'recipe_args.eval_decode.every_steps' is required"),
    ],
)
def test_cross_field_rules(recipe_args, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(_minimal(**recipe_args))


def test_cross_field_rules_accept_the_consistent_forms():
    parse_config(_minimal(markov_rank=0, confidence_head_with_markov=False))
    parse_config(_minimal(markov_rank=0, confidence_head_alpha=0))
    parse_config(_minimal(val_every_steps=5, val_data_path="v.jsonl"))
    cfg = parse_config(_minimal(eval_decode={"every_steps": 5, "data_path": "p"}))
    assert cfg.recipe_args.eval_decode is not None and cfg.recipe_args.eval_decode.num_prompts == 8


def test_ckpt_every_steps_has_one_value():
    raw = _minimal(ckpt_every_steps=4)
    assert parse_config(raw).checkpoint.ckpt_every_steps == 4
    raw["checkpoint"] = {"ckpt_every_steps": 5}
    with pytest.raises(ConfigError, match="disagree"):
        parse_config(raw)


def test_required_keys_are_named():
    raw = _minimal()
    del raw["recipe_args"]["mask_token_id"]
    with pytest.raises(ConfigError, match="'recipe_args.mask_token_id' is required"):
        parse_config(raw)
    with pytest.raises(ConfigError, match="'optimizer.lr' is required"):
        parse_config({"recipe_args": _minimal()["recipe_args"], "optimizer": {}})


def _cli(tmp_path: Path, *overrides: str) -> dict:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    return load_config(["-c", str(path), *overrides])


def test_command_line_values_are_read_as_typed(tmp_path):
    raw = _cli(
        tmp_path,
        "--recipe_args.val_data_path=null",
        "--recipe_args.freeze_embeddings=false",
        "--recipe_args.target_layer_ids=[0, 2]",
        "--optimizer.lr=1e-4",
        "--recipe_args.chat_template",
        "no",
    )
    cfg = parse_config(raw)
    assert cfg.recipe_args.val_data_path is None and cfg.draft.freeze_embeddings is False
    assert cfg.draft.target_layer_ids == [0, 2] and cfg.optimizer.lr == 1e-4
    assert cfg.recipe_args.chat_template == "no"  # YAML 1.1's `no` is not a boolean here


@pytest.mark.parametrize(
    "override, match",
    [
        ("--recipe_args.freeze_embeddings=no", r"'recipe_args.freeze_embeddings' must be true or false, got 'no'"),
        ("--recipe_args.confidence_head_with_markov=flase", r"'recipe_args.confidence_head_with_markov' must be"),
        ("--optimizer.lr=fast", r"'optimizer.lr' must be a number, got 'fast'"),
        ("--recipe_args.ce_loss_alpha=abc", r"'recipe_args.ce_loss_alpha' must be a number, got 'abc'"),
        ("--recipe_args.target_layer_ids=1", r"'recipe_args.target_layer_ids' must be a list of integers"),
        ("--recipe_args.block_size=0", r"'recipe_args.block_size' must be >= 1, got 0"),
    ],
)
def test_command_line_errors_name_the_key(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(_cli(tmp_path, override))


def test_command_line_shape_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        load_config(["--recipe_args.block_size=3"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["-c", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="--recipe_args.target_layer_ids: not valid YAML"):
        _cli(tmp_path, "--recipe_args.target_layer_ids=[1, 2")


def test_checking_a_config_imports_neither_torch_nor_nemo_automodel():
    code = (
        "import sys; from nemo_automodel_dspark.recipe.config import load_config, parse_config; "
        f"parse_config(load_config(['-c', {str(TINY)!r}])); "
        "print(sorted(m for m in ('torch', 'nemo_automodel', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env())
    assert out.stdout.strip() == "[]"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_a_bad_option_is_one_line_and_status_2_before_anything_loads():
    cmd = [sys.executable, "-m", "nemo_automodel_dspark.train_dspark", "-c", str(TINY), "--recipe_args.block_size=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["dspark train: error: 'recipe_args.block_size' must be >= 1, got 0"]
    assert out.stdout == ""


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_with_one_line_and_no_traceback():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "nemo_automodel_dspark.train_dspark", "-c", str(TINY), "--recipe_args.markov_head_type=gatd"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode != 0
    line = "dspark train: error: 'recipe_args.markov_head_type' must be one of vanilla, gated, rnn; got 'gatd'"
    assert (out.stdout + out.stderr).count(line) == 1  # rank 0 says it once; rank 1 exits 2 silently
    # torchrun's launcher prints its own ChildFailedError summary; no frame of ours appears in any traceback
    assert 'File "' not in "".join(ln for ln in (out.stdout + out.stderr).splitlines() if "nemo_automodel_dspark" in ln)
    assert re.search(r"exitcode\s*:\s*2", out.stdout + out.stderr)


def test_automodel_confignode_is_accepted(tmp_path):
    from nemo_automodel.components.config._arg_parser import parse_args_and_load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    node = parse_args_and_load_config(argv=["-c", str(path), "--recipe_args.max_steps=5"])
    cfg = parse_config(node)
    assert cfg.recipe_args.max_steps == 5 and cfg.recipe_args.seq_length == 64
