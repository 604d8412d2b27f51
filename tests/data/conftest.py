"""Fixtures for the data tests: a tiny byte-level BPE tokenizer with Qwen-style chat templates."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|mask|>"]

# Qwen-style: "<|im_start|>{role}\n{content}<|im_end|>\n". RULE decides where the assistant's <think> block goes;
# GEN_OPEN/GEN_CLOSE become {% generation %} tags around what the assistant generates (not the trailing "\n").
_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}GEN_OPEN"
    "{%- if RULE -%}"
    "{{- '<think>\\n' + (message.get('reasoning_content') or '') + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- message['content'] + '<|im_end|>' -}}GEN_CLOSE"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _template(*, generation_tags: bool, reasoning_rule: str) -> str:
    opening, closing = ("{%- generation -%}", "{%- endgeneration -%}") if generation_tags else ("", "")
    return _TEMPLATE.replace("GEN_OPEN", opening).replace("GEN_CLOSE", closing).replace("RULE", reasoning_rule)


# Renders reasoning_content wherever it is given (the tokenizer's own template).
PLAIN_TEMPLATE = _template(generation_tags=False, reasoning_rule="message.get('reasoning_content')")
GENERATION_TEMPLATE = _template(generation_tags=True, reasoning_rule="message.get('reasoning_content')")
# Qwen3 style: a <think> block only on assistant turns after the last user turn (earlier reasoning is dropped).
QWEN3_TEMPLATE = _template(generation_tags=False, reasoning_rule="loop.index0 > ns.last_user")
QWEN3_GENERATION_TEMPLATE = _template(generation_tags=True, reasoning_rule="loop.index0 > ns.last_user")

_TEXT = """
the a an answer is of to and in that it for you are with on as be this was have not what question
hello world how do I sort list python use sorted function returns new reverse true plan think step
first then finally sum two plus four equals five numbers capital france paris city river weather
today sunny rain tomorrow code bug fix test pass fail data row line file json system user assistant
tool call result error ok thanks please help me explain why because simple small tiny model draft
"""
_WORDS = _TEXT.split()


def _corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(12)) + rng.choice([".", "?", "!\n", ",\n"]) for _ in range(400)]


def _build_tokenizer(*, special_think_tags: bool) -> PreTrainedTokenizerFast:
    specials = SPECIAL_TOKENS if special_think_tags else [t for t in SPECIAL_TOKENS if "think" not in t]
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(_corpus(), trainer)
    if not special_think_tags:  # Qwen3's way: single tokens that decoding keeps
        model.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = PLAIN_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes), special tokens as single ids, PLAIN_TEMPLATE as its chat template."""
    return _build_tokenizer(special_think_tags=True)


@pytest.fixture(scope="session")
def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """The same, but `<think>`/`</think>` are non-special single tokens (decoding keeps them), as in Qwen3."""
    return _build_tokenizer(special_think_tags=False)


@pytest.fixture(scope="session")
def templates() -> dict[str, str]:
    """plain / generation (same rendering, with {% generation %} tags) and qwen3 / qwen3_generation."""
    return {
        "plain": PLAIN_TEMPLATE,
        "generation": GENERATION_TEMPLATE,
        "qwen3": QWEN3_TEMPLATE,
        "qwen3_generation": QWEN3_GENERATION_TEMPLATE,
    }


def _conversation(*turns: str, system: str | None = "You are a tiny model.") -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


@pytest.fixture(scope="session")
def conversation() -> Callable[..., list[dict[str, Any]]]:
    """conversation(*turns, system=...) -> messages alternating user/assistant after an optional system prompt."""
    return _conversation


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def write_jsonl() -> Callable[[Path, list[Any]], Path]:
    """write_jsonl(path, rows): one JSON object per line; a str row is written verbatim (to plant bad lines)."""
    return _write_jsonl
