"""`dspark export`: each dialect's config keys and tensor names/shapes, and each refusal as one line."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers.nemo_drafts import nemo_saved_draft
from safetensors.torch import load_file

from nemo_automodel_dspark import DSparkConfig, DSparkDrafter
from nemo_automodel_dspark.cli import main

MASK_ID = 95


def _save(target, directory, **overrides):
    # ids [0, 2]: 2 = n-2 of the 4-layer target, servable everywhere
    options: dict = dict(mask_token_id=MASK_ID, draft_num_hidden_layers=2, block_size=4, num_anchors=6, markov_rank=8)
    options.update(target_layer_ids=[0, 2])
    options.update(overrides)
    torch.manual_seed(0)
    DSparkDrafter.from_target(target, DSparkConfig(**options)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def saved(qwen3_target, tmp_path_factory):
    return _save(qwen3_target, tmp_path_factory.mktemp("draft"))


def _export(src, fmt, out) -> tuple[dict, dict[str, torch.Tensor]]:
    assert main(["export", str(src), "--format", fmt, "--out", str(out)]) == 0
    return json.loads((out / "config.json").read_text()), load_file(str(out / "model.safetensors"))


def _source(saved) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((saved / "config.json").read_text()), load_file(str(saved / "model.safetensors"))


@pytest.mark.parametrize("fmt", ["nemo", "vllm"])
def test_nemo_and_vllm_are_what_training_writes(saved, tmp_path, fmt):
    config, tensors = _export(saved, fmt, tmp_path / fmt)
    source_config, source = _source(saved)
    assert config == source_config
    assert tensors.keys() == source.keys() and all(torch.equal(tensors[k], source[k]) for k in source)


@pytest.mark.parametrize("fmt", ["specforge", "sglang"])
def test_specforge_nests_the_dspark_keys_and_drops_the_shared_tensors(saved, tmp_path, fmt):
    config, tensors = _export(saved, fmt, tmp_path / fmt)
    source_config, source = _source(saved)
    assert config["architectures"] == ["DSparkDraftModel"]
    nested = config["dflash_config"]
    assert nested["projector_type"] == "dspark" and nested["target_layer_ids"] == [0, 2]
    assert nested["attention_mode"] == "gqa" and nested["shift_label"] is True  # 2 KV heads < 4 query heads
    assert config["block_size"] == 4 and config["num_target_layers"] == 4  # read at the top level
    assert nested["mask_token_id"] == MASK_ID and nested["block_size"] == 4 and nested["num_target_layers"] == 4
    assert nested["markov_rank"] == 8 and nested["markov_head_type"] == "vanilla"
    assert nested["enable_confidence_head"] is True and nested["confidence_head_with_markov"] is True
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == source_config["hidden_size"]
    assert not {"target_layer_ids", "mask_token_id", "markov_rank"} & config.keys()  # only nested
    assert tensors.keys() == source.keys() - {"embed_tokens.weight", "lm_head.weight"}
    assert all(tensors[k].shape == source[k].shape for k in tensors)


def test_speculators_shifts_the_layer_ids_by_one_and_nests_the_layer_config(saved, tmp_path):
    config, tensors = _export(saved, "speculators", tmp_path / "spec")
    source_config, source = _source(saved)
    assert config["speculators_model_type"] == "dspark" and config["architectures"] == ["DSparkSpeculator"]
    assert config["aux_hidden_state_layer_ids"] == [1, 3]
    assert "target_layer_ids" not in config
    layer = config["transformer_layer_config"]
    assert layer["num_hidden_layers"] == 2 and layer["model_type"] == "qwen3" and "markov_rank" not in layer
    assert config["draft_vocab_size"] == 96 and config["target_hidden_size"] == 32 and config["block_size"] == 4
    assert config["markov_rank"] == 8 and config["enable_confidence_head"] is True
    assert config["sample_from_anchor"] is True and "num_anchors" not in config
    spec = config["speculators_config"]
    assert spec["algorithm"] == "dspark" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"] == [{"proposal_type": "greedy", "speculative_tokens": 4}]
    assert spec["verifier"]["architectures"] == ["Qwen3ForCausalLM"]
    assert tensors.keys() == source.keys()


def test_modelopt_flattens_the_markov_head_and_renames_the_confidence_projection(saved, tmp_path):
    config, tensors = _export(saved, "modelopt", tmp_path / "mo")
    _, source = _source(saved)
    assert config["architectures"] == ["DFlashDraftModel"]
    nested = config["dflash_config"]
    assert nested["use_confidence_head"] is True and "enable_confidence_head" not in nested
    assert nested["markov_rank"] == 8 and nested["target_layer_ids"] == [0, 2] and nested["projector_type"] == "dspark"
    assert nested["shift_label"] is True and config["block_size"] == 4 and config["num_target_layers"] == 4
    expected = {
        "markov_w1.weight": "markov_head.markov_w1.weight",
        "markov_w2.weight": "markov_head.markov_w2.weight",
        "confidence_proj.weight": "confidence_head.proj.weight",
        "confidence_proj.bias": "confidence_head.proj.bias",
        "fc.weight": "fc.weight",
        "layers.1.self_attn.o_proj.weight": "layers.1.self_attn.o_proj.weight",
    }
    for ours, theirs in expected.items():
        assert torch.equal(tensors[ours], source[theirs])
    assert not any(k.startswith(("markov_head.", "confidence_head.", "embed_tokens", "lm_head")) for k in tensors)
    assert len(tensors) == len(source) - 2


def test_a_nemo_saved_sharded_draft_exports_to_one_file_that_loads_back(qwen3_target, tmp_path):
    nemo_saved_draft(
        qwen3_target, tmp_path / "nemo", sharded=True, markov_rank=0, confidence_alpha=0.0, layer_ids=[0, 2]
    )
    vllm = ["export", str(tmp_path / "nemo"), "--format", "vllm", "--out", str(tmp_path / "v")]
    assert main(vllm) == 2  # vLLM's DSpark model always builds a Markov head; this draft has none
    config, tensors = _export(tmp_path / "nemo", "nemo", tmp_path / "out")
    assert config["markov_head_type"] == "vanilla" and config["confidence_head_with_markov"] is False  # filled in
    loaded = DSparkDrafter.from_pretrained(tmp_path / "out")
    assert loaded.markov_head is None and loaded.confidence_head is None
    assert tensors.keys() == loaded.state_dict().keys()


@pytest.mark.parametrize(
    "fmt, options, words",
    [
        ("vllm", dict(markov_head_type="gated"), "vllm cannot serve this draft (markov_head_type)"),
        ("vllm", dict(markov_head_type="rnn"), "set markov_head_type: vanilla"),
        ("vllm", dict(markov_rank=0, confidence_head_with_markov=False), "(markov_rank)"),
        (
            "modelopt",
            dict(markov_rank=0, confidence_head_with_markov=False),
            "modelopt cannot serve this draft (markov_rank)",
        ),
        ("modelopt", dict(confidence_head_with_markov=False), "(confidence_head_with_markov)"),
        ("speculators", dict(target_layer_ids=[0, 3]), "(target_layer_ids): ids [3]"),
        ("sglang", dict(target_layer_ids=[-1, 2]), "(target_layer_ids): ids [-1]"),
        ("specforge", dict(target_layer_ids=[1, 3]), "use ids in [0, 2], e.g. the default [1, 2]"),
    ],
)
def test_refusals_are_one_line_naming_engine_key_and_fix(qwen3_target, tmp_path, capsys, fmt, options, words):
    src = _save(qwen3_target, tmp_path / "src", **options)
    assert main(["export", str(src), "--format", fmt, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dspark export: error: --format {fmt}: ") and words in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert main(["export", str(src), "--format", "nemo", "--out", str(tmp_path / "nemo")]) == 0  # nemo takes all


def test_export_refuses_to_overwrite_its_source_and_a_folder_without_a_draft(saved, tmp_path, capsys):
    assert main(["export", str(saved), "--format", "vllm", "--out", str(saved)]) == 2
    assert "the checkpoint itself" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "vllm", "--out", str(tmp_path / "o")]) == 2
    assert "not a saved DSpark draft" in capsys.readouterr().err


def test_a_gemma4_draft_exports_to_nemo_only(tmp_path, capsys):
    from _helpers.recipe_assets import tiny_model

    target = tiny_model("gemma4", eos=2).eval()
    torch.manual_seed(0)
    options = DSparkConfig(
        mask_token_id=3, draft_num_hidden_layers=1, block_size=4, markov_rank=8, target_layer_ids=[0]
    )
    DSparkDrafter.from_target(target, options).save_pretrained(tmp_path / "g")
    for fmt in ("vllm", "sglang", "specforge", "speculators", "modelopt"):
        assert main(["export", str(tmp_path / "g"), "--format", fmt, "--out", str(tmp_path / fmt)]) == 2
        assert f"{fmt} cannot serve this draft (target_model_name_or_path): its DSpark draft layer is Qwen3's" in (
            capsys.readouterr().err
        )
    config, _ = _export(tmp_path / "g", "nemo", tmp_path / "nemo")
    assert config["architectures"] == ["Gemma4DSparkModel"]
