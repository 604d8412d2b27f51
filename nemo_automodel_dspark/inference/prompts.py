"""Evaluation prompts: chat rows rendered with the target's chat template and a generation prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # rendered prompt token ids, ending with the generation prompt
    category: str | None = None


def prompt_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's `messages` (ShareGPT `conversations` converted) without trailing assistant turns."""
    if "messages" in row:
        messages = [{**m, "content": _text(m.get("content"))} for m in row["messages"]]
    elif "conversations" in row:
        from nemo_automodel_dspark.data.sources import normalize_messages

        messages = normalize_messages(row)
    else:
        raise ValueError("prompt row has no 'messages'")
    while messages and messages[-1].get("role") == "assistant":
        messages.pop()
    if not messages:
        raise ValueError("prompt row has no message before the assistant turn")
    return messages


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Chat template + generation prompt; thinking templates are asked not to think (`enable_thinking=False`)."""
    template = tokenizer.chat_template
    extra = {"enable_thinking": False} if "enable_thinking" in str(template) else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def to_prompt(tokenizer: Any, item: Prompt | dict[str, Any] | list[int]) -> Prompt:
    """A prompt from a chat row, a ready `Prompt`, or raw token ids."""
    if isinstance(item, Prompt):
        return item
    if isinstance(item, dict):
        category = item.get("category")
        return Prompt(render_prompt(tokenizer, prompt_messages(item)), None if category is None else str(category))
    return Prompt([int(i) for i in item])


def load_prompts(path: str | Path, tokenizer: Any, num_prompts: int | None = None) -> list[Prompt]:
    """The first `num_prompts` rows of a chat JSONL file, rendered; blank lines are skipped."""
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if num_prompts is not None and len(prompts) >= num_prompts:
                break
            if not line.strip():
                continue
            try:
                prompts.append(to_prompt(tokenizer, json.loads(line)))
            except ValueError as err:
                raise ValueError(f"{path}:{number}: {err}") from err
    if not prompts:
        raise ValueError(f"{path}: no prompt rows")
    return prompts
