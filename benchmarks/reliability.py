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
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny target / data builders the tests use

from _helpers.recipe_assets import base_config, build_target_dir, write_config, write_rows  # noqa: E402

from nemo_automodel_dspark.errors import ToolError  # noqa: E402
from nemo_automodel_dspark.io import leftover_temps  # noqa: E402
from nemo_automodel_dspark.recipe.guards import RunStopped  # noqa: E402
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


# ------------------------------------------------------------------------------------------------------- main
def build_assets(root: Path) -> dict:
    return {
        "target": build_target_dir(root / "target"),
        "train": write_rows(root / "train.jsonl", TRAIN_ROWS),
        "val": write_rows(root / "val.jsonl", 24, seed=1),
    }


def main() -> None:
    from reliability_cases import bad_inputs, disk_full, divergence, real_disk_full, torn  # imports this module

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
