"""Command-line flags of `dspark evaluate | calibrate | schedule`, importable without torch (fast `dspark --help`).

The runners live beside the tools: `inference.evaluate.run`, `inference.calibration.run`, `inference.scheduler.run`.
"""

from __future__ import annotations

import argparse

DEFAULT_BINS = 10  # equal-width ECE bins
CHAT_TEMPLATE_HELP = (
    "chat template the prompts are rendered with, as recipe_args.chat_template: inline Jinja, a template name or a "
    ".jinja file (default: the tokenizer's own; use the value you trained with)"
)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    parser.add_argument("--target", required=True, help="HF target model directory")
    parser.add_argument("--draft", required=True, help="trained draft directory (config.json + model.safetensors)")
    parser.add_argument("--data", required=True, help="JSONL of chat rows (`messages`, optional `category`)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy" + d)
    parser.add_argument("--max-new-tokens", type=int, default=256, help=d.strip())
    parser.add_argument("--output", required=True, help="report JSON path")
    parser.add_argument("--save-generations", default=None, help="JSONL: prompt_index, token_ids, accepted")
    parser.add_argument("--save-rounds", default=None, help="JSONL of rounds for `dspark calibrate` / `schedule`")
    parser.add_argument("--num-prompts", type=int, default=None, help="only the first M rows of --data")
    parser.add_argument("--chat-template", default=None, help=CHAT_TEMPLATE_HELP)
    parser.add_argument("--verify-len", type=int, default=None, help="draft tokens verified per round (default: K)")
    parser.add_argument("--seed", type=int, default=0, help=d.strip())
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--no-speed", action="store_true", help="skip target-only decoding (no speedup)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="auto = bfloat16 on CUDA, float32 on CPU; float32 makes greedy bitwise comparable",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (tiny models: 1 is often fastest)")


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", required=True, help="draft directory whose config.json receives the temperatures")
    parser.add_argument("--rounds", required=True, help="held-out rounds from `dspark evaluate --save-rounds`")
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS, help="ECE bins (default: %(default)s)")


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--confidences", required=True, help="rounds JSONL from `dspark evaluate --save-rounds`")
    parser.add_argument("--sps", required=True, help='JSON {"batch size": steps/s} profiled on the serving engine')
    parser.add_argument(
        "--concurrency",
        default=None,
        help="comma-separated R levels (default: powers of two up to the largest profiled size)",
    )
    parser.add_argument("--draft", default=None, help="apply this draft's confidence_temperatures (STS) first")
    parser.add_argument("--batches", type=int, default=200, help="simulated batches per R (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the per-R results as JSON here")
