"""`dspark <command>`: one entry per subcommand in `COMMANDS`, each an argument builder and a runner.

Runners import their tool lazily, so `dspark --help` (and every other command) stays fast. To add a command,
write `_add_<name>(parser)` and `_run_<name>(args) -> int` and register them in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import NamedTuple


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- build-tiny-target -------------------------------------------------------------------------------------------


def _add_build_tiny_target(parser: argparse.ArgumentParser) -> None:
    from_default = "(default: %(default)s)"
    parser.add_argument("--out", required=True, help="directory to write the HF model + tokenizer to")
    parser.add_argument("--seed", type=int, default=0, help=f"training seed {from_default}")
    from nemo_automodel_dspark.tools.tiny_target import DEFAULT_STEPS

    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps {from_default}, about 3 min on 2 idle cores"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT holds a build with these settings")


def _run_build_tiny_target(args: argparse.Namespace) -> int:
    from nemo_automodel_dspark.errors import require_count
    from nemo_automodel_dspark.tools.tiny_target import build_tiny_target

    require_count(args.steps, "--steps")
    build = build_tiny_target(args.out, seed=args.seed, steps=args.steps, force=args.force)
    m = build.manifest
    print(
        f"[dspark] tiny target in {build.path}: {m['num_parameters'] / 1e6:.2f}M parameters, "
        f"train loss {m['initial_train_loss']:.3f} → {m['final_train_loss']:.3f}, held-out loss "
        f"{m['held_out_loss']:.3f}, mask_token_id={m['mask_token_id']}"
    )
    return 0


# ---- regenerate --------------------------------------------------------------------------------------------------


def _add_regenerate(parser: argparse.ArgumentParser) -> None:
    from nemo_automodel_dspark.inference.arguments import CHAT_TEMPLATE_HELP

    d = " (default: %(default)s)"
    parser.add_argument("--target", help="HF target model directory or id (local generation)")
    parser.add_argument("--data", required=True, help="input JSONL of chat rows (OpenAI messages or ShareGPT)")
    parser.add_argument("--out", required=True, help="output JSONL (shards go to OUT.shards/)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy" + d)
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass" + d)
    parser.add_argument("--max-new-tokens", type=int, default=256, help=d.strip())
    parser.add_argument("--batch-size", type=int, default=8, help="rows per generate() call" + d)
    parser.add_argument("--shard-size", type=int, default=64, help="input rows per shard file" + d)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed" + d)
    parser.add_argument("--num-rows", type=int, default=None, help="only the first N rows of --data")
    parser.add_argument("--enable-thinking", action="store_true", help="let thinking templates think")
    parser.add_argument("--chat-template", default=None, help=CHAT_TEMPLATE_HELP)
    parser.add_argument("--resume", action="store_true", help="continue after the last complete shard")
    parser.add_argument("--overwrite", action="store_true", help="discard the shards of a previous run")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N" + d)
    server = parser.add_argument_group("OpenAI-compatible server (instead of local generation)")
    server.add_argument("--server", help="base URL, e.g. http://localhost:8000")
    server.add_argument("--model", help="model name the server serves")
    server.add_argument("--concurrency", type=int, default=8, help="requests in flight" + d)
    server.add_argument("--max-retries", type=int, default=4, help="retries per row" + d)
    server.add_argument("--retry-backoff-s", type=float, default=1.0, help="first back-off, doubled each retry" + d)
    server.add_argument("--request-timeout-s", type=float, default=600.0, help=d.strip())


def _run_regenerate(args: argparse.Namespace) -> int:
    from nemo_automodel_dspark.errors import ToolError
    from nemo_automodel_dspark.tools.regenerate import config_from_args, regenerate

    summary = regenerate(config_from_args(args))
    if summary.rows_out == 0:
        raise ToolError("no usable row was regenerated")
    return 0


# ---- demo --------------------------------------------------------------------------------------------------------


def _add_demo(parser: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    parser.add_argument("--workdir", default="./dspark_demo", help="where the target, data and run go" + d)
    from nemo_automodel_dspark.demo import DemoOptions

    rows = {f.name: f.default for f in dataclasses.fields(DemoOptions)}
    parser.add_argument("--train-rows", type=int, default=rows["train_rows"], help="training prompts to regenerate" + d)
    parser.add_argument(
        "--heldout-rows", type=int, default=rows["heldout_rows"], help="held-out prompts to regenerate" + d
    )
    parser.add_argument("--nproc", type=int, default=2, help="training processes (torchrun, FSDP2)" + d)
    parser.add_argument("--epochs", type=int, default=None, help="override the YAML's num_epochs")
    parser.add_argument("--run-name", default="run", help="training output folder under --workdir" + d)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="recipe override for the training run, e.g. --set recipe_args.markov_rank=0",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nemo_automodel_dspark.demo import DemoOptions, run_demo
    from nemo_automodel_dspark.errors import require_count, require_output_dir

    for value, flag in ((args.train_rows, "--train-rows"), (args.heldout_rows, "--heldout-rows")):
        require_count(value, flag)  # before the target is built (minutes), not after
    require_count(args.nproc, "--nproc")
    require_count(args.epochs, "--epochs")
    require_output_dir(args.workdir, "--workdir")
    opts = DemoOptions(
        workdir=Path(args.workdir),
        nproc=args.nproc,
        epochs=args.epochs,
        extra_overrides=tuple(f"--{item}" for item in args.set),
        run_name=args.run_name,
        train_rows=args.train_rows,
        heldout_rows=args.heldout_rows,
    )
    run_demo(opts)
    return 0


# ---- evaluate / calibrate / schedule -----------------------------------------------------------------------------


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    from nemo_automodel_dspark.inference.arguments import add_evaluate_arguments

    add_evaluate_arguments(parser)


def _run_evaluate(args: argparse.Namespace) -> int:
    from nemo_automodel_dspark.inference.evaluate import run

    return run(args)


def _add_calibrate(parser: argparse.ArgumentParser) -> None:
    from nemo_automodel_dspark.inference.arguments import add_calibrate_arguments

    add_calibrate_arguments(parser)


def _run_calibrate(args: argparse.Namespace) -> int:
    from nemo_automodel_dspark.inference.calibration import run

    return run(args)


def _add_schedule(parser: argparse.ArgumentParser) -> None:
    from nemo_automodel_dspark.inference.arguments import add_schedule_arguments

    add_schedule_arguments(parser)


def _run_schedule(args: argparse.Namespace) -> int:
    from nemo_automodel_dspark.inference.scheduler import run

    return run(args)


# ---- export ------------------------------------------------------------------------------------------------------


def _add_export(parser: argparse.ArgumentParser) -> None:
    from nemo_automodel_dspark.export.dialects import FORMATS

    parser.add_argument(
        "checkpoint", metavar="CKPT", help="saved draft folder (ours or NeMo AutoModel's, any sharding)"
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="the engine whose checkpoint dialect to write")
    parser.add_argument("--out", required=True, help="folder to write config.json + model.safetensors to")


def _run_export(args: argparse.Namespace) -> int:
    from nemo_automodel_dspark.draft_checks import require_finite_draft
    from nemo_automodel_dspark.errors import require_draft_dir, require_output_dir
    from nemo_automodel_dspark.export.dialects import export_draft

    require_draft_dir(args.checkpoint, "CKPT")
    require_output_dir(args.out, "--out")
    require_finite_draft(args.checkpoint, "CKPT")  # a diverged draft is never exported
    out = export_draft(args.checkpoint, args.format, args.out)
    print(f"[dspark] {args.format} draft written to {out}")
    return 0


# ---- plan -------------------------------------------------------------------------------------------------------


def _add_plan(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="recipe YAML")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the run (ranks)")
    parser.add_argument("--gpu-memory", default="80GiB", help="per GPU: 80GiB, 141GB, ... (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.epilog = "Overrides as in training follow the flags: --recipe_args.num_anchors=256 ..."


def _run_plan(args: argparse.Namespace) -> int:
    from nemo_automodel_dspark.recipe.plan import run_plan_command

    return run_plan_command(args)


COMMANDS: dict[str, Command] = {
    "plan": Command(
        "per-GPU memory of a training run from the target's config.json: does it fit, and what to change",
        _add_plan,
        _run_plan,
    ),
    "build-tiny-target": Command(
        "train a tiny Qwen3 target + tokenizer on the Python stdlib", _add_build_tiny_target, _run_build_tiny_target
    ),
    "regenerate": Command(
        "rewrite final assistant turns with the target's own responses", _add_regenerate, _run_regenerate
    ),
    "demo": Command("tiny target → regenerated data → 2-process training → tau, speedup, curves", _add_demo, _run_demo),
    "evaluate": Command(
        "speculative decoding with a draft: tau, speedup over the target alone, confidence ECE/AUROC",
        _add_evaluate,
        _run_evaluate,
    ),
    "calibrate": Command(
        "fit Sequential Temperature Scaling on evaluate rounds; writes confidence_temperatures",
        _add_calibrate,
        _run_calibrate,
    ),
    "export": Command(
        "write a saved draft in the checkpoint dialect of vLLM, SGLang, SpecForge, speculators or Model-Optimizer",
        _add_export,
        _run_export,
    ),
    "schedule": Command(
        "simulate the confidence scheduler (Algorithm 1) on evaluate rounds and an SPS table",
        _add_schedule,
        _run_schedule,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description="DSpark drafter tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nemo_automodel_dspark.errors import ToolError, report_user_error

    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.command != "plan":
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides = overrides
    try:
        return COMMANDS[args.command].run(args)
    except ToolError as err:
        return report_user_error(args.command, err)


if __name__ == "__main__":
    sys.exit(main())
