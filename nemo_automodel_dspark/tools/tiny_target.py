"""Build a tiny, trained Qwen3 target (BPE tokenizer + a few-million-parameter model) from the Python stdlib.

The build is a cache keyed by its manifest: the same parameters on the same stdlib reuse the directory, anything
else rebuilds it in `DIR.tmp` and renames it into place, so a reader never sees a half-written target.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.io import atomic_write_json, fsync_tree
from nemo_automodel_dspark.tools.stdlib_corpus import (
    file_list_hash,
    split_files,
    stdlib_chat_rows,
    stdlib_root,
    tokenizer_corpus,
)

__all__ = ["TinyTargetBuild", "TinyTargetSpec", "build_tiny_target", "stdlib_chat_rows"]

MANIFEST_NAME = "dspark_tiny.json"
FORMAT_VERSION = 1
END_OF_TEXT, IM_START, IM_END, MASK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_STEPS = 600  # measured: 2 min 44 s for the whole build on 2 shared cores (1 training thread)
# Qwen2/Qwen3's pre-tokenizer split: newlines are pieces of their own, so a prompt that ends in "\n\n" (as the
# generation prompt does) ends on a token boundary the model also saw in training (GPT-2's split glues "\n\n   ").
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's template, reduced to what the tiny target needs: the final assistant turn carries a (possibly empty)
# think block, and a generation prompt with enable_thinking=false pre-fills an empty one, exactly like Qwen3.
CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message.content is string %}{%- set content = message.content %}
    {%- else %}{%- set content = message.content | map(attribute='text') | join('') %}{%- endif %}
    {%- if message.role == 'assistant' and loop.last %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}
        {{- content.lstrip('\\n') + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""


@dataclass(frozen=True)
class TinyTargetSpec:
    """Everything that determines the built weights; the manifest stores it and the cache compares it."""

    seed: int = 0
    steps: int = DEFAULT_STEPS
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_length: int = 512
    batch_size: int = 1
    lr: float = 3e-3
    # Passes over steps·B/epochs distinct windows. One pass (every window new) generalises best: held-out loss 5.16
    # vs 7.42 for 8 passes over 1/8 of the windows, whose memorised fragments made its output on new prompts
    # erratic; the drafter's real greedy τ on the demo went 1.90 → 4.55 with that change alone (same budget).
    epochs: int = 1
    tokenizer_chars: int = 2_000_000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return 3 * self.hidden_size


@dataclass
class TinyTargetBuild:
    path: Path
    manifest: dict
    reused: bool


def build_tiny_target(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    hidden_size: int = 256,
    num_layers: int = 4,
    vocab_size: int = 4096,
    force: bool = False,
    progress: bool = True,
    **spec_overrides: int | float,
) -> TinyTargetBuild:
    """Build (or reuse) a tiny trained target in `out`; same spec and stdlib → same directory contents."""
    tokenizer_chars = spec_overrides.pop("tokenizer_chars", min(2_000_000, 500 * vocab_size))
    spec = TinyTargetSpec(
        seed=seed,
        steps=steps,
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=vocab_size,
        tokenizer_chars=int(tokenizer_chars),
        **spec_overrides,  # type: ignore[arg-type]
    )
    out = Path(out)
    params = {**dataclasses.asdict(spec), "format_version": FORMAT_VERSION, "file_list_hash": file_list_hash()}
    cached = _read_manifest(out)
    if not force and cached is not None and cached.get("params") == params and _is_complete(out):
        print(f"[dspark] reusing the tiny target in {out} (same parameters; pass --force to rebuild)")
        return TinyTargetBuild(path=out, manifest=cached, reused=True)
    if out.exists() and cached is None and any(out.iterdir()) and not force:
        raise ToolError(f"{out} exists and is not a tiny-target build; pass --force to replace it")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = _build_into(tmp, spec, params, progress=progress)
    _replace_dir(tmp, out)
    return TinyTargetBuild(path=out, manifest=manifest, reused=False)


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out: Path) -> bool:
    needed = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((out / name).is_file() for name in needed)


def _replace_dir(tmp: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _build_into(tmp: Path, spec: TinyTargetSpec, params: dict, *, progress: bool) -> dict:
    import torch

    from nemo_automodel_dspark.tools.tiny_training import held_out_loss, train_model

    started = time.perf_counter()
    tokenizer = train_tokenizer(spec.vocab_size, spec.tokenizer_chars)
    torch.manual_seed(spec.seed)
    model = _new_model(spec, tokenizer)
    threads_before, threads = torch.get_num_threads(), train_threads()
    torch.set_num_threads(threads)
    try:
        losses = train_model(model, tokenizer, spec, progress=progress)
        held_out = held_out_loss(model, tokenizer, spec)
    finally:
        torch.set_num_threads(threads_before)
    tail = losses[-max(1, len(losses) // 10) :]
    manifest = {
        "params": params,
        "seed": spec.seed,
        "steps": spec.steps,
        "file_list_hash": params["file_list_hash"],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "initial_train_loss": round(losses[0], 4),
        "final_train_loss": round(sum(tail) / len(tail), 4),
        "held_out_loss": round(held_out, 4),
        "mask_token_id": tokenizer.mask_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "stdlib_root": str(stdlib_root()),
        "num_files": {"train": len(split_files("train")), "held_out": len(split_files("held_out"))},
        "train_threads": threads,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / MANIFEST_NAME, manifest)
    fsync_tree(tmp)
    return manifest


def train_threads() -> int:
    """Half the cores, at most 8: a model this small gains little from more threads, and on a small shared machine
    oversubscribed OpenMP threads spin-wait (2 threads on 2 busy cores ran 2x slower than 1 thread)."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


def train_tokenizer(vocab_size: int, max_chars: int):
    """Byte-level BPE on train-split stdlib files; special tokens first, the think tags last (non-special, as Qwen3)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    think_tokens = [AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(think_tokens),
        special_tokens=[END_OF_TEXT, IM_START, IM_END, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(max_chars), trainer)
    bpe.add_tokens(think_tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        mask_token=MASK,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4 * 1024,
    )


def _new_model(spec: TinyTargetSpec, tokenizer):
    from transformers import GenerationConfig, Qwen3ForCausalLM

    from nemo_automodel_dspark.target.tiny import tiny_config

    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={spec.vocab_size}")
    config = tiny_config(
        "qwen3",
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    return model
