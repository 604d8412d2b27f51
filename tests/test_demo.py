"""The demo path end to end on a small budget: tiny target → regenerated data → 2-process FSDP2 training → report."""

import json
import re

import pytest

from nemo_automodel_dspark import demo
from nemo_automodel_dspark.cli import main
from nemo_automodel_dspark.demo import DemoOptions, run_demo


def test_demo_flags_reach_the_options(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    argv = ["demo", "--workdir", str(tmp_path), "--run-name", "nomarkov", "--epochs", "2", "--train-rows", "7"]
    assert main([*argv, "--set", "recipe_args.markov_rank=0", "--heldout-rows", "3", "--nproc", "1"]) == 0
    (opts,) = seen
    assert (opts.workdir, opts.run_name, opts.epochs, opts.train_rows, opts.heldout_rows, opts.nproc) == (
        tmp_path,
        "nomarkov",
        2,
        7,
        3,
        1,
    )
    assert opts.extra_overrides == ("--recipe_args.markov_rank=0",)


@pytest.mark.slow
def test_demo_end_to_end_small_budget(tmp_path, capfd):
    opts = DemoOptions(
        workdir=tmp_path,
        train_rows=24,
        heldout_rows=4,
        max_new_tokens=24,
        epochs=1,
        decode_prompts=2,
        decode_tokens=12,
        target_steps=20,
        extra_overrides=(
            "--recipe_args.seq_length=128",
            "--recipe_args.num_anchors=8",
            "--recipe_args.micro_batch_size=2",
            "--recipe_args.log_every_steps=2",
        ),
    )
    summary = run_demo(opts)
    assert (tmp_path / "run" / "dspark_demo_curves.png").stat().st_size > 10_000
    assert 1.0 <= summary["val"]["val/tau"] <= 8.0
    for name in ("T=0", "T=1"):
        assert summary["decoding"][name]["rounds"] > 0 and summary["decoding"][name]["speedup"] > 0
    assert summary["decoding"]["T=0"]["matches_target_greedy"] is True
    first = json.loads((tmp_path / "train_regen.jsonl").read_text().splitlines()[0])
    assert first["response_ids"] and first["prompt_ids"]  # trained on the target's own token stream ...
    log = "".join(capfd.readouterr())
    used = re.search(r"train_regen\.jsonl: (\d+) rows used.*?, (\d+) as the target's own token ids", log)
    assert used and used.group(1) == used.group(2) != "0"  # ... and the recipe trained on exactly that
    saved = json.loads((tmp_path / "run" / "demo_report.json").read_text())
    assert saved["train"]["step"] == summary["train"]["step"] >= 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train-rows", "-1"], "--train-rows -1: must be >= 1"),
        (["--heldout-rows", "0"], "--heldout-rows 0: must be >= 1"),
        (["--nproc", "0"], "--nproc 0: must be >= 1"),
        (["--epochs", "0"], "--epochs 0: must be >= 1"),
    ],
)
def test_demo_refuses_bad_counts_before_any_work(monkeypatch, tmp_path, capsys, flags, message):
    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert main(["demo", "--workdir", str(tmp_path / "w"), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"dspark demo: error: {message}"
    assert seen == [] and not (tmp_path / "w").exists()


def test_demo_refuses_a_file_as_workdir(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "run_demo", lambda opts: pytest.fail("ran"))
    (tmp_path / "f").write_text("")
    assert main(["demo", "--workdir", str(tmp_path / "f")]) == 2
    assert (
        capsys.readouterr().err.strip() == f"dspark demo: error: --workdir {tmp_path / 'f'}: is a file; pass a folder"
    )


def test_demo_refuses_a_mistyped_set_before_any_work(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert main(["demo", "--workdir", str(workdir), "--set", "recipe_args.markov_rnak=0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "dspark demo: error: --set: unknown config key 'recipe_args.markov_rnak'; "
        "did you mean 'recipe_args.markov_rank'?"
    )
    assert not workdir.exists()  # nothing built, nothing regenerated


def test_a_failed_training_run_is_one_line_naming_the_run_folder(monkeypatch, tmp_path):
    from subprocess import CompletedProcess

    from nemo_automodel_dspark.errors import ToolError

    launched = []

    def failing_run(cmd, **kwargs):
        launched.append(cmd)
        return CompletedProcess(cmd, 1)

    monkeypatch.setattr(demo.subprocess, "run", failing_run)
    opts = DemoOptions(workdir=tmp_path, epochs=2, extra_overrides=("--recipe_args.markov_rank=0",))
    with pytest.raises(ToolError) as err:
        demo.train(opts, tmp_path / "target", 3, tmp_path / "t.jsonl", tmp_path / "h.jsonl")
    assert (
        str(err.value) == f"training stopped with exit status 1 (its message is above); run folder {tmp_path / 'run'}"
    )
    # the user's overrides come last, so they win over the demo's own
    assert launched[0][-2:] == ["--recipe_args.num_epochs=2", "--recipe_args.markov_rank=0"]


def test_demo_help_shows_the_row_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = DemoOptions(workdir=None)  # type: ignore[arg-type]
    assert f"training prompts to regenerate (default: {defaults.train_rows})" in text
    assert f"held-out prompts to regenerate (default: {defaults.heldout_rows})" in text
