"""`recipe_args.serve_with`: every engine rule is one error naming key, engine and fix, raised before anything loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from _helpers.recipe_assets import base_config

from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.export.engines import ENGINES, DraftOptions, findings
from nemo_automodel_dspark.recipe.config import ConfigError, parse_config
from nemo_automodel_dspark.recipe.serving_checks import check_serving
from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dspark"


def _cfg(**recipe_args) -> dict:
    return base_config(
        {"target": "/nonexistent/target", "train": "/nonexistent/train.jsonl"}, Path("/tmp/x"), **recipe_args
    )


@pytest.mark.parametrize(
    "engine, options, key, fix",
    [
        ("vllm", dict(markov_head_type="gated"), "markov_head_type", "markov_head_type: vanilla"),
        ("vllm", dict(markov_head_type="rnn"), "markov_head_type", "markov_head_type: vanilla"),
        ("vllm", dict(markov_rank=0, confidence_head_with_markov=False), "markov_rank", "markov_rank > 0"),
        ("modelopt", dict(markov_rank=0, confidence_head_with_markov=False), "markov_rank", "markov_rank > 0"),
        ("modelopt", dict(confidence_head_with_markov=False), "confidence_head_with_markov", "true"),
        ("speculators", dict(target_layer_ids=[-1, 1]), "target_layer_ids", "ids >= 0"),
    ],
)
def test_option_rules_fail_at_parse_time(engine, options, key, fix):
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(serve_with=[engine], **options))
    message = str(err.value)
    assert message.startswith(f"recipe_args.{key}: {engine} cannot serve this draft") and fix in message
    assert "\n" not in message


def test_the_same_options_parse_for_engines_that_serve_them():
    parse_config(_cfg(serve_with=["specforge", "speculators"], markov_head_type="rnn"))
    parse_config(_cfg(serve_with=["speculators"], markov_rank=0, confidence_head_with_markov=False))
    assert parse_config(_cfg(serve_with="vllm")).recipe_args.serve_with == ["vllm"]  # one name means a list of one


def test_unknown_engine_names_the_key():
    with pytest.raises(ConfigError, match=r"'recipe_args.serve_with': unknown engine 'tgi'; choose from vllm, sglang"):
        parse_config(_cfg(serve_with=["vllm", "tgi"]))


def test_layer_ids_against_the_targets_depth_fail_before_data_or_weights_load(tiny_assets, tmp_path):
    """Only the target's config.json is there (no weights, no tokenizer): the serving error must come before the
    tokenizer, data or weights load, naming the key, the engine and the servable spread."""
    target = tmp_path / "target"
    target.mkdir()
    shutil.copy(tiny_assets["target"] / "config.json", target / "config.json")
    cfg = base_config({**tiny_assets, "target": target}, tmp_path / "run", serve_with=["vllm"])
    recipe = TrainDSparkRecipe(cfg)  # [0, 2] of a 3-layer target parses: n is not known yet
    with pytest.raises(ToolError, match=r"recipe_args.target_layer_ids: vllm cannot serve .* ids \[2\] .*\[0, 1\]"):
        recipe.setup()


def test_without_serve_with_every_engines_findings_are_warned_once_at_start(tiny_assets, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    shutil.copy(tiny_assets["target"] / "config.json", target / "config.json")
    cfg = base_config({**tiny_assets, "target": target}, tmp_path / "run", markov_head_type="gated")
    with pytest.raises(ValueError, match="cannot render chats"):  # no tokenizer there: data fails after the warning
        TrainDSparkRecipe(cfg).setup()
    out = capsys.readouterr().out
    assert out.count("serving: this draft will not load everywhere") == 1
    for engine in ENGINES:
        assert f"recipe_args.target_layer_ids: {engine} cannot serve" in out
    assert "recipe_args.markov_head_type: vllm cannot serve" in out
    assert "markov_head_type: specforge" not in out  # SpecForge has the gated head


def test_default_options_and_the_shipped_yamls_pass_serve_with_vllm():
    from transformers import Qwen3Config

    qwen3_28 = Qwen3Config(num_hidden_layers=28)
    qwen3_28.architectures = ["Qwen3ForCausalLM"]
    defaults = parse_config(_cfg(serve_with=["vllm"], target_layer_ids=None))
    assert check_serving(defaults, qwen3_28) == []
    raw = yaml.safe_load((EXAMPLES / "qwen3_0.6b_dspark.yaml").read_text())
    raw["recipe_args"]["serve_with"] = ["vllm"]
    assert check_serving(parse_config(raw), qwen3_28) == []
    upstream = {**raw, "recipe_args": {**raw["recipe_args"], "target_layer_ids": [1, 7, 14, 21, 27]}}
    del upstream["recipe_args"]["serve_with"]
    args = parse_config(upstream)  # the upstream YAML's ids still load: the user's choice
    assert {f.engine for f in check_serving(args, qwen3_28)} == set(ENGINES)


def test_default_spread_and_vanilla_heads_have_no_finding_for_any_engine():
    for n in (4, 28, 48):
        options = DraftOptions(256, "vanilla", True, True, None, num_target_layers=n, family="qwen3")
        assert findings(options) == []
    gemma = DraftOptions(256, "vanilla", True, True, None, num_target_layers=48, family="gemma4")
    assert {f.key for f in findings(gemma)} == {"target_model_name_or_path"}
