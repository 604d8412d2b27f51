"""Reruns the failure classes of issue 12 on a tiny local target and counts how each one ends.

Classes: SIGKILLs during training and checkpoint writes, each resumed with `restore_from: LATEST` (the final weights
and optimizer state must be bit-identical to an uninterrupted run); a full disk, simulated by making a checkpoint
or metrics write fail with ENOSPC (one line, nothing half-written, resumable to the same weights); torn and damaged
files (metrics line, weights, optimizer state, trainer state) and a kill inside `save_draft`; divergence (a NaN or
an exploding finite loss injected into a step, an absurd learning rate, a NaN draft given to the tools); bad inputs
to training and to the tools (each one line, no traceback). The kills hit a 2-process FSDP2 run, as in the issue.

    python benchmarks/reliability.py              # ~5 min on 2 busy CPU cores
    python benchmarks/reliability.py --kills 20 --nproc 1

A real full disk as well (not a simulated ENOSPC): give a folder on a small filesystem, e.g. as root
`mkdir -p /tmp/small && mount -t tmpfs -o size=4M tmpfs /tmp/small`, then `--small-fs /tmp/small`.

Prints one line per case and ends with one JSON line: per class, cases tried and cases handled.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny target / data builders the tests use

from _helpers.recipe_assets import base_config, build_target_dir, write_config, write_rows  # noqa: E402

from nemo_automodel_dspark.cli import main as cli_main  # noqa: E402
from nemo_automodel_dspark.errors import ToolError  # noqa: E402
from nemo_automodel_dspark.io import leftover_temps  # noqa: E402
from nemo_automodel_dspark.recipe import metrics as metrics_module  # noqa: E402
from nemo_automodel_dspark.recipe.guards import REFERENCE_STEPS, RunStopped  # noqa: E402
from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
STEPS = 8
KILL_STEPS = 30  # a longer run (several epochs) for the kills, so that they land in training and checkpoint writes
TRAIN_ROWS, MICRO_BATCH = 24, 2  # `build_assets` and `base_config`


def kill_args(nproc: int) -> dict:
    """30 steps over as many epochs as `nproc` ranks need (each step takes nproc x MICRO_BATCH rows)."""
    per_epoch = TRAIN_ROWS // (nproc * MICRO_BATCH)
    return {"max_steps": KILL_STEPS, "num_epochs": -(-KILL_STEPS // per_epoch)}


Result = tuple[str, bool, str]  # (case, handled, what happened)


# ------------------------------------------------------------------------------------------------------- helpers
def run_config(assets: dict, out: Path, **args) -> dict:
    defaults = dict(max_steps=STEPS, ckpt_every_steps=1, val_data_path=str(assets["val"]), val_every_steps=1)
    merged = {**defaults, **args}
    if merged["val_data_path"] is None:
        merged["val_every_steps"] = None
    return base_config(assets, out, **merged)


def train(cfg: dict, stop_after: int | None = None) -> TrainDSparkRecipe:
    recipe = TrainDSparkRecipe(cfg)
    recipe.setup()
    if stop_after is not None:
        recipe.total_steps = stop_after  # stop early inside the same schedule
    recipe.run_train_validation_loop()
    return recipe


def resume(cfg: dict) -> dict:
    return {**cfg, "checkpoint": {**cfg["checkpoint"], "restore_from": "LATEST"}}


def step_folder(out: Path, step: int) -> Path | None:
    return next((out / "ckpt").glob(f"epoch_*_step_{step}"), None)


def final_state(out: Path, step: int = STEPS) -> tuple[dict, dict]:
    folder = step_folder(out, step)
    assert folder is not None, f"{out}: no checkpoint of step {step}"
    return load_file(str(folder / "model.safetensors")), torch.load(folder / "optimizer.pt", weights_only=True)


def identical(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    (wa, oa), (wb, ob) = a, b
    same_weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    same_optim = all(
        torch.equal(v, ob["state"][p][k]) if isinstance(v, torch.Tensor) else v == ob["state"][p][k]
        for p, state in oa["state"].items()
        for k, v in state.items()
    )
    return same_weights and same_optim


def captured(fn: Callable) -> tuple[object, str]:
    """Run `fn` with stdout/stderr captured; returns (result or the exception, the text)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            result = fn()
        except (ToolError, RunStopped, ValueError) as err:
            result = err
    return result, out.getvalue()


class Patched:
    """Replace `obj.name` with `value` inside a with-block."""

    def __init__(self, obj, name: str, value) -> None:
        self.obj, self.name, self.value = obj, name, value

    def __enter__(self):
        self.old = getattr(self.obj, self.name)
        setattr(self.obj, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.obj, self.name, self.old)


# ------------------------------------------------------------------------------------------------------- kills
def launch(cmd: list[str], cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*cmd, "-c", str(cfg_path)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for_new_record(proc: subprocess.Popen, metrics: Path) -> None:
    """Block until this launch appends a metrics record (it is training) or exits; returns the time it did."""
    seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) <= seen):
        time.sleep(0.01)


def kills(assets: dict, root: Path, count: int, nproc: int, seed: int) -> list[Result]:
    """SIGKILL a training job `count` times (at random moments after training started, and every other time inside
    a checkpoint write); resume with LATEST each time; the final state must equal an uninterrupted run's."""
    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "nemo_automodel_dspark.train_dspark"]
    args = kill_args(nproc)
    ref = launch(cmd, write_config(run_config(assets, root / "kill_ref", **args), root / "kill_ref.yaml"))
    wait_for_new_record(ref, root / "kill_ref" / "dspark_train_metrics.jsonl")
    first = time.perf_counter()
    while ref.poll() is None and step_folder(root / "kill_ref", KILL_STEPS) is None:
        time.sleep(0.01)
    train_s = time.perf_counter() - first  # from a launch's first record to its last checkpoint
    ref.wait()
    reference = final_state(root / "kill_ref", KILL_STEPS)
    out = root / "killed"
    cfg_path = write_config(resume(run_config(assets, out, **args)), root / "killed.yaml")
    results, during_write = [], 0
    for i in range(count):
        proc = launch(cmd, cfg_path)
        wait_for_new_record(proc, out / "dspark_train_metrics.jsonl")
        if i % 2:  # every other kill waits for a checkpoint write to begin and lands inside it
            while proc.poll() is None and not any((out / "ckpt").glob(".epoch_*_step_*.tmp")):
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, train_s / (count + 1)))  # later launches resume nearer the end: aim early
        with contextlib.suppress(ProcessLookupError):  # it may have exited this instant
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if step_folder(out, KILL_STEPS) is not None:
            break  # the run completed before this kill landed: not a kill
        in_write = any((out / "ckpt").glob(".epoch_*_step_*.tmp"))
        during_write += in_write
        results.append((f"kill {i + 1}", True, "during a checkpoint write" if in_write else "during training"))
    subprocess.run([*cmd, "-c", str(cfg_path)], env=ENV, check=True, capture_output=True)
    same = identical(final_state(out, KILL_STEPS), reference)
    left = leftover_temps(out) + leftover_temps(out / "ckpt")
    case = f"resume after {len(results)} kills ({during_write} during checkpoint writes), {nproc} process(es)"
    detail = ("bit-identical weights and optimizer state" if same else "DIFFERENT") + f"; temps left: {len(left)}"
    results.append((case, same and not left, detail))
    return results


KILL_INSIDE_SAVE_DRAFT = """
import os, signal, sys
from nemo_automodel_dspark.model import serving
from safetensors.torch import load_file

def half_then_kill(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"half of the weights")
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

serving.save_file = half_then_kill
serving.save_draft(None, sys.argv[1], state_dict=load_file(os.path.join(sys.argv[1], "model.safetensors")))
"""


def kill_inside_save_draft(root: Path, draft_dir: Path) -> Result:
    """SIGKILL in the middle of `save_draft` into a draft folder: the draft there stays whole, and the next save
    into that folder (here an export) removes the temp the kill left."""
    from nemo_automodel_dspark.export.dialects import export_draft
    from nemo_automodel_dspark.model.serving import read_weights

    folder = root / "killed_save"
    shutil.copytree(draft_dir, folder)
    before = read_weights(folder)
    code = subprocess.run([sys.executable, "-c", KILL_INSIDE_SAVE_DRAFT, str(folder)], env=ENV).returncode
    left = [p.name for p in leftover_temps(folder)]
    whole = all(torch.equal(before[k], v) for k, v in read_weights(folder).items())
    export_draft(draft_dir, "nemo", folder.with_name("unused_export"))  # an unrelated export leaves it alone
    captured(lambda: export_draft(draft_dir, "nemo", folder))  # the next writer of the folder
    cleaned = not leftover_temps(folder) and sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in draft_dir.iterdir()
    )
    ok = code == -signal.SIGKILL and len(left) == 1 and whole and cleaned
    return "kill inside save_draft", ok, f"left {left}; earlier draft whole={whole}; removed by the next save={cleaned}"


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


def divergence(assets: dict, root: Path, draft_dir: Path) -> list[Result]:
    results = []
    for step, allowed in ((3, 0), (6, 0), (2, 1)):
        out = root / f"nan_{step}_{allowed}"
        recipe = TrainDSparkRecipe(run_config(assets, out, max_skipped_steps=allowed, val_data_path=None))
        captured(recipe.setup)
        poison(recipe, {step})
        err, _ = captured(recipe.run_train_validation_loop)
        finite = all(bool(torch.isfinite(p).all()) for p in recipe.draft.parameters())
        if allowed:
            ok = err is None and recipe.skipped_steps == 1 and finite
            detail = f"skipped and counted ({recipe.skipped_steps}), run finished, weights finite={finite}"
        else:
            ok = isinstance(err, RunStopped) and str(err).startswith(f"step {step}: non-finite") and finite
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
        finite = all(bool(torch.isfinite(p).all()) for p in recipe.draft.parameters())
        if allowed:
            ok = err is None and recipe.skipped_steps == 1 and finite
            detail = f"skipped and counted ({recipe.skipped_steps}), run finished, weights finite={finite}"
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
    results = [one_line_case(*case) for case in cases]
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


# ------------------------------------------------------------------------------------------------------- main
def build_assets(root: Path) -> dict:
    return {
        "target": build_target_dir(root / "target"),
        "train": write_rows(root / "train.jsonl", TRAIN_ROWS),
        "val": write_rows(root / "val.jsonl", 24, seed=1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs of the training job (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes under torchrun (default: 2, FSDP2)")
    parser.add_argument("--seed", type=int, default=0, help="kill timing seed")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--small-fs", default=None, help="a folder on a small filesystem: also a real full disk")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dspark_reliability_"))
    root.mkdir(parents=True, exist_ok=True)
    assets = build_assets(root)
    ref_cfg = run_config(assets, root / "reference")
    captured(lambda: train(ref_cfg))
    reference = final_state(root / "reference")
    draft_dir = root / "reference" / "ckpt" / f"epoch_0_step_{STEPS}"
    classes = {
        "kills": lambda: [
            *kills(assets, root, args.kills, args.nproc, args.seed),
            kill_inside_save_draft(root, draft_dir),
        ],
        "disk_full": lambda: [
            *disk_full(assets, root, reference),
            *(real_disk_full(assets, Path(args.small_fs), root / "reference") if args.small_fs else []),
        ],
        "torn_files": lambda: torn(assets, root, reference),
        "divergence": lambda: divergence(assets, root, draft_dir),
        "bad_inputs": lambda: bad_inputs(assets, root, draft_dir),
    }
    summary = {}
    for name, run in classes.items():
        start = time.perf_counter()
        results = run()
        handled = sum(ok for _, ok, _ in results)
        print(f"== {name}: {handled}/{len(results)} handled ({time.perf_counter() - start:.0f} s)")
        for case, ok, detail in results:
            print(f"   [{'ok' if ok else 'FAIL'}] {case}: {detail}")
        summary[name] = {"tried": len(results), "handled": handled}
    summary["all_handled"] = all(v["tried"] == v["handled"] for v in summary.values())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
