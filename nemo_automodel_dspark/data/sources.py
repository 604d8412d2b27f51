"""The one reader of chat rows, for training, `dspark regenerate` and `dspark evaluate` alike.

Reads local JSONL / JSON / parquet files, saved `datasets` folders or Hub ids, and normalises OpenAI `messages` and
ShareGPT `conversations` rows (one role table) to OpenAI messages; `prompt_messages` is the part of a conversation
the model reads before its final answer. Rows carrying the target's own ids (`prompt_ids` + `response_ids`) are
recognised by `has_token_ids` here and tokenised by `data.chat.tokenize_token_ids`; `data.render` renders prompts.

Every reader yields `(number, row)` where `number` is the 1-based line (JSONL) or row (everything else) and `row`
is a dict or a `RowError` for a row that could not even be parsed: one bad row never stops the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {  # ShareGPT `from` → OpenAI role, as the common ShareGPT exports spell them
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
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
_SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")
# Optional OpenAI message fields that chat templates render (tool use); kept when present and not null.
_PASSTHROUGH_KEYS = ("tool_calls", "tool_call_id", "name")
TOKEN_ID_KEYS = ("prompt_ids", "response_ids")  # the target's own ids, written by `dspark regenerate`


class RowError(ValueError):
    """A row that cannot be used (by training, regenerate or evaluate); `reason` is a short phrase that skip counts
    are grouped by."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Row = tuple[int, "dict[str, Any] | RowError"]


def open_rows(path_or_id: str, *, split: str = "train") -> tuple[int, Iterator[Row]]:
    """Return (row count, iterator of (1-based number, row or RowError)); a missing local path raises at once."""
    path = os.path.expanduser(path_or_id)
    if os.path.isdir(path):
        return _dataset_rows(_load_directory(path, split))
    if os.path.isfile(path):
        if path.endswith(".jsonl"):
            return _jsonl_rows(path)
        if path.endswith(".json"):
            return _json_rows(path)
        if path.endswith(".parquet"):
            return _parquet_rows(path)
        raise ValueError(f"{path_or_id}: unsupported data file (expected .jsonl, .json, .parquet or a dataset folder)")
    if path.endswith(_LOCAL_SUFFIXES) or path.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"data file not found: {path_or_id}")
    import datasets  # heavy import, only for Hub ids

    return _dataset_rows(datasets.load_dataset(path_or_id, split=split))


def check_data_path(path_or_id: str, key: str) -> None:
    """Before any work: a local data path exists and is data, not a model folder; one line naming `key`.

    A name that is neither a local path nor a path-like string is left for the Hub to resolve.
    """
    from nemo_automodel_dspark.errors import ToolError

    path = os.path.expanduser(path_or_id)
    if os.path.isdir(path):
        if _is_model_folder(path):
            raise ToolError(
                f"{key} {path_or_id}: a model folder (config.json and weights), not data; pass a .jsonl, .json or "
                ".parquet file of chat rows or a saved datasets folder"
            )
        return
    if os.path.isfile(path):
        if not path.endswith(_LOCAL_SUFFIXES):
            raise ToolError(f"{key} {path_or_id}: unsupported data file (expected .jsonl, .json or .parquet)")
        return
    if path.endswith(_LOCAL_SUFFIXES) or path.startswith(("/", "./", "../", "~")):
        raise ToolError(f"{key} {path_or_id}: no such file")


def _is_model_folder(path: str) -> bool:
    names = set(os.listdir(path))
    weights = any(n.endswith((".safetensors", ".bin", ".safetensors.index.json")) for n in names)
    return "config.json" in names and weights and not names & set(_SAVED_DATASET_FILES)


def iter_rows(path_or_id: str, *, split: str = "train") -> Iterator[Row]:
    """Yield (1-based line/row number, row dict or RowError) for every row of a local file, folder or Hub dataset."""
    return open_rows(path_or_id, split=split)[1]


def _jsonl_rows(path: str) -> tuple[int, Iterator[Row]]:
    with open(path, "rb") as f:
        count = sum(1 for line in f if line.strip())
    return count, _jsonl_iter(path)


def _jsonl_iter(path: str) -> Iterator[Row]:
    for number, line in jsonl_lines(path):
        yield number, parse_line(line)


def jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of every non-blank line; `parse_line` turns one into a row."""
    with open(path, "rb") as f:  # bytes: a line of invalid UTF-8 is one bad row, not a crash of the whole file
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def parse_line(line: bytes) -> dict[str, Any] | RowError:
    try:
        row = json.loads(line)
    except UnicodeDecodeError:  # bytes that are not UTF-8 (nor the UTF-16/32 that json detects)
        return RowError("not UTF-8 text")
    except ValueError:
        return RowError("invalid JSON")
    return row if isinstance(row, dict) else RowError("row is not a JSON object")


def _json_rows(path: str) -> tuple[int, Iterator[Row]]:
    with open(path, encoding="utf-8-sig") as f:  # a UTF-8 BOM is accepted (JSONL lines are read as bytes: same)
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data":  # a .json file that is really JSON lines
                return _jsonl_rows(path)
            raise ValueError(f"{path}: invalid JSON ({err})") from err
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows or an object with a 'data' list")
    return len(data), _checked(data)


def _parquet_rows(path: str) -> tuple[int, Iterator[Row]]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)

    def rows() -> Iterator[dict[str, Any]]:
        for batch in table.iter_batches(batch_size=1024):
            yield from batch.to_pylist()

    return table.metadata.num_rows, _checked(rows())


def _load_directory(path: str, split: str) -> Any:
    import datasets

    if _is_model_folder(path):
        raise ValueError(f"{path}: a model folder (config.json and weights), not data")
    if any(os.path.exists(os.path.join(path, name)) for name in _SAVED_DATASET_FILES):
        loaded = datasets.load_from_disk(path)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(path, split=split)  # a folder of data files


def _dataset_rows(dataset: Any) -> tuple[int, Iterator[Row]]:
    return len(dataset), _checked(dataset)


def _checked(rows: Iterable[Any]) -> Iterator[Row]:
    for number, row in enumerate(rows, start=1):
        yield number, row if isinstance(row, dict) else RowError("row is not a JSON object")


def normalize_messages(row: dict[str, Any], *, require_assistant: bool = True) -> list[dict[str, Any]]:
    """Return the row as [{"role", "content"[, "reasoning_content"]}] (OpenAI or ShareGPT in); raise RowError if not.

    Training needs an assistant turn to learn from; a prompt for regenerate or evaluate may end before one
    (`require_assistant=False`).
    """
    if "messages" in row:
        raw, convert = row["messages"], _openai_message
    elif "conversations" in row:
        raw, convert = row["conversations"], _sharegpt_message
    else:
        raise RowError("no 'messages' or 'conversations' key")
    if not isinstance(raw, list) or not raw:
        raise RowError("messages is not a non-empty list")
    messages = [convert(m) for m in raw]
    system = row.get("system")  # some ShareGPT exports keep the system prompt beside the turns
    if "messages" not in row and isinstance(system, str) and system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise RowError("no assistant turn")
    return messages


def prompt_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the model reads before its final answer: the messages before the final assistant turn when the
    conversation ends with one, else all of them (a prompt-only row). It must hold a user turn."""
    end = len(messages) - 1 if messages and messages[-1]["role"] == "assistant" else len(messages)
    prompt = messages[:end]
    if not any(m["role"] == "user" for m in prompt):
        raise RowError("no user turn before the final assistant turn")
    return prompt


def _openai_message(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise RowError("message is not an object")
    role = message.get("role")
    if role not in ROLES:
        raise RowError(f"unknown role {role!r}")
    has_tool_calls = role == "assistant" and bool(message.get("tool_calls"))
    out: dict[str, Any] = {"role": role, "content": _text(message.get("content"), allow_none=has_tool_calls)}
    reasoning = message.get("reasoning_content")
    if role == "assistant" and reasoning is not None:
        if not isinstance(reasoning, str):
            raise RowError("reasoning_content is not text")
        out["reasoning_content"] = reasoning
    out.update({key: message[key] for key in _PASSTHROUGH_KEYS if message.get(key) is not None})
    return out


def _sharegpt_message(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise RowError("message is not an object")
    source = message.get("from")
    if source not in SHAREGPT_ROLES:
        raise RowError(f"unknown role {source!r}")
    return {"role": SHAREGPT_ROLES[source], "content": _text(message.get("value"))}


def _text(content: Any, *, allow_none: bool = False) -> str:
    """A string, or the concatenated text of a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if content is None and allow_none:
        return ""
    if isinstance(content, list):
        texts = [_part_text(part) for part in content]
        if all(text is not None for text in texts):
            return "".join(text for text in texts if text is not None)
    raise RowError("content is not text")


def _part_text(part: Any) -> str | None:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    return part if isinstance(part, str) else None


def has_token_ids(row: dict[str, Any]) -> bool:
    """True for a row carrying the target's own ids; one of the two keys without the other is a RowError."""
    present = [row.get(key) is not None for key in TOKEN_ID_KEYS]  # null columns: a table mixing both kinds
    if any(present) and not all(present):
        raise RowError("prompt_ids and response_ids go together: the row has only one of them")
    return all(present)


def token_id_list(row: dict[str, Any], key: str, vocab: int) -> list[int]:
    """`row[key]` as token ids, each in [0, vocab); anything else is a RowError naming the key."""
    ids = row.get(key)
    if not isinstance(ids, list) or not _valid_ids(ids, vocab):
        raise RowError(f"bad {key}: expected a list of token ids in [0, {vocab})")
    return ids


def _valid_ids(ids: list, vocab: int) -> bool:
    """Every element an int (bools count, as in Python) in [0, vocab); checked in numpy, not per token in Python."""
    if not ids:
        return True
    try:
        array = np.asarray(ids)
    except (ValueError, OverflowError):  # ragged nesting, ints beyond 64 bits
        return False
    if array.ndim != 1 or array.dtype.kind not in "iub":
        return False
    return bool(array.min() >= 0 and array.max() < vocab)
