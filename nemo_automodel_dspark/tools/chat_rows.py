"""Chat rows for regeneration: parse a JSONL line into a prompt (everything before the final assistant turn) and
rebuild the row around the target's own response."""

from __future__ import annotations

import json
from dataclasses import dataclass

from nemo_automodel_dspark.data.chat import TOKEN_ID_KEYS, split_reasoning

__all__ = ["PromptRow", "RowError", "output_row", "parse_row", "split_reasoning"]

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


class RowError(ValueError):
    """A row that cannot be regenerated; the message is the reason recorded in the skip list."""


@dataclass
class PromptRow:
    line: int  # 1-based line number in the input file
    row: dict  # the parsed row, other keys kept in the output
    prompt: list[dict]  # messages before the final assistant turn, contents as plain strings


def parse_row(line: int, raw: bytes) -> PromptRow:
    """Parse one JSONL line; raises RowError with a short reason when the row is unusable."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise RowError(f"bad JSON: {err}") from err
    if not isinstance(row, dict):
        raise RowError(f"bad row: expected a JSON object, got {type(row).__name__}")
    messages = [_normalise_message(m) for m in _raw_messages(row)]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise RowError("no assistant turn")
    if not any(m["role"] == "user" for m in messages[:last]):
        raise RowError("no user turn before the final assistant turn")
    return PromptRow(line=line, row=row, prompt=messages[:last])


def _raw_messages(row: dict) -> list:
    if isinstance(row.get("messages"), list):
        return row["messages"]
    if isinstance(row.get("conversations"), list):  # ShareGPT: {"from": "human", "value": "..."}
        converted = []
        for turn in row["conversations"]:
            if not isinstance(turn, dict) or turn.get("from") not in _SHAREGPT_ROLES:
                raise RowError(f"bad ShareGPT turn: {str(turn)[:80]}")
            converted.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": turn.get("value", "")})
        return converted
    raise RowError("no 'messages' (or ShareGPT 'conversations') list")


def _normalise_message(message: object) -> dict:
    """A copy with `content` as a plain string (lists of text parts are joined): every chat template accepts it."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RowError(f"bad message: {str(message)[:80]}")
    content = message.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type", "text") == "text" for p in content):
            raise RowError("non-text content part")
        content = "".join(str(p.get("text", "")) for p in content)
    elif not isinstance(content, str):
        raise RowError(f"bad content type: {type(content).__name__}")
    return {**message, "content": content}


def output_row(
    prompt_row: PromptRow,
    content: str,
    reasoning: str | None,
    token_ids: tuple[list[int], list[int]] | None = None,
) -> dict:
    """The input row with its conversation cut after the final assistant turn, whose content is the new one.

    `token_ids` = (prompt ids the target read, response ids it wrote) become `prompt_ids` / `response_ids`, which
    the training dataset then uses as they are (DATA_TOKEN_IDS); ids of an earlier run are never carried over.
    """
    reply: dict = {"role": "assistant", "content": content}
    if reasoning:
        reply["reasoning_content"] = reasoning
    row = {k: v for k, v in prompt_row.row.items() if k not in ("conversations", *TOKEN_ID_KEYS)}
    row["messages"] = [*prompt_row.prompt, reply]
    if token_ids is not None:
        row["prompt_ids"], row["response_ids"] = token_ids
    return row
