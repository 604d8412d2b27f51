"""`evaluate` / `calibrate` check their inputs before they work: each mistake is one line naming what is wrong."""

import json
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
