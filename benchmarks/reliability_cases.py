"""The failure classes of `reliability.py` other than the kills: a full disk, torn and damaged files, divergence and
bad inputs. Each function returns one `Result` per case; `reliability.py` runs them and prints the summary."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from reliability import (
    STEPS,
    Patched,
    Result,
    captured,
    final_state,
    identical,
    resume,
    run_config,
    step_folder,
    train,
)
from safetensors.torch import load_file, save_file

from nemo_automodel_dspark.cli import main as cli_main
from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.io import leftover_temps
from nemo_automodel_dspark.recipe import metrics as metrics_module
from nemo_automodel_dspark.recipe.guards import REFERENCE_STEPS, RunStopped
from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe


# ------------------------------------------------------------------------------------------------------- disk full
def full_disk_save(calls: list, fail_at: int, real: Callable) -> Callable:
    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    return save


def full_disk_append(calls: list, fail_at: int, real: Callable) -> Callable:
    def append(path, text):
        calls.append(1)
        if len(calls) == fail_at:
            with open(path, "a") as f:
                f.write(text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)

    return append


def disk_full(assets: dict, root: Path, reference: tuple[dict, dict]) -> list[Result]:
    results = []
    cases = [("checkpoint", 2), ("checkpoint", 5), ("metrics", 3), ("metrics", 7)]
    for what, step in cases:
        out = root / f"full_{what}_{step}"
        cfg = run_config(assets, out)
        calls: list = []
        if what == "checkpoint":
            patch = Patched(torch, "save", full_disk_save(calls, step, torch.save))
        else:  # log + validation records per step: the n-th append is in step ceil(n / 2)
            patch = Patched(metrics_module, "_append", full_disk_append(calls, 2 * step - 1, metrics_module._append))
        with patch:
            err, _ = captured(lambda cfg=cfg: train(cfg))
        one_line = isinstance(err, RunStopped) and str(err).startswith("no space left on device writing ")
        clean = not any((out / "ckpt").glob(".*.tmp"))
        records = (out / "dspark_train_metrics.jsonl").read_text().splitlines()
        whole = all(json.loads(line) for line in records)
        captured(lambda cfg=cfg: train(resume(cfg)))
        same = identical(final_state(out), reference)
        ok = one_line and clean and whole and same
        results.append(
            (f"full disk in a {what} write at step {step}", ok, f"{str(err)[:90]}…; resumed identical={same}")
        )
    return results


def fill(folder: Path, room: int) -> Path:
    """A filler file that leaves about `room` bytes free on `folder`'s filesystem (removed to "free space")."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    filler = folder / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - room, 0) // 4096 * 4096)
    return filler


def real_disk_full(assets: dict, small_fs: Path, reference_dir: Path) -> list[Result]:
    """A real ENOSPC on a small filesystem: in a checkpoint write (room for about 2.5 checkpoints) and in a metrics
    append (checkpoints off, one page of room). One line, nothing half-written; after the filler is deleted the run
    resumes (to the uninterrupted run's weights and optimizer state, or, without checkpoints, from the start)."""
    folder, reference = step_folder(reference_dir, STEPS), final_state(reference_dir)
    assert folder is not None
    checkpoint_bytes = sum(p.stat().st_size for p in folder.iterdir())
    results = []
    for what, room, enabled in (("checkpoint", int(2.5 * checkpoint_bytes), True), ("metrics", 4096, False)):
        out = small_fs / f"real_full_{what}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = run_config(assets, out)
        cfg["checkpoint"]["enabled"] = enabled
        filler = fill(small_fs, room)
        try:
            err, _ = captured(lambda cfg=cfg: train(cfg))
        finally:
            filler.unlink()
        one_line = isinstance(err, RunStopped) and str(err).startswith("no space left on device writing ")
        records = (out / "dspark_train_metrics.jsonl").read_bytes()
        whole = records.endswith(b"\n") and all(json.loads(line) for line in records.splitlines())
        clean = not leftover_temps(out) and not leftover_temps(out / "ckpt")
        captured(lambda cfg=cfg: train(resume(cfg)))
        logged = [json.loads(line)["step"] for line in (out / "dspark_train_metrics.jsonl").read_text().splitlines()]
        finished = logged[-1] == STEPS and (not enabled or identical(final_state(out), reference))
        ok = one_line and whole and clean and finished
        detail = f"{str(err)[:80]}…; whole records={whole}; resumed to step {logged[-1]}, same state={finished}"
        results.append((f"real full disk in a {what} write", ok, detail))
        shutil.rmtree(out, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------------------------- torn files
def torn(assets: dict, root: Path, reference: tuple[dict, dict]) -> list[Result]:
    base = root / "torn_base"
    base_cfg = run_config(assets, base)
    captured(lambda: train(base_cfg, stop_after=4))
    results = []

    def damage_metrics(out: Path) -> None:
        with open(out / "dspark_train_metrics.jsonl", "a") as f:
            f.write('{"timestamp": 1.0, "step": 5, "loss": 1.')

    def truncate(name: str, fraction: float) -> Callable[[Path], None]:
        def cut(out: Path) -> None:
            path = out / "ckpt" / "epoch_0_step_4" / name
            with open(path, "r+b") as f:
                f.truncate(int(path.stat().st_size * fraction))

        return cut

    def flip_byte(out: Path) -> None:
        path = out / "ckpt" / "epoch_0_step_4" / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))

    cases = {
        "torn last metrics line": (damage_metrics, "cut off the incomplete record"),
        "model.safetensors cut to half": (truncate("model.safetensors", 0.5), "falling back"),
        "model.safetensors one byte flipped": (flip_byte, "falling back"),
        "optimizer.pt cut to 10%": (truncate("optimizer.pt", 0.1), "falling back"),
        "trainer_state.json cut to half": (truncate("trainer_state.json", 0.5), "falling back"),
    }
    for name, (damage, expected) in cases.items():
        out = root / ("torn_" + name.split()[0].replace(".", "_") + str(len(results)))
        shutil.copytree(base, out)
        cfg = {
            **base_cfg,
            "recipe_args": {**base_cfg["recipe_args"], "output_dir": str(out)},
            "checkpoint": {**base_cfg["checkpoint"], "checkpoint_dir": str(out / "ckpt")},
        }
        damage(out)
        err, log = captured(lambda cfg=cfg: train(resume(cfg)))
        same = not isinstance(err, Exception) and identical(final_state(out), reference)
        results.append((name, expected in log and same, f"warned={expected in log}; resumed identical={same}"))
    return results


# ------------------------------------------------------------------------------------------------------- divergence
def poison(recipe: TrainDSparkRecipe, bad_steps: set[int], factor: float = float("nan")) -> None:
    """Multiply the loss of `bad_steps` by `factor`: NaN, or a huge finite factor (a loss that explodes)."""
    forward = recipe.runner._forward_loss

    def patched(batch, *args, **kwargs):
        loss = forward(batch, *args, **kwargs)
        if recipe.step + 1 in bad_steps:
            loss.numerator = loss.numerator * factor
            loss.sums = {k: v * factor for k, v in loss.sums.items()}
        return loss

    recipe.runner._forward_loss = patched


def weights_finite(recipe: TrainDSparkRecipe) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in recipe.draft.parameters())


def skipped_and_counted(recipe: TrainDSparkRecipe, err: object) -> tuple[bool, str]:
    """The verdict of a run allowed to skip one bad step: finished, one step skipped, every weight finite."""
    finite = weights_finite(recipe)
    ok = err is None and recipe.skipped_steps == 1 and finite
    return ok, f"skipped and counted ({recipe.skipped_steps}), run finished, weights finite={finite}"


def divergence(assets: dict, root: Path, draft_dir: Path) -> list[Result]:
    results = []
    for step, allowed in ((3, 0), (6, 0), (2, 1)):
        out = root / f"nan_{step}_{allowed}"
        recipe = TrainDSparkRecipe(run_config(assets, out, max_skipped_steps=allowed, val_data_path=None))
        captured(recipe.setup)
        poison(recipe, {step})
        err, _ = captured(recipe.run_train_validation_loop)
        if allowed:
            ok, detail = skipped_and_counted(recipe, err)
        else:
            ok = isinstance(err, RunStopped) and str(err).startswith(f"step {step}: non-finite")
            ok = ok and weights_finite(recipe)
            ok = ok and f"epoch_0_step_{step - 2}" in str(err)  # step's loss came from step - 1's weights
            detail = f"{str(err)[:100]}…"
        results.append((f"NaN injected at step {step}, max_skipped_steps={allowed}", ok, detail))
    results += explosions(assets, root)
    cfg = run_config(assets, root / "lr", val_data_path=None)
    cfg["optimizer"]["lr"] = 1e30
    err, _ = captured(lambda: train(cfg))
    saved = [load_file(str(p / "model.safetensors")) for p in (root / "lr" / "ckpt").glob("epoch_*")]
    all_finite = all(bool(torch.isfinite(t).all()) for state in saved for t in state.values())
    ok = isinstance(err, RunStopped) and all_finite
    results.append(("optimizer.lr = 1e30", ok, f"{str(err)[:100]}…; {len(saved)} checkpoint(s), all finite"))
    nan_draft = root / "nan_draft"
    shutil.copytree(draft_dir, nan_draft)
    state = load_file(str(nan_draft / "model.safetensors"))
    first = sorted(state)[0]
    state[first] = state[first].clone().fill_(float("nan"))
    save_file(state, str(nan_draft / "model.safetensors"))
    rounds = root / "rounds.jsonl"
    rounds.write_text(json.dumps({"verify_len": 2, "num_accepted": 1, "confidence_logits": [0.0, 1.0]}) + "\n")
    tool_cases = {
        "evaluate a NaN draft": [
            "evaluate",
            "--target",
            str(assets["target"]),
            "--draft",
            str(nan_draft),
            "--data",
            str(assets["val"]),
            "--output",
            str(root / "r.json"),
        ],
        "calibrate a NaN draft": ["calibrate", "--draft", str(nan_draft), "--rounds", str(rounds)],
    }
    for name, argv in tool_cases.items():
        results.append(one_line_case(name, argv, "non-finite weights"))
    return results


def explosions(assets: dict, root: Path) -> list[Result]:
    """A finite loss multiplied by 8e11 after the guard's warm-up: stopped (or skipped and counted), never applied."""
    results, step = [], REFERENCE_STEPS + 2
    for allowed in (0, 1):
        out = root / f"explode_{allowed}"
        cfg = run_config(assets, out, max_steps=step + 2, max_skipped_steps=allowed, val_data_path=None)
        recipe = TrainDSparkRecipe(cfg)
        captured(recipe.setup)
        poison(recipe, {step}, factor=8e11)
        err, _ = captured(recipe.run_train_validation_loop)
        if allowed:
            ok, detail = skipped_and_counted(recipe, err)
        else:
            kept, _ = final_state(out, step - 1)
            unapplied = all(torch.equal(kept[k], v) for k, v in recipe.draft.state_dict().items() if k in kept)
            text = str(err)
            ok = isinstance(err, RunStopped) and text.startswith(f"step {step}: loss ") and unapplied
            ok = ok and "divergence_factor=100" in text and f"epoch_0_step_{step - 2}" in text
            good = out / "ckpt" / f"epoch_0_step_{step - 2}"  # as the line says: resume from the named checkpoint
            again = {**cfg, "checkpoint": {**cfg["checkpoint"], "restore_from": str(good)}}
            resumed, _ = captured(lambda again=again: train(again))
            aside = [p.name for p in out.glob("ckpt.after-step-*/epoch_*")]
            ok = ok and not isinstance(resumed, Exception) and aside == [f"epoch_0_step_{step - 1}"]
            detail = f"{text[:150]}…; resumed from the named checkpoint to the end, later checkpoints aside: {aside}"
        results.append((f"loss x 8e11 at step {step}, max_skipped_steps={allowed}", ok, detail))
    return results


# ------------------------------------------------------------------------------------------------------- bad inputs
def one_line_case(name: str, argv: list[str], expected: str) -> Result:
    code, text = captured(lambda: cli_main(argv))
    text = text.strip()
    ok = code == 2 and "\n" not in text and "Traceback" not in text and expected in text
    return name, ok, text[:140]


def bad_inputs(assets: dict, root: Path, draft_dir: Path) -> list[Result]:
    """Bad inputs to the tools (each one line, exit 2, before any work), then to training."""
    target, data = str(assets["target"]), str(assets["val"])
    other = root / "other_draft"
    shutil.copytree(draft_dir, other)
    config = json.loads((other / "config.json").read_text())
    config.update(vocab_size=128, hidden_size=48)
    (other / "config.json").write_text(json.dumps(config))
    bad_rows = {"null": "null", "number": "42", "token list": "[1, 2, 3]", "messages as a string": '{"messages": "w1"}'}
    evaluate = ["evaluate", "--target", target, "--draft", str(draft_dir), "--output", str(root / "e.json")]
    cases = [
        (
            "evaluate: draft for another target",
            [*evaluate[:3], "--draft", str(other), "--data", data, "--output", str(root / "e.json")],
            "was not trained for",
        ),
        (
            "evaluate: a plain model as --draft",
            [*evaluate[:3], "--draft", target, "--data", data, "--output", str(root / "e.json")],
            "missing DSpark key",
        ),
        ("evaluate: --output is a folder", [*evaluate[:5], "--data", data, "--output", str(root)], "is a directory"),
        (
            "evaluate: missing local --target",
            ["evaluate", "--target", "./no/target", *evaluate[3:5], "--data", data, "--output", str(root / "e.json")],
            "no such folder",
        ),
        ("evaluate: --num-prompts -1", [*evaluate, "--data", data, "--num-prompts", "-1"], "must be >= 1"),
        (
            "regenerate: --num-rows -1",
            ["regenerate", "--target", target, "--data", data, "--out", str(root / "g.jsonl"), "--num-rows", "-1"],
            "must be >= 1",
        ),
    ]
    for kind, line in bad_rows.items():
        path = root / f"rows_{kind.replace(' ', '_')}.jsonl"
        path.write_text(Path(data).read_text().splitlines()[0] + "\n" + line + "\n")
        cases.append((f"evaluate: prompt row that is {kind}", [*evaluate, "--data", str(path)], f"{path}:2:"))
    blocker = root / "a_file"
    blocker.write_text("a file where a folder is expected")
    cases.append(
        (
            "regenerate: --out under a file",
            ["regenerate", "--target", target, "--data", data, "--out", str(blocker / "g.jsonl")],
            "cannot write there",
        )
    )
    return [one_line_case(*case) for case in cases] + training_inputs(assets, root, blocker)


def training_inputs(assets: dict, root: Path, blocker: Path) -> list[Result]:
    """Bad training inputs, each refused at setup naming the key, before any metrics line is written."""
    target = str(assets["target"])
    results = []
    training = {
        "train: output_dir under a file": ({"output_dir": str(blocker / "run")}, "cannot write there"),
        "train: missing local target": ({"target_model_name_or_path": "./dspark_demo/nope"}, "no such folder"),
        "train: model folder as data": ({"train_data_path": target}, "a model folder"),
        "train: bad eval_decode path": (
            {"eval_decode": {"every_steps": 1, "data_path": str(root / "nope.jsonl")}},
            "no such file",
        ),
    }
    for name, (args, expected) in training.items():
        out = root / name.replace(" ", "_").replace(":", "")
        err, _ = captured(lambda out=out, args=args: TrainDSparkRecipe(run_config(assets, out, **args)).setup())
        ok = isinstance(err, ToolError) and expected in str(err) and not (out / "dspark_train_metrics.jsonl").exists()
        results.append((name, ok, str(err)[:140]))
    restore = run_config(assets, root / "restore_nothing", max_steps=1)
    restore["checkpoint"]["restore_from"] = str(root / "no_checkpoint")
    err, _ = captured(lambda: TrainDSparkRecipe(restore).setup())
    ok = isinstance(err, ToolError) and "is not a complete checkpoint" in str(err)
    results.append(("train: restore_from a folder that is no checkpoint", ok, str(err)[:140]))
    second = root / "second_run"
    captured(lambda: train(run_config(assets, second, max_steps=1, val_data_path=None)))
    before = sorted(p.name for p in (second / "ckpt").iterdir())
    err, _ = captured(lambda: TrainDSparkRecipe(run_config(assets, second, max_steps=1)).setup())
    kept = sorted(p.name for p in (second / "ckpt").iterdir()) == before
    ok = isinstance(err, ToolError) and "checkpoint.restore_from" in str(err) and kept
    results.append(("train: a second run into the same output_dir", ok, str(err)[:140]))
    return results
