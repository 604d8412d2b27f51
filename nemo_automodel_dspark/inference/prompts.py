"""Evaluation prompts: chat rows read and rendered exactly as training and `dspark regenerate` read and render them
(`data.sources`, `data.render`), with the same `chat_template`; a row with the target's own `prompt_ids` is used
as those ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_automodel_dspark.data.render import resolve_chat_template, row_prompt_ids
from nemo_automodel_dspark.data.sources import RowError, open_rows


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # rendered prompt token ids, ending with the generation prompt
    category: str | None = None


def to_prompt(tokenizer: Any, item: Prompt | dict[str, Any] | list[int], chat_template: str | None = None) -> Prompt:
    """A prompt from a chat row (rendered with `chat_template`, as training would), a ready `Prompt`, or raw ids."""
    if isinstance(item, Prompt):
        return item
    if isinstance(item, dict):
        category = item.get("category")
        ids = row_prompt_ids(item, tokenizer, resolve_chat_template(tokenizer, chat_template))
        return Prompt(ids, None if category is None else str(category))
    return Prompt([int(i) for i in item])


def load_prompts(
    path: str | Path, tokenizer: Any, num_prompts: int | None = None, *, chat_template: str | None = None
) -> list[Prompt]:
    """The first `num_prompts` rows of a chat file (any format training reads), rendered; a bad row is a ValueError
    naming the file and line."""
    template = resolve_chat_template(tokenizer, chat_template)
    prompts: list[Prompt] = []
    for number, row in open_rows(str(path))[1]:
        if num_prompts is not None and len(prompts) >= num_prompts:
            break
        try:
            if isinstance(row, RowError):
                raise row
            category = row.get("category")
            prompts.append(
                Prompt(row_prompt_ids(row, tokenizer, template), None if category is None else str(category))
            )
        except RowError as err:
            raise ValueError(f"{path}:{number}: {err.reason}") from err
    if not prompts:
        raise ValueError(f"{path}: no prompt rows")
    return prompts
