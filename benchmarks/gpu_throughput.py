"""Training throughput side by side in one process: this plugin's recipe vs NeMo AutoModel 0.7.0's `train_dspark`.

Both recipes get the same target directory (a Qwen3-0.6B-shaped random target with a word-level tokenizer, built
here), the same chat JSONL rows (every row longer than `seq_length`, so each is cut to exactly `seq_length` tokens)
and the same options: the shipped `examples/dspark/qwen3_0.6b_dspark.yaml` with only paths, step count, logging and
checkpointing overridden. Each recipe is driven through its own `setup()` + `run_train_validation_loop()`; a clock on
`optimizer.step` (with a device sync) timestamps every optimizer step, so a step time is one whole loop iteration.
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from gpu_problem import QWEN3_0_6B, TargetShape, build_target

REPO = Path(__file__).resolve().parents[1]
SHIPPED_YAML = REPO / "examples" / "dspark" / "qwen3_0.6b_dspark.yaml"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = [f"w{i}" for i in range(200)] + ["user", "assistant", "system"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class BenchPlan:
    shape: TargetShape
    overrides: dict = field(default_factory=dict)  # recipe_args on top of the shipped YAML
    steps: int = 8  # optimizer steps per recipe
    warmup: int = 3  # first steps left out of the median (allocator, FlexAttention compile)
    phase_steps: int = 2  # extra steps of ours with the phase timer on (they sync, so they are not timed above)


REAL_PLAN = BenchPlan(QWEN3_0_6B)
DRY_PLAN = BenchPlan(
    TargetShape(64, 4, 4, 2, 16, 128, 512),
    dict(
        seq_length=64,
        num_anchors=8,
        draft_num_hidden_layers=2,
        target_layer_ids=[1, 2],
        mask_token_id=511,
        markov_rank=16,
        grad_accumulation_steps=2,
    ),
    steps=3,
    warmup=1,
    phase_steps=1,
)


def recipe_args(plan: BenchPlan, assets: dict[str, Path], out: Path) -> dict:
    args = dict(yaml.safe_load(SHIPPED_YAML.read_text())["recipe_args"])
    args.update(plan.overrides)
    args.update(
        target_model_name_or_path=str(assets["target"]),
        train_data_path=str(assets["train"]),
        val_data_path=None,
        output_dir=str(out),
        num_epochs=1,
        max_steps=plan.steps + plan.phase_steps,
        log_every_steps=plan.steps + plan.phase_steps,
        num_workers=0,
    )
    return args


def optimizer_section() -> dict:
    return dict(yaml.safe_load(SHIPPED_YAML.read_text())["optimizer"])


def warm_imports() -> None:
    """Import both recipes before any section's clock starts; a failure is recorded later, by `run_theirs`."""
    import nemo_automodel_dspark.train_dspark  # noqa: F401

    with contextlib.suppress(Exception):
        import nemo_automodel.recipes.llm.train_dspark  # noqa: F401


# ------------------------------------------------------------------------------------------------ assets
def build_assets(root: Path, plan: BenchPlan, device: torch.device) -> dict[str, Path]:
    """Target directory (random Qwen3 weights in the training dtype + word-level tokenizer) and the rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:]
    )
    fast.chat_template = TEMPLATE
    target_dir = root / "target"
    fast.save_pretrained(target_dir)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = build_target(plan.shape, device, dtype)
    target.config.eos_token_id, target.config.pad_token_id = vocab["<|im_end|>"], 0
    target.save_pretrained(target_dir)
    del target
    rows = (plan.steps + plan.phase_steps) * _rows_per_step(plan)
    return {"target": target_dir, "train": write_rows(root / "train.jsonl", rows, _seq(plan))}


def _seq(plan: BenchPlan) -> int:
    return int(recipe_args(plan, {"target": Path(), "train": Path()}, Path())["seq_length"])


def _rows_per_step(plan: BenchPlan) -> int:
    args = recipe_args(plan, {"target": Path(), "train": Path()}, Path())
    return int(args["micro_batch_size"]) * int(args["grad_accumulation_steps"])


def write_rows(path: Path, n: int, seq: int) -> Path:
    """`n` chat rows whose answers alone exceed `seq` words (one word = one token), so every row is cut to `seq`."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(f"w{rng.randrange(200)}" for _ in range(16))
            answer = " ".join(f"w{rng.randrange(200)}" for _ in range(seq + 32))
            row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            f.write(json.dumps(row) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_optimizer(optimizer, device: torch.device, on_step=None) -> list[float]:
    """Timestamp the end of every `optimizer.step` (after a device sync); `on_step(n)` runs after step n."""
    stamps = [time.perf_counter()]
    inner = optimizer.step

    def step(*args, **kwargs):
        out = inner(*args, **kwargs)
        sync(device)
        stamps.append(time.perf_counter())
        if on_step is not None:
            on_step(len(stamps) - 1)
        return out

    optimizer.step = step
    return stamps


def summarize(stamps: list[float], plan: BenchPlan, tokens_per_row: float, rows_per_step: int, device) -> dict:
    """Median step time over steps warmup+1..steps, tokens/s from it, peak CUDA memory since the last reset."""
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][plan.warmup : plan.steps]
    if not times:
        raise RuntimeError(f"no timed step: {len(stamps) - 1} optimizer steps ran, warm-up is {plan.warmup}")
    median = statistics.median(times)
    tokens = tokens_per_row * rows_per_step
    return {
        "steps_timed": len(times),
        "step_time_s_median": median,
        "step_times_s": times,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        "peak_cuda_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def _fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def where(exc: BaseException) -> str:
    """`Type: message` at the innermost frame, and the innermost NeMo AutoModel frame that led there."""
    frames = traceback.extract_tb(exc.__traceback__)
    text = f"{type(exc).__name__}: {exc}"
    if frames:
        text += f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})"
    theirs = [f for f in frames if "/nemo_automodel/" in f.filename]
    if theirs and theirs[-1] is not frames[-1]:
        text += f", called from {theirs[-1].filename}:{theirs[-1].lineno} ({theirs[-1].name})"
    return text


# ------------------------------------------------------------------------------------------------ ours
def run_ours(plan: BenchPlan, assets: dict[str, Path], out: Path, device: torch.device) -> dict:
    """This plugin's recipe: N timed steps, then `phase_steps` with the phase timer (as benchmarks/step_time.py)."""
    from nemo_automodel.components.config.loader import ConfigNode
    from step_time import phase_shares

    from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe

    _fresh_memory(device)
    cfg = {
        "recipe": "nemo_automodel_dspark.train_dspark.TrainDSparkRecipe",
        "dist_env": {"backend": "nccl" if device.type == "cuda" else "gloo"},
        "recipe_args": recipe_args(plan, assets, out / "ours"),
        "optimizer": optimizer_section(),
        "checkpoint": {"enabled": False},
    }
    recipe = TrainDSparkRecipe(ConfigNode(cfg))
    recipe.setup()
    timer = recipe.runner.timer

    def phases_on(n: int) -> None:
        if n == plan.steps:  # the timed steps are done: time the phases of the next ones
            timer.enabled = True
            timer.totals.clear()

    stamps = clock_optimizer(recipe.optimizer, device, phases_on)
    recipe.run_train_validation_loop()
    rows = [len(recipe.train_set[i]["input_ids"]) for i in range(len(recipe.train_set))]
    result = summarize(stamps, plan, statistics.mean(rows), recipe.per_step, device)
    phase_total = stamps[-1] - stamps[plan.steps]
    result["phase_split"] = phase_shares(dict(timer.totals), phase_total)
    result["phase_steps"] = len(stamps) - 1 - plan.steps
    result["attention_backend"] = recipe.draft.dspark.attention_backend
    del recipe
    return result


# ------------------------------------------------------------------------------------------------ theirs
def their_config(plan: BenchPlan, assets: dict[str, Path], out: Path, device: torch.device):
    from nemo_automodel.components.config.loader import ConfigNode

    args = recipe_args(plan, assets, out / "theirs")
    args.pop("max_steps")  # theirs runs whole epochs: the file holds exactly the rows of the steps we time
    return ConfigNode(
        {
            "dist_env": {"backend": "nccl" if device.type == "cuda" else "gloo"},
            "recipe_args": args,
            "optimizer": optimizer_section(),
            "checkpoint": {"enabled": False},
        }
    )


def their_data(cfg, assets: dict[str, Path]) -> dict:
    """Their data path on our rows (CPU-only work): the batch layout and real tokens per row, or why it fails."""
    from nemo_automodel._transformers.auto_tokenizer import NeMoAutoTokenizer
    from nemo_automodel.components.datasets.llm.eagle3 import build_eagle3_dataloader

    args = cfg.recipe_args
    tokenizer = NeMoAutoTokenizer.from_pretrained(str(assets["target"]))
    loader = build_eagle3_dataloader(
        data_path=str(assets["train"]),
        tokenizer=tokenizer,
        seq_length=args.seq_length,
        batch_size=args.micro_batch_size,
        shuffle=False,
    )
    batch = next(iter(loader))
    rows = [int(sum(loader.dataset[i]["attention_mask"])) for i in range(len(loader.dataset))]
    return {
        "rows": len(rows),
        "batch_shapes": {k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")},
        "loss_tokens_first_batch": int(batch["loss_mask"].sum()),
        "tokens_per_row": statistics.mean(rows),
    }


def run_theirs(plan: BenchPlan, assets: dict[str, Path], out: Path, device: torch.device) -> dict:
    """NeMo AutoModel 0.7.0's `train_dspark` on the same target, rows and options; the reason if it cannot run."""
    import torch.distributed as dist

    try:
        from nemo_automodel.recipes.llm import train_dspark as theirs
    except Exception as exc:  # an import failure is a reason, not a crash
        return {"ran": False, "reason": where(exc)}
    cfg = their_config(plan, assets, out, device)
    result: dict = {"ran": False}
    try:
        result["data"] = their_data(cfg, assets)
        _fresh_memory(device)
        recipe = theirs.TrainDSparkRecipe(cfg)
        recipe.setup()
        stamps = clock_optimizer(recipe.optimizer, device)
        recipe.run_train_validation_loop()
        rows_per_step = int(cfg.recipe_args.micro_batch_size) * int(cfg.recipe_args.grad_accumulation_steps)
        result.update(summarize(stamps, plan, result["data"]["tokens_per_row"], rows_per_step, device), ran=True)
        del recipe
    except Exception as exc:
        result["reason"] = where(exc)
    finally:
        if dist.is_initialized():  # theirs joins a world-size-1 process group in setup()
            dist.destroy_process_group()
    return result


def compare(ours: dict, theirs: dict) -> dict:
    """Ratios ours/theirs and the issue's targets (our tokens/s >= theirs, our peak memory <= theirs)."""
    if not theirs.get("ran"):
        return {"ratio_tokens_per_s": None, "reason": theirs.get("reason")}
    out = {"ratio_tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"]}
    out["target_tokens_per_s_met"] = out["ratio_tokens_per_s"] >= 1.0
    mem_ours, mem_theirs = ours["peak_cuda_memory_gib"], theirs["peak_cuda_memory_gib"]
    if mem_ours is not None and mem_theirs:
        out["ratio_peak_memory"] = mem_ours / mem_theirs
        out["target_peak_memory_met"] = mem_ours <= mem_theirs
    return out


def run_throughput(device: torch.device, plan: BenchPlan, workdir: Path) -> dict:
    """Both recipes on the same assets; theirs' failure is recorded with its exact reason."""
    assets = build_assets(workdir, plan, device)
    start = time.perf_counter()
    ours = run_ours(plan, assets, workdir, device)
    ours["wall_s"] = time.perf_counter() - start
    start = time.perf_counter()
    theirs = run_theirs(plan, assets, workdir, device)
    theirs["wall_s"] = time.perf_counter() - start
    return {
        "passed": ours["tokens_per_s"] > 0 and (theirs.get("ran") or bool(theirs.get("reason"))),
        "config": {"yaml": str(SHIPPED_YAML.relative_to(REPO)), **recipe_args(plan, assets, workdir)},
        "target_shape": plan.shape.__dict__,
        "ours": ours,
        "theirs": theirs,
        "comparison": compare(ours, theirs),
    }


def preflight(plan: BenchPlan, workdir: Path) -> dict:
    """CPU, real sizes, no training: our recipe's setup() accepts the plan and their data path reads the same rows."""
    from nemo_automodel.components.config.loader import ConfigNode

    from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe

    cpu = torch.device("cpu")
    assets = build_assets(workdir, plan, cpu)
    cfg = {
        "recipe": "nemo_automodel_dspark.train_dspark.TrainDSparkRecipe",
        "dist_env": {"backend": "gloo"},
        "recipe_args": recipe_args(plan, assets, workdir / "ours"),
        "optimizer": optimizer_section(),
        "checkpoint": {"enabled": False},
    }
    recipe = TrainDSparkRecipe(ConfigNode(cfg))
    recipe.setup()
    ours = {
        "rows": len(recipe.train_set),
        "tokens_per_row": statistics.mean(len(recipe.train_set[i]["input_ids"]) for i in range(len(recipe.train_set))),
        "rows_per_step": recipe.per_step,
        "steps": recipe.total_steps,
        "target_layer_ids": list(recipe.draft.dspark.target_layer_ids or []),
    }
    del recipe
    theirs = their_data(their_config(plan, assets, workdir, cpu), assets)
    return {"passed": ours["tokens_per_row"] == theirs["tokens_per_row"], "ours": ours, "theirs_data": theirs}
