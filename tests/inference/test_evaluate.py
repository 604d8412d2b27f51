"""`evaluate` → `calibrate` → `schedule` on a tiny saved target (word-level tokenizer + chat template) and draft."""

import argparse
import json

import pytest
import torch
from _helpers.recipe_assets import build_target_dir

from nemo_automodel_dspark.data.sources import normalize_messages, prompt_messages
from nemo_automodel_dspark.evaluate import main as evaluate_main
from nemo_automodel_dspark.inference import calibration, scheduler
from nemo_automodel_dspark.inference.prompts import load_prompts
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.drafter import DSparkDrafter

BLOCK = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("eval")
    target_dir = build_target_dir(root / "target")
    target = AutoModelForCausalLM.from_pretrained(target_dir)
    torch.manual_seed(0)
    config = DSparkConfig(
        mask_token_id=3, draft_num_hidden_layers=1, block_size=BLOCK, markov_rank=8, target_layer_ids=[0, 1]
    )
    DSparkDrafter.from_target(target, config).save_pretrained(root / "draft")
    rows = [
        {"category": "a", "messages": [{"role": "user", "content": "w1 w2 w3"}]},
        {
            "category": "b",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "w7 w8"}]},
                {"role": "assistant", "content": "w9 w9"},
            ],
        },  # trailing answer is dropped
        {"category": "a", "messages": [{"role": "system", "content": "w0"}, {"role": "user", "content": "w5"}]},
    ]
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, target_dir, data


def test_trailing_assistant_turn_is_dropped():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert prompt_messages(normalize_messages(row)) == [{"role": "user", "content": "q"}]


def test_evaluate_calibrate_schedule_end_to_end(assets):
    root, target_dir, data = assets
    out = root / "run"
    argv = [
        "--target",
        str(target_dir),
        "--draft",
        str(root / "draft"),
        "--data",
        str(data),
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--output",
        str(out / "report.json"),
        "--save-generations",
        str(out / "gens.jsonl"),
        "--save-rounds",
        str(out / "rounds.jsonl"),
        "--device",
        "cpu",
    ]
    assert evaluate_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    gens = [json.loads(line) for line in (out / "gens.jsonl").read_text().splitlines()]
    rounds = calibration.read_rounds(out / "rounds.jsonl")

    assert report["matches_target_greedy"] is True  # lossless, checked inside the same run
    assert 1.0 <= report["tau"] <= BLOCK + 1 and report["speedup"] > 0 and report["target_tokens_per_s"] > 0
    assert report["rounds"] == len(rounds) == sum(len(g["accepted"]) for g in gens)
    assert report["tau"] == pytest.approx(sum(sum(g["accepted"]) for g in gens) / len(rounds))
    assert [g["prompt_index"] for g in gens] == [0, 1, 2]
    assert all(1 <= len(g["token_ids"]) <= 12 for g in gens)
    assert set(report["categories"]) == {"a", "b"} and report["categories"]["a"]["num_prompts"] == 2
    assert len(report["acceptance_per_position"]) == BLOCK
    assert len(report["confidence"]["raw"]) == BLOCK and "calibrated" not in report["confidence"]

    # Sequential Temperature Scaling on those rounds, then the next evaluation reports before/after.
    args = argparse.Namespace(draft=str(root / "draft"), rounds=str(out / "rounds.jsonl"), bins=10)
    assert calibration.run(args) == 0
    temps = json.loads((root / "draft" / "config.json").read_text())["confidence_temperatures"]
    assert len(temps) == BLOCK
    argv[argv.index("--output") + 1] = str(out / "report2.json")
    assert evaluate_main([*argv, "--num-prompts", "1", "--no-speed"]) == 0
    second = json.loads((out / "report2.json").read_text())
    assert second["num_prompts"] == 1 and second["speedup"] is None
    assert second["confidence"]["temperatures"] == temps and len(second["confidence"]["calibrated"]) == BLOCK

    (root / "sps.json").write_text(json.dumps({"1": 100.0, "4": 90.0, "16": 40.0}))
    args = argparse.Namespace(
        confidences=str(out / "rounds.jsonl"),
        sps=str(root / "sps.json"),
        concurrency="1,4",
        draft=str(root / "draft"),
        batches=10,
        seed=0,
        output=str(out / "schedule.json"),
    )
    assert scheduler.run(args) == 0
    result = json.loads((out / "schedule.json").read_text())
    assert [r["concurrency"] for r in result["results"]] == [1, 4] and result["temperatures"] == temps


def test_prompts_render_with_the_generation_prompt(assets):
    from transformers import AutoTokenizer

    _, target_dir, data = assets
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    prompts = load_prompts(data, tokenizer, num_prompts=2)
    assert [p.category for p in prompts] == ["a", "b"]
    text = tokenizer.decode(prompts[1].ids)
    assert text.endswith("<|im_start|> assistant") or text.endswith("<|im_start|>assistant")
    assert "w9" not in text  # the dropped assistant turn is not part of the prompt


def test_in_process_evaluate_leaves_training_state_alone():
    """The recipe calls `run_evaluation` mid-training: the global RNG and the draft's train mode must be untouched."""
    from _helpers.inference_models import random_draft, tiny_target

    from nemo_automodel_dspark.inference.evaluate import run_evaluation

    target = tiny_target(32)
    draft = random_draft(target).train()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    report = run_evaluation(target, draft, None, [[1, 2, 3], [4, 5]], temperature=1.0, max_new_tokens=6, seed=3).report
    assert torch.equal(torch.get_rng_state(), rng) and draft.training
    assert report["num_prompts"] == 2 and report["generated_tokens"] <= 12 and report["speedup"] > 0
    again = run_evaluation(target, draft, None, [[1, 2, 3], [4, 5]], temperature=1.0, max_new_tokens=6, seed=3).report
    assert again["tau"] == report["tau"] and again["rounds"] == report["rounds"]  # seeded: reproducible


def test_user_mistakes_are_one_line_errors_naming_the_flag(assets, tmp_path, capsys):
    from nemo_automodel_dspark.cli import main

    root, target_dir, data = assets
    base = ["--target", str(target_dir), "--output", str(tmp_path / "r.json"), "--device", "cpu"]
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps({"messages": [{"role": "user", "content": "w1"}]}) + "\n{oops\n")
    not_rounds = tmp_path / "rounds.jsonl"
    not_rounds.write_text(json.dumps({"round": 0}) + "\n")
    sps = tmp_path / "sps.json"
    sps.write_text("[1, 2]")
    draft = str(root / "draft")
    cases = [
        (["evaluate", *base, "--draft", str(tmp_path), "--data", str(data)], "not a saved DSpark draft"),
        (["evaluate", *base, "--draft", draft, "--data", str(tmp_path / "nope.jsonl")], "--data"),
        (["evaluate", *base, "--draft", draft, "--data", str(bad_json)], "bad.jsonl:2"),
        (["calibrate", "--draft", draft, "--rounds", str(tmp_path / "nope.jsonl")], "--rounds"),
        (["calibrate", "--draft", draft, "--rounds", str(not_rounds)], "rounds.jsonl:1: not an evaluate round"),
        (["schedule", "--confidences", str(not_rounds), "--sps", str(sps)], "--sps"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err, err
