"""`evaluate` / `calibrate` check their inputs before they work: each mistake is one line naming what is wrong."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _helpers.recipe_assets import build_target_dir
from safetensors.torch import load_file, save_file

from nemo_automodel_dspark.cli import main
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.drafter import DSparkDrafter


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("checks")
    target_dir = build_target_dir(root / "target")
    target = AutoModelForCausalLM.from_pretrained(target_dir)
    torch.manual_seed(0)
    config = DSparkConfig(
        mask_token_id=3, draft_num_hidden_layers=1, block_size=4, markov_rank=8, target_layer_ids=[0, 1]
    )
    DSparkDrafter.from_target(target, config).save_pretrained(root / "draft")
    data = root / "prompts.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "w1 w2"}]}) + "\n")
    return root, target_dir, data


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def nan_copy(draft: Path, out: Path) -> Path:
    """A copy of `draft` whose first floating tensor holds a NaN (what a diverged run used to save)."""
    out.mkdir()
    (out / "config.json").write_text((draft / "config.json").read_text())
    state = load_file(str(draft / "model.safetensors"))
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(out / "model.safetensors"))
    return out


def test_evaluate_and_calibrate_refuse_a_non_finite_draft(assets, tmp_path, capsys):
    root, target_dir, data = assets
    bad = nan_copy(root / "draft", tmp_path / "nan_draft")
    before = (bad / "config.json").read_text()
    evaluate = ["evaluate", "--target", str(target_dir), "--draft", str(bad), "--data", str(data)]
    err = one_line_error([*evaluate, "--output", str(tmp_path / "r.json"), "--device", "cpu"], capsys)
    assert f"--draft {bad}: non-finite weights in " in err and not (tmp_path / "r.json").exists()
    rounds = tmp_path / "rounds.jsonl"
    rounds.write_text(json.dumps({"verify_len": 2, "num_accepted": 1, "confidence_logits": [0.0, 1.0]}) + "\n")
    err = one_line_error(["calibrate", "--draft", str(bad), "--rounds", str(rounds)], capsys)
    assert "non-finite weights in " in err
    assert (bad / "config.json").read_text() == before  # nothing was written into the refused draft


def mismatched_copy(draft: Path, out: Path, **changes) -> Path:
    """A copy of `draft` whose config.json says it was built for another target."""
    shutil.copytree(draft, out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_evaluate_refuses_a_draft_trained_for_another_target_before_loading(assets, tmp_path, capsys):
    root, target_dir, data = assets
    other = mismatched_copy(root / "draft", tmp_path / "other", vocab_size=128, num_target_layers=6)
    config = json.loads((other / "config.json").read_text())
    config["target_layer_ids"] = [0, 5]
    (other / "config.json").write_text(json.dumps(config))
    argv = ["evaluate", "--target", str(target_dir), "--draft", str(other), "--data", str(data)]
    err = one_line_error([*argv, "--output", str(tmp_path / "r.json")], capsys)
    assert f"--draft {other} was not trained for --target {target_dir}" in err
    assert "vocab_size 128 vs 64" in err and "target layers 6 vs 3" in err and "[5] outside the target's 3" in err


def test_a_plain_model_as_draft_is_one_line(assets, tmp_path, capsys):
    root, target_dir, data = assets
    argv = ["evaluate", "--target", str(target_dir), "--draft", str(target_dir), "--data", str(data)]
    err = one_line_error([*argv, "--output", str(tmp_path / "r.json")], capsys)
    assert "missing DSpark key(s)" in err
    rounds = tmp_path / "rounds.jsonl"
    rounds.write_text(json.dumps({"verify_len": 2, "num_accepted": 1, "confidence_logits": [0.0, 1.0]}) + "\n")
    assert "missing DSpark key(s)" in one_line_error(
        ["calibrate", "--draft", str(target_dir), "--rounds", str(rounds)], capsys
    )


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--output", "{tmp}"], "--output {tmp}: is a directory"),
        (["--output", "{data}/r.json"], "--output {data}/r.json: cannot write there ({data} is not a writable folder)"),
        (["--output", "/proc/r.json"], "--output /proc/r.json: cannot write there ("),  # access() may say yes here
        (["--output", "{tmp}/r.json", "--save-rounds", "{tmp}"], "--save-rounds {tmp}: is a directory"),
        (["--output", "{tmp}/r.json", "--num-prompts", "-1"], "--num-prompts -1: must be >= 1"),
        (["--output", "{tmp}/r.json", "--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    ],
)
def test_output_paths_and_counts_are_checked_before_any_work(assets, tmp_path, capsys, flags, expected):
    root, target_dir, data = assets
    argv = ["evaluate", "--target", str(target_dir), "--draft", str(root / "draft"), "--data", str(data)]
    err = one_line_error([*argv, *(f.format(tmp=tmp_path, data=data) for f in flags)], capsys)
    assert expected.format(tmp=tmp_path, data=data) in err
    assert not list(tmp_path.glob(".dspark-write-probe-*"))  # the probe of a writable folder is gone


def test_a_model_folder_given_as_data_is_named_as_such(assets, tmp_path, capsys):
    root, target_dir, _ = assets
    argv = ["evaluate", "--target", str(target_dir), "--draft", str(root / "draft"), "--data", str(target_dir)]
    err = one_line_error([*argv, "--output", str(tmp_path / "r.json")], capsys)
    assert f"--data {target_dir}: a model folder (config.json), not a file" in err


def test_a_missing_local_target_is_one_line(assets, tmp_path, capsys):
    root, _, data = assets
    argv = ["evaluate", "--target", "./no/such/target", "--draft", str(root / "draft"), "--data", str(data)]
    err = one_line_error([*argv, "--output", str(tmp_path / "r.json")], capsys)
    assert "--target ./no/such/target: no such folder" in err


@pytest.mark.parametrize(
    "line, reason",
    [
        ("null", "row is not a JSON object"),
        ("42", "row is not a JSON object"),
        ("[1, 2, 3]", "row is not a JSON object"),  # token ids only as documented `prompt_ids` rows, never guessed
        ('{"messages": "w1 w2"}', ""),
        ('{"prompt": "w1 w2"}', ""),
    ],
)
def test_prompt_rows_of_the_wrong_shape_name_file_and_line(assets, tmp_path, capsys, line, reason):
    root, target_dir, data = assets
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + line + "\n")
    argv = ["evaluate", "--target", str(target_dir), "--draft", str(root / "draft"), "--data", str(bad)]
    err = one_line_error([*argv, "--output", str(tmp_path / "r.json")], capsys)
    assert f"{bad}:2: {reason}" in err and not (tmp_path / "r.json").exists()


def test_regenerate_refuses_a_negative_row_count(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "w1"}]}) + "\n")
    argv = ["regenerate", "--target", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o.jsonl")]
    assert "--num-rows -1: must be >= 1" in one_line_error([*argv, "--num-rows", "-1"], capsys)
    assert "--target ./missing: no such folder" in one_line_error(
        [*argv[:1], "--target", "./missing", *argv[3:]], capsys
    )


def test_regenerate_and_calibrate_check_where_they_write_before_any_work(assets, tmp_path, capsys, monkeypatch):
    root, target_dir, data = assets
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["regenerate", "--target", str(target_dir), "--data", str(data), "--out", str(blocker / "o.jsonl")]
    assert f"--out {blocker / 'o.jsonl'}: cannot write there ({blocker} is not a writable folder)" in (
        one_line_error(argv, capsys)
    )
    draft = root / "draft"
    rounds = tmp_path / "rounds.jsonl"
    rounds.write_text(json.dumps({"verify_len": 2, "num_accepted": 1, "confidence_logits": [0.0, 1.0]}) + "\n")
    before = (draft / "config.json").read_text()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != draft and real_access(path, mode))
    err = one_line_error(["calibrate", "--draft", str(draft), "--rounds", str(rounds)], capsys)
    assert f"--draft {draft}: cannot write there ({draft} is not a writable folder)" in err
    assert (draft / "config.json").read_text() == before


def test_a_utf8_bom_means_the_same_to_every_reader(assets, tmp_path):
    from nemo_automodel_dspark.data.dataset import DSparkChatDataset
    from nemo_automodel_dspark.inference.calibration import read_rounds
    from nemo_automodel_dspark.inference.prompts import load_prompts
    from nemo_automodel_dspark.target.loading import load_tokenizer
    from nemo_automodel_dspark.tools.chat_rows import parse_row

    _, target_dir, _ = assets
    tokenizer = load_tokenizer(str(target_dir))
    row = {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"}]}
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_prompts(bom, tokenizer) == load_prompts(plain, tokenizer)  # evaluate
    assert len(DSparkChatDataset(str(bom), tokenizer, 48)) == 2  # training keeps row 1
    first = bom.read_bytes().splitlines()[0]
    assert parse_row(1, first).prompt == [{"role": "user", "content": "w1 w2"}]  # regenerate keeps row 1
    for name in ("plain.json", "bom.json"):  # a JSON list file, with and without the BOM
        (tmp_path / name).write_bytes((b"\xef\xbb\xbf" if name == "bom.json" else b"") + json.dumps([row]).encode())
    assert load_prompts(tmp_path / "bom.json", tokenizer) == load_prompts(tmp_path / "plain.json", tokenizer)
    rounds = tmp_path / "rounds.jsonl"
    rounds.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"verify_len": 2, "num_accepted": 1, "confidence_logits": [0.0, 1.0]}).encode()
    )
    assert len(read_rounds(rounds)) == 1  # calibrate / schedule


def test_export_refuses_a_non_finite_draft_and_a_file_as_out(assets, tmp_path, capsys):
    root, _, _ = assets
    bad = nan_copy(root / "draft", tmp_path / "nan_draft")
    err = one_line_error(["export", str(bad), "--format", "nemo", "--out", str(tmp_path / "out")], capsys)
    assert f"CKPT {bad}: non-finite weights in " in err and not (tmp_path / "out").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = one_line_error(["export", str(root / "draft"), "--format", "nemo", "--out", str(a_file)], capsys)
    assert f"--out {a_file}: is a file; pass a folder" in err and a_file.read_text() == "x"


@pytest.mark.parametrize(
    "device, cuda_devices, expected",
    [
        ("cuda", 0, "--device cuda: CUDA is not available on this machine (torch {torch}); use cpu"),
        ("cuda:1", 0, "--device cuda:1: CUDA is not available on this machine (torch {torch}); use cpu"),
        ("cuda:2", 2, "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
        ("gpu", 0, "--device gpu: not a device; use cpu, cuda or cuda:N"),
        ("mps", 0, "--device mps: not supported here; use cpu, cuda or cuda:N"),
    ],
)
def test_a_device_this_machine_lacks_is_one_line_before_loading(
    assets, tmp_path, capsys, monkeypatch, device, cuda_devices, expected
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    root, target_dir, data = assets
    expected = expected.format(torch=torch.__version__)
    argv = ["evaluate", "--target", str(target_dir), "--draft", str(root / "draft"), "--data", str(data)]
    err = one_line_error([*argv, "--output", str(tmp_path / "r.json"), "--device", device], capsys)
    assert err.strip() == f"dspark evaluate: error: {expected}"
    argv = ["regenerate", "--target", str(target_dir), "--data", str(data), "--out", str(tmp_path / "o.jsonl")]
    assert one_line_error([*argv, "--device", device], capsys).strip() == f"dspark regenerate: error: {expected}"
    assert not (tmp_path / "o.jsonl.shards").exists()
