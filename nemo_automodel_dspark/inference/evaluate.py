"""`dspark evaluate`: real speculative decoding with a trained draft — acceptance length τ, wall-clock speedup over
target-only decoding measured in the same run on the same prompts, and confidence-head calibration.

τ is the mean over rounds of the verified accepted length (accepted draft tokens + 1); the first token of every
prompt comes from the target's prefill and belongs to no round. A final round may be verified past EOS or
`max_new_tokens`; its tokens are cut from the output but its acceptance is what the target decided.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nemo_automodel_dspark.inference.arguments import add_evaluate_arguments
from nemo_automodel_dspark.inference.calibration import RoundsTable, confidence_report
from nemo_automodel_dspark.inference.prompts import Prompt, load_prompts, to_prompt
from nemo_automodel_dspark.inference.speculative import SpeculativeDecoder, eos_token_ids, target_decode

if TYPE_CHECKING:
    from nemo_automodel_dspark.model.drafter import DSparkDrafter

WARMUP_TOKENS = 8


@dataclass
class EvalRun:
    report: dict  # what report.json holds
    generations: list[dict]  # one row per prompt: prompt_index, token_ids, accepted
    rounds: list[dict]  # one row per round: prompt_index, round, verify_len, num_accepted, confidence_logits


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def run_evaluation(
    target: nn.Module,
    draft: DSparkDrafter,
    tokenizer: Any,
    prompts: list,
    *,
    temperature: float = 0.0,
    max_new_tokens: int = 128,
    verify_len: int | None = None,
    seed: int = 0,
    measure_speed: bool = True,
    chat_template: str | None = None,
) -> EvalRun:
    """Decode every prompt speculatively (and, with `measure_speed`, with the target alone) → report + records.

    The in-process entry (the recipe's `eval_decode`, the demo; `.report` is what report.json holds). `prompts` are
    chat rows (dicts with `messages` and an optional `category`, rendered with `chat_template` as training renders
    them), `Prompt`s or token-id lists. Uses only its own
    seeded generators and restores the draft's train/eval mode, so a training run that calls it
    keeps its trajectory.
    """
    items = [to_prompt(tokenizer, p, chat_template) for p in prompts]
    if not items:
        raise ValueError("evaluate needs at least one prompt")
    was_training = draft.training
    draft.eval()
    try:
        decoder = SpeculativeDecoder(target, draft, temperature=temperature, verify_len=verify_len)
        if measure_speed:  # first calls pay one-off costs (allocator, kernels); keep them out of both timings
            _decode_pair(decoder, items[0], min(max_new_tokens, WARMUP_TOKENS), seed, measure_speed)
        runs = [_decode_pair(decoder, p, max_new_tokens, seed + i, measure_speed) for i, p in enumerate(items)]
    finally:
        draft.train(was_training)
    generations, rounds = _records(items, runs)
    report = {
        "num_prompts": len(items),
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "block_size": draft.dspark.block_size,
        "verify_len": decoder.verify_len,
        "seed": seed,
        "markov_head": draft.dspark.markov_head_type if draft.dspark.markov_rank else None,
        **_decode_metrics(runs, rounds, draft.dspark.block_size),
        "categories": _by_category(items, runs, rounds, draft.dspark.block_size),
        "confidence": _confidence(rounds, draft.dspark.confidence_temperatures),
    }
    # Lossless check for free: greedy outputs must be identical (in fp32; bf16 verify-vs-step rounding can flip ties).
    if measure_speed and temperature <= 0:
        report["matches_target_greedy"] = all(r["spec_ids"] == r["target_ids"] for r in runs)
    return EvalRun(report, generations, rounds)


def _decode_pair(
    decoder: SpeculativeDecoder, prompt: Prompt, max_new_tokens: int, seed: int, measure_speed: bool
) -> dict:
    device = decoder.device
    run: dict[str, Any] = {"target_ids": None, "target_s": None}
    if measure_speed:
        run["target_ids"], run["target_s"] = _timed(
            lambda: target_decode(
                decoder.target,
                prompt.ids,
                max_new_tokens=max_new_tokens,
                temperature=decoder.temperature,
                generator=_generator(device, seed),
                eos=decoder.eos,
            ),
            device,
        )
    state, run["spec_s"] = _timed(
        lambda: decoder.generate(prompt.ids, max_new_tokens, _generator(device, seed)), device
    )
    run["spec_ids"], run["rounds"] = state.generated, state.rounds
    return run


def _records(items: list[Prompt], runs: list[dict]) -> tuple[list[dict], list[dict]]:
    generations, rounds = [], []
    for i, (item, run) in enumerate(zip(items, runs, strict=True)):
        extra = {} if item.category is None else {"category": item.category}
        generations.append(
            {
                "prompt_index": i,
                "token_ids": run["spec_ids"],
                "accepted": [r.accept_length for r in run["rounds"]],
                **extra,
            }
        )
        rounds += [
            {
                "prompt_index": i,
                "round": j,
                **extra,
                "verify_len": r.verify_len,
                "num_accepted": r.num_accepted,
                "confidence_logits": r.confidence_logits,
            }
            for j, r in enumerate(run["rounds"])
        ]
    return generations, rounds


def _decode_metrics(runs: list[dict], rounds: list[dict], block_size: int) -> dict:
    """τ, per-position conditional acceptance, and tokens/s of both decoders on the same prompts."""
    reached, accepted = [0] * block_size, [0] * block_size
    for r in rounds:
        for k in range(min(r["num_accepted"] + 1, r["verify_len"])):
            reached[k] += 1
            accepted[k] += int(k < r["num_accepted"])
    spec_tokens = sum(len(r["spec_ids"]) for r in runs)
    metrics = {
        "tau": sum(r["num_accepted"] + 1 for r in rounds) / len(rounds) if rounds else None,
        "rounds": len(rounds),
        "generated_tokens": spec_tokens,
        "acceptance_per_position": [a / n if n else None for a, n in zip(accepted, reached, strict=True)],
        "reached_per_position": reached,
        "speculative_tokens_per_s": spec_tokens / max(sum(r["spec_s"] for r in runs), 1e-9),
        "target_tokens_per_s": None,
        "speedup": None,
    }
    if all(r["target_s"] is not None for r in runs):
        target_tokens = sum(len(r["target_ids"]) for r in runs)
        metrics["target_tokens_per_s"] = target_tokens / max(sum(r["target_s"] for r in runs), 1e-9)
        metrics["speedup"] = metrics["speculative_tokens_per_s"] / metrics["target_tokens_per_s"]
    return metrics


def _by_category(items: list[Prompt], runs: list[dict], rounds: list[dict], block_size: int) -> dict:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        if item.category is not None:
            groups[item.category].append(i)
    out = {}
    for name, members in sorted(groups.items()):
        keep = set(members)
        metrics = _decode_metrics(
            [runs[i] for i in members], [r for r in rounds if r["prompt_index"] in keep], block_size
        )
        out[name] = {"num_prompts": len(members), **metrics}
    return out


def _confidence(rounds: list[dict], temperatures: list[float] | None) -> dict | None:
    if not any(r["confidence_logits"] for r in rounds):
        return None
    table = RoundsTable.from_rows(rounds)
    out = {"raw": confidence_report(table), "temperatures": temperatures}
    if temperatures:
        out["calibrated"] = confidence_report(table, temperatures)
    return out


def format_summary(report: dict) -> str:
    """A few human-readable lines."""

    def num(value, spec=".3f", unit=""):
        return "n/a" if value is None else format(value, spec) + unit

    acc = " ".join(num(a, ".2f") for a in report["acceptance_per_position"])
    lines = [
        f"[dspark] {report['num_prompts']} prompts, T={report['temperature']}, K={report['block_size']}, "
        f"verify {report['verify_len']}: tau {num(report['tau'])} over {report['rounds']} rounds",
        f"  acceptance by position: {acc}",
        f"  tokens/s: target {num(report['target_tokens_per_s'], '.1f')}, speculative "
        f"{num(report['speculative_tokens_per_s'], '.1f')} → speedup {num(report['speedup'], '.2f', 'x')}",
    ]
    if "matches_target_greedy" in report:
        lines.append(f"  greedy output identical to the target's: {report['matches_target_greedy']}")
    for name, cat in report["categories"].items():
        lines.append(f"  [{name}] tau {num(cat['tau'])}, speedup {num(cat['speedup'], '.2f', 'x')}")
    conf = report["confidence"]
    if conf:
        for key in ("raw", "calibrated"):
            if key in conf:
                eces = " ".join(num(p["prefix_ece"], ".3f") for p in conf[key])
                lines.append(f"  confidence ({key}) prefix ECE by position: {eces}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
add_arguments = add_evaluate_arguments  # `dspark evaluate` flags (torch-free module, for a fast --help)


def _check_inputs(args: argparse.Namespace) -> None:
    """Every input checked before a weight loads or a token is decoded: each mistake is one line naming the flag."""
    from nemo_automodel_dspark.draft_checks import require_draft_fits_target, require_finite_draft
    from nemo_automodel_dspark.errors import (
        require_count,
        require_device,
        require_draft_dir,
        require_file,
        require_output_file,
    )
    from nemo_automodel_dspark.target.loading import load_target_config

    require_draft_dir(args.draft)
    for value, flag in ((args.output, "--output"), (args.save_generations, "--save-generations")):
        require_output_file(value, flag)
    require_output_file(args.save_rounds, "--save-rounds")
    for value, flag in ((args.num_prompts, "--num-prompts"), (args.max_new_tokens, "--max-new-tokens")):
        require_count(value, flag)
    require_count(args.verify_len, "--verify-len")
    require_file(args.data, "--data")
    require_device(args.device, "--device")
    require_draft_fits_target(args.draft, load_target_config(args.target, "--target"), args.target)
    require_finite_draft(args.draft)


def run(args: argparse.Namespace) -> int:
    from nemo_automodel_dspark.errors import ToolError
    from nemo_automodel_dspark.io import atomic_write_bytes
    from nemo_automodel_dspark.model.drafter import DSparkDrafter
    from nemo_automodel_dspark.target.loading import load_target, load_tokenizer

    _check_inputs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = load_tokenizer(args.target)
    try:  # before the models load: a bad row fails fast
        prompts = load_prompts(args.data, tokenizer, args.num_prompts, chat_template=args.chat_template)
    except ValueError as err:  # names the file and line
        raise ToolError(str(err)) from err
    target = load_target(args.target, dtype=dtype, device=device)
    draft = DSparkDrafter.from_pretrained(args.draft, device=device).to(dtype)
    result = run_evaluation(
        target,
        draft,
        tokenizer,
        prompts,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        verify_len=args.verify_len,
        seed=args.seed,
        measure_speed=not args.no_speed,
    )
    result.report.update(
        target=str(args.target),
        draft=str(args.draft),
        data=str(args.data),
        device=str(device),
        eos_token_ids=sorted(eos_token_ids(target)),
    )
    atomic_write_bytes(Path(args.output), json.dumps(result.report, indent=2).encode())
    for path, rows in ((args.save_generations, result.generations), (args.save_rounds, result.rounds)):
        if path:
            atomic_write_bytes(Path(path), "".join(json.dumps(r) + "\n" for r in rows).encode())
    print(format_summary(result.report))
    return 0
