"""The tiny target: a loadable HF model + tokenizer whose chat template, mask token and cache behave as promised."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from nemo_automodel_dspark.cli import main
from nemo_automodel_dspark.tools.stdlib_corpus import split_files, stdlib_chat_rows, stdlib_files, tokenizer_corpus
from nemo_automodel_dspark.tools.tiny_target import MANIFEST_NAME, build_tiny_target


def test_loads_with_auto_classes_and_learned(tiny_target):
    model = AutoModelForCausalLM.from_pretrained(tiny_target)
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    manifest = json.loads((tiny_target / MANIFEST_NAME).read_text())
    assert model.config.model_type == "qwen3" and not model.config.tie_word_embeddings
    assert len(tokenizer) <= model.config.vocab_size == 512
    assert GenerationConfig.from_pretrained(tiny_target).eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # Training did something: the loss fell well below the uniform-guess loss ln(V).
    assert manifest["final_train_loss"] < manifest["initial_train_loss"] - 0.5
    assert manifest["steps"] == 30 and manifest["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_chat_template_is_qwen3_style(tiny_target):
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    head = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    no_think = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    think = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert no_think == head + "<think>\n\n</think>\n\n"
    assert think == head
    # The full conversation extends the thinking-disabled generation prompt: prefix-rendered loss masks line up.
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": "x = 1"}], tokenize=False)
    assert full == no_think + "x = 1<|im_end|>\n"
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    assert tokenizer.apply_chat_template(parts, tokenize=False).endswith("<|im_start|>user\nhi<|im_end|>\n")


def test_mask_token_is_a_reserved_special_id(tiny_target):
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    manifest = json.loads((tiny_target / MANIFEST_NAME).read_text())
    mask_id = manifest["mask_token_id"]
    assert tokenizer.mask_token_id == mask_id
    assert tokenizer.encode("<|mask|>", add_special_tokens=False) == [mask_id]
    assert mask_id in tokenizer.all_special_ids
    rows = stdlib_chat_rows("train", 50, seed=0) + stdlib_chat_rows("held_out", 50, seed=0)
    texts = tokenizer_corpus(300_000) + [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    assert all(mask_id not in ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def test_second_build_reuses_the_cache(tiny_target, small_target_kwargs, capsys):
    weights = tiny_target / "model.safetensors"
    before = weights.stat().st_mtime_ns
    build = build_tiny_target(tiny_target, seed=0, progress=False, **small_target_kwargs)
    assert build.reused and weights.stat().st_mtime_ns == before
    assert "reusing the tiny target" in capsys.readouterr().out


def test_same_seed_same_weights_other_seed_differs(tmp_path, small_target_kwargs):
    kwargs = {**small_target_kwargs, "steps": 3, "progress": False}
    builds = [build_tiny_target(tmp_path / name, seed=seed, **kwargs) for name, seed in [("a", 1), ("b", 1), ("c", 2)]]
    a, b, c = (load_file(build.path / "model.safetensors") for build in builds)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert not (tmp_path / "a.tmp").exists()  # built aside, then renamed into place
    # A different configuration in the same directory is a rebuild, not a reuse.
    assert not build_tiny_target(tmp_path / "a", seed=1, **{**kwargs, "steps": 2}).reused


def test_train_and_held_out_rows_are_disjoint_and_deterministic():
    train, held_out = set(split_files("train")), set(split_files("held_out"))
    assert train.isdisjoint(held_out) and train | held_out == set(stdlib_files()) and held_out

    def source(row: dict) -> str:
        return row["messages"][0]["content"].split(" from ", 1)[1].split(":\n", 1)[0]

    train_rows, held_out_rows = stdlib_chat_rows("train", 40, seed=3), stdlib_chat_rows("held_out", 40, seed=3)
    assert {source(r) for r in train_rows} <= train and {source(r) for r in held_out_rows} <= held_out
    assert stdlib_chat_rows("train", 40, seed=3) == train_rows != stdlib_chat_rows("train", 40, seed=4)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in train_rows)


def test_cli_refuses_to_replace_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["build-tiny-target", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "not a tiny-target build" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_tiny_example_yaml_matches_the_tiny_target_and_the_demo_files(tiny_target, monkeypatch):
    """`examples/dspark/tiny_cpu_dspark.yaml` run by hand after `dspark demo` reads the demo's files with the tiny
    target's mask id (a stale id would be another real token of the vocabulary, accepted silently)."""
    from pathlib import Path

    import yaml

    from nemo_automodel_dspark import demo

    example = Path(__file__).resolve().parents[2] / "examples/dspark/tiny_cpu_dspark.yaml"
    args = yaml.safe_load(example.read_text())["recipe_args"]
    manifest = json.loads((tiny_target / MANIFEST_NAME).read_text())
    mask_id = AutoTokenizer.from_pretrained(tiny_target).mask_token_id
    assert args["mask_token_id"] == manifest["mask_token_id"] == mask_id
    seen: list = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert main(["demo"]) == 0  # the demo's default workdir, as `dspark demo` parses it
    workdir = seen[0].workdir
    assert Path(args["target_model_name_or_path"]) == workdir / "target"
    assert Path(args["train_data_path"]) == workdir / "train_regen.jsonl"
    assert Path(args["val_data_path"]) == workdir / "held_out_regen.jsonl"


def test_cli_refuses_a_step_count_below_one_and_shows_the_default(tmp_path, capsys):
    import pytest

    from nemo_automodel_dspark.tools.tiny_target import DEFAULT_STEPS

    assert main(["build-tiny-target", "--out", str(tmp_path / "t"), "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dspark build-tiny-target: error: --steps 0: must be >= 1"
    assert not (tmp_path / "t").exists()
    with pytest.raises(SystemExit):
        main(["build-tiny-target", "--help"])
    assert f"(default: {DEFAULT_STEPS})" in " ".join(capsys.readouterr().out.split())
