"""`dspark plan` for the five large targets of issue 14, as one Markdown table (config.json only, no weights).

Each target's published `config.json` values (tests/_helpers/large_targets.py) are written to a folder and
`dspark plan -c YAML --gpus N --gpu-memory 80GiB --json --recipe_args.target_model_name_or_path=DIR` runs on it,
replicated and sharded. The YAML's run settings apply (default: examples/dspark/qwen3_0.6b_dspark.yaml —
micro-batch 1, seq 4096, 512 anchors, block 7, 5 draft layers, FSDP2, 8 accumulation steps).

    python benchmarks/plan_table.py
    python benchmarks/plan_table.py --gpus 16 --targets Qwen3-235B-A22B

The `logits` term is the recipe's fused objective (`"objective": "fused"` in each plan; printed in the header).
Gemma4-31B's config values are reconstructed, not downloaded (see tests/_helpers/large_targets.py).
Ends with one JSON line: per target, the per-GPU GiB replicated and sharded and what `auto` picks.
"""

# ruff: noqa: E402  (tests/ joins sys.path before the shared helpers import)
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _helpers.large_targets import LARGE_TARGETS, write_target_config

from nemo_automodel_dspark.cli import main as dspark


def plan(yaml: str, folder: Path, gpus: int, memory: str, sharding: str) -> dict:
    argv = ["plan", "-c", yaml, "--gpus", str(gpus), "--gpu-memory", memory, "--json"]
    argv += [f"--recipe_args.target_model_name_or_path={folder}"]
    argv += [f"--recipe_args.shard_dense_target={sharding}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # default layer ids end at the last layer: a serving warning, not ours here
        assert dspark(argv) == 0
    return json.loads(out.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "examples/dspark/qwen3_0.6b_dspark.yaml"))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-memory", default="80GiB")
    parser.add_argument("--targets", nargs="*", default=list(LARGE_TARGETS))
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        import yaml

        raw = yaml.safe_load(Path(args.config).read_text())
        raw["recipe_args"].pop("target_layer_ids", None)  # each target's default spread, not the 0.6B's ids
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(raw))
        for name in args.targets:
            folder = write_target_config(name, Path(tmp))
            rep = plan(str(config), folder, args.gpus, args.gpu_memory, "false")
            shd = plan(str(config), folder, args.gpus, args.gpu_memory, "true")
            auto = plan(str(config), folder, args.gpus, args.gpu_memory, "auto")
            rows[name] = (rep, shd, auto)
    objective = {p["objective"] for row in rows.values() for p in row}
    print(f"{args.gpus} GPUs x {args.gpu_memory}; per-GPU GiB; objective: {', '.join(sorted(objective))}")
    print(
        "| target | target weights replicated / sharded | draft state | activations + logits | replicated total ",
        end="",
    )
    print("| sharded total | `auto` |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for name, (rep, shd, auto) in rows.items():
        t = rep["terms"]
        draft = sum(t[k] for k in ("draft_params", "draft_grads", "optimizer_state", "frozen_embed_lm_head"))
        draft += t["draft_unsharded_params"]
        verdict = lambda p: f"{p['per_gpu_gib']:.1f}" + ("" if p["fits"] else " (does not fit)")  # noqa: E731
        print(
            f"| {name} | {t['target_weights']:.1f} / {shd['terms']['target_weights']:.1f} | {draft:.1f} | "
            f"{t['activations'] + t['logits']:.1f} | {verdict(rep)} | {verdict(shd)} | "
            f"{'sharded' if auto['target_sharded'] else 'replicated'} |"
        )
        summary[name] = {
            "replicated_gib": rep["per_gpu_gib"],
            "sharded_gib": shd["per_gpu_gib"],
            "auto_sharded": auto["target_sharded"],
        }
    figures = {"gpus": args.gpus, "gpu_memory": args.gpu_memory, "objective": sorted(objective), "targets": summary}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
