"""`dspark demo`: the whole pipeline on a CPU in minutes, with nothing downloaded.

1. build (or reuse) the tiny Qwen3 target trained on the Python standard library (`dspark build-tiny-target`);
2. make chat prompts from disjoint train / held-out stdlib files and regenerate their answers with the target;
3. train a drafter with `examples/dspark/tiny_cpu_dspark.yaml` through the recipe under torchrun (2 processes, FSDP2);
4. report the final loss, the held-out teacher-forced τ and accept_rate@k, real speculative-decoding τ and speedup
   at temperature 0 and 1, and write a PNG of the training curves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nemo_automodel_dspark.io import atomic_path, atomic_write_json, atomic_write_text

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dspark" / "tiny_cpu_dspark.yaml"


@dataclass
class DemoOptions:
    workdir: Path
    train_rows: int = 400
    heldout_rows: int = 48
    max_new_tokens: int = 160
    nproc: int = 2
    epochs: int | None = None  # None: the YAML's
    decode_prompts: int = 16
    decode_tokens: int = 128
    extra_overrides: tuple[str, ...] = ()
    target_steps: int | None = None  # None: build-tiny-target's default
    run_name: str = "run"  # training output folder under workdir (compare variants side by side)


def _say(message: str) -> None:
    print(f"[dspark demo] {message}", flush=True)


def build_data(opts: DemoOptions, target: Path) -> tuple[Path, Path]:
    """Prompts from disjoint stdlib files, answered by the target itself (greedy, thinking off); a finished
    regeneration by the same target files is reused, anything else (a rebuilt target, other settings) redone."""
    from nemo_automodel_dspark.tools.regenerate import RegenerateConfig, is_up_to_date, regenerate
    from nemo_automodel_dspark.tools.tiny_target import stdlib_chat_rows

    outputs = []
    for split, n in (("train", opts.train_rows), ("held_out", opts.heldout_rows)):
        prompts = opts.workdir / f"{split}_prompts.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in stdlib_chat_rows(split, n, seed=0))
        if not prompts.is_file() or prompts.read_text() != text:
            atomic_write_text(prompts, text)
        out = opts.workdir / f"{split}_regen.jsonl"
        config = RegenerateConfig(
            data=str(prompts),
            out=str(out),
            target=str(target),
            batch_size=32,
            max_new_tokens=opts.max_new_tokens,
            shard_size=128,
            device="cpu",
            overwrite=True,
        )
        if is_up_to_date(config):
            _say(f"reusing {out} (same target, prompts and settings)")
        else:
            _say(f"regenerating {n} {split} answers with the target")
            regenerate(config)
        outputs.append(out)
    return outputs[0], outputs[1]


def user_overrides(opts: DemoOptions) -> list[str]:
    """What the user changes in the training run (`--epochs`, `--set`), as recipe overrides."""
    return [*([f"--recipe_args.num_epochs={opts.epochs}"] if opts.epochs else []), *opts.extra_overrides]


def check_overrides(opts: DemoOptions) -> None:
    """Parse the example YAML with the user's overrides before anything is built: a mistyped `--set` is one line
    now instead of after minutes of target building and regeneration."""
    from nemo_automodel_dspark.errors import ToolError
    from nemo_automodel_dspark.options import ConfigError
    from nemo_automodel_dspark.recipe.config import parse_config
    from nemo_automodel_dspark.recipe.config_file import load_config

    try:
        parse_config(load_config(["-c", str(EXAMPLE), *user_overrides(opts)]))
    except ConfigError as err:
        raise ToolError(f"--set: {err}") from err


def train(opts: DemoOptions, target: Path, mask_token_id: int, train_data: Path, heldout: Path) -> Path:
    """Run the recipe under torchrun exactly as a user would; returns the run's output directory."""
    from nemo_automodel_dspark.errors import ToolError

    run_dir = opts.workdir / opts.run_name
    overrides = [
        f"--recipe_args.target_model_name_or_path={target}",
        f"--recipe_args.train_data_path={train_data}",
        f"--recipe_args.val_data_path={heldout}",
        f"--recipe_args.output_dir={run_dir}",
        f"--recipe_args.mask_token_id={mask_token_id}",
        "--recipe_args.overwrite_output_dir=true",  # a rerun moves the previous demo run aside, never mixes with it
        *user_overrides(opts),
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={opts.nproc}",
        "-m",
        "nemo_automodel_dspark.train_dspark",
        "-c",
        str(EXAMPLE),
        *overrides,
    ]
    _say("training: " + " ".join(cmd[2:]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    status = subprocess.run(cmd, env=env).returncode
    if status != 0:  # the recipe's own one-line message (and torchrun's report) are already on the screen
        raise ToolError(f"training stopped with exit status {status} (its message is above); run folder {run_dir}")
    return run_dir


def final_checkpoint(run_dir: Path) -> Path:
    from nemo_automodel_dspark.recipe.checkpoint import find_latest

    latest = find_latest(run_dir / "checkpoints")
    if latest is None:
        raise RuntimeError(f"training wrote no checkpoint under {run_dir / 'checkpoints'}")
    return latest


def decode(opts: DemoOptions, target_dir: Path, draft_dir: Path, heldout: Path) -> dict[str, dict]:
    """Real speculative decoding on held-out prompts at temperature 0 and 1 (τ and speedup, one run each)."""
    import torch

    from nemo_automodel_dspark import DSparkDrafter
    from nemo_automodel_dspark.inference.evaluate import run_evaluation
    from nemo_automodel_dspark.inference.prompts import load_prompts
    from nemo_automodel_dspark.target.loading import load_target, load_tokenizer

    torch.set_num_threads(1)  # tiny models: more threads only spin on a shared 2-core machine
    target = load_target(str(target_dir), dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(str(target_dir))
    draft = DSparkDrafter.from_pretrained(draft_dir).eval()
    prompts = load_prompts(heldout, tokenizer, opts.decode_prompts)
    return {
        f"T={t:g}": run_evaluation(
            target, draft, tokenizer, prompts, temperature=t, max_new_tokens=opts.decode_tokens, seed=0
        ).report
        for t in (0.0, 1.0)
    }


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run_dir / "dspark_train_metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    return train_records, [r for r in records if "val/loss" in r]


def plot(train_records: list[dict], val_records: list[dict], path: Path) -> Path:
    """Training curves: loss terms, τ (train and held-out), accept_rate@k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train_records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("loss", "ce_loss", "l1_loss", "confidence_loss"):
        axes[0].plot(steps, [r.get(key) for r in train_records], label=key)
    axes[0].set_yscale("log")
    axes[0].set_title("loss terms")
    axes[1].plot(steps, [r.get("tau") for r in train_records], label="train τ (teacher-forced)")
    if val_records:
        axes[1].plot(
            [r["step"] for r in val_records],
            [r.get("val/tau") for r in val_records],
            "o-",
            label="held-out τ (teacher-forced)",
        )
    axes[1].set_title("τ: expected accepted tokens per verify step")
    k = 0
    while f"accept_rate@{k}" in train_records[-1]:
        axes[2].plot(steps, [r.get(f"accept_rate@{k}") for r in train_records], label=f"@{k}")
        k += 1
    axes[2].set_title("accept_rate@k")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def report(
    train_records: list[dict], val_records: list[dict], decoding: dict[str, dict], png: Path, seconds: float
) -> str:
    last, val = train_records[-1], (val_records[-1] if val_records else {})
    k_max = sum(1 for key in val if key.startswith("val/accept_rate@"))
    lines = [
        f"DSpark demo finished in {seconds / 60:.1f} min",
        f"  final train loss {last['loss']:.4f} (ce {last['ce_loss']:.3f}, l1 {last['l1_loss']:.3f}, "
        f"conf {last.get('confidence_loss', float('nan')):.3f}) after {last['step']} steps",
    ]
    if val:
        acc = ", ".join(f"{val[f'val/accept_rate@{k}']:.2f}" for k in range(k_max))
        lines.append(
            f"  held-out teacher-forced tau {val['val/tau']:.3f} (expected acceptance of sampling on the target's "
            f"greedy answers); accept_rate@0..{k_max - 1}: {acc}"
        )
    for name, rep in decoding.items():
        lines.append(
            f"  speculative decoding {name}: tau {rep['tau']:.3f} over {rep['rounds']} rounds, "
            f"{rep['speculative_tokens_per_s']:.1f} vs {rep['target_tokens_per_s']:.1f} tokens/s "
            f"(target alone) -> speedup {rep['speedup']:.2f}x"
            + (f", greedy identical: {rep['matches_target_greedy']}" if "matches_target_greedy" in rep else "")
        )
    lines.append(f"  training curves: {png}")
    return "\n".join(lines)


def run_demo(opts: DemoOptions) -> dict:
    """The whole pipeline; returns the numbers it printed (also written to WORKDIR/demo_report.json)."""
    from nemo_automodel_dspark.tools.tiny_target import DEFAULT_STEPS, build_tiny_target

    start = time.perf_counter()
    check_overrides(opts)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    build = build_tiny_target(opts.workdir / "target", seed=0, steps=opts.target_steps or DEFAULT_STEPS)
    _say(f"target: {build.path} ({'reused' if build.reused else 'built'})")
    train_data, heldout = build_data(opts, build.path)
    run_dir = train(opts, build.path, int(build.manifest["mask_token_id"]), train_data, heldout)
    draft_dir = final_checkpoint(run_dir)
    _say(f"decoding held-out prompts with {draft_dir}")
    decoding = decode(opts, build.path, draft_dir, heldout)
    train_records, val_records = read_metrics(run_dir)
    png = plot(train_records, val_records, run_dir / "dspark_demo_curves.png")
    seconds = time.perf_counter() - start
    text = report(train_records, val_records, decoding, png, seconds)
    print(text, flush=True)
    summary = {
        "seconds": seconds,
        "train": train_records[-1],
        "val": val_records[-1] if val_records else None,
        "decoding": decoding,
        "png": str(png),
        "draft": str(draft_dir),
    }
    atomic_write_json(run_dir / "demo_report.json", summary)
    return summary
