"""Chat rows for regeneration: a JSONL line → its prompt (read by `data.sources`, the reader training and evaluate
use too), and the row rebuilt around the target's own response."""

from __future__ import annotations

from dataclasses import dataclass

from nemo_automodel_dspark.data.sources import TOKEN_ID_KEYS, RowError, normalize_messages, parse_line, prompt_messages

__all__ = ["PromptRow", "RowError", "output_row", "parse_row"]


@dataclass
class PromptRow:
    line: int  # 1-based line number in the input file
    row: dict  # the parsed row, other keys kept in the output
    prompt: list[dict]  # normalised messages before the final assistant turn (`data.sources.prompt_messages`)


def parse_row(line: int, raw: bytes) -> PromptRow:
    """Parse one JSONL line; raises RowError with a short reason when the row is unusable."""
    row = parse_line(raw)
    if isinstance(row, RowError):
        raise row
    return PromptRow(line=line, row=row, prompt=prompt_messages(normalize_messages(row, require_assistant=False)))


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
    replaced = ("conversations", "system") if "conversations" in prompt_row.row else ()  # now in `messages`
    row = {k: v for k, v in prompt_row.row.items() if k not in (*replaced, *TOKEN_ID_KEYS)}
    row["messages"] = [*prompt_row.prompt, reply]
    if token_ids is not None:
        row["prompt_ids"], row["response_ids"] = token_ids
    return row
