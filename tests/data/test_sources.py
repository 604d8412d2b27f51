"""Reading rows from every supported source, and normalising OpenAI / ShareGPT rows to one message format."""

from __future__ import annotations

import json

import datasets
import pytest

from nemo_automodel_dspark.data.sources import RowError, iter_rows, normalize_messages, prompt_messages

ROWS = [
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world."}]},
    {
        "messages": [
            {"role": "system", "content": "be brief."},
            {"role": "user", "content": "sum two plus four?"},
            {"role": "assistant", "content": "five.", "reasoning_content": "plan"},
        ]
    },
]
EXPECTED = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world."}],
    [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "sum two plus four?"},
        {"role": "assistant", "content": "five.", "reasoning_content": "plan"},
    ],
]


def normalized(path: str) -> list[tuple[int, list[dict]]]:
    return [(number, normalize_messages(row)) for number, row in iter_rows(path)]


def test_jsonl_numbers_lines_and_isolates_bad_ones(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], "", "{not json", "[1, 2]", ROWS[1]])
    rows = list(iter_rows(str(path)))
    assert [number for number, _ in rows] == [1, 3, 4, 5]  # blank line 2 is not a row, but keeps numbering
    assert rows[0][1] == ROWS[0] and rows[3][1] == ROWS[1]
    assert rows[1][1].reason == "invalid JSON" and rows[2][1].reason == "row is not a JSON object"


def test_a_line_that_is_not_utf8_is_named_as_such(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"messages": "caf\xe9"}\n{"messages": "ok"}\n')  # Latin-1, not UTF-8
    rows = list(iter_rows(str(path)))
    assert rows[0][1].reason == "not UTF-8 text" and rows[1][1] == {"messages": "ok"}


@pytest.mark.parametrize("layout", ["list", "data", "json_lines"])
def test_json_file(tmp_path, layout):
    path = tmp_path / "train.json"
    if layout == "json_lines":
        path.write_text("\n".join(json.dumps(row) for row in ROWS))
    else:
        path.write_text(json.dumps(ROWS if layout == "list" else {"data": ROWS}))
    assert normalized(str(path)) == [(1, EXPECTED[0]), (2, EXPECTED[1])]


def test_parquet_file(tmp_path):
    """Parquet unifies the message structs, so absent keys come back as None and must be ignored."""
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert normalized(str(path)) == [(1, EXPECTED[0]), (2, EXPECTED[1])]


def test_saved_dataset_folder(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    assert normalized(str(tmp_path / "saved")) == [(1, EXPECTED[0]), (2, EXPECTED[1])]


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "./missing"])
def test_missing_file_names_the_path(tmp_path, name):
    path = name if name.startswith("./") else str(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=path.replace(".", r"\.")):
        iter_rows(path)


def test_content_parts_are_joined():
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world."}]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": parts}]}
    assert [m["content"] for m in normalize_messages(row)] == ["hello world.", "hello world."]


def test_sharegpt_rows_convert():
    row = {
        "system": "be brief.",
        "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hello world."}],
    }
    assert normalize_messages(row) == [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world."},
    ]


@pytest.mark.parametrize(
    ("source", "role"),
    [
        ("system", "system"),
        ("human", "user"),
        ("user", "user"),
        ("gpt", "assistant"),
        ("assistant", "assistant"),
        ("model", "assistant"),
        ("tool", "tool"),
        ("function", "tool"),
        ("observation", "tool"),
    ],
)
def test_one_sharegpt_role_table(source, role):
    row = {"conversations": [{"from": source, "value": "x"}]}
    assert normalize_messages(row, require_assistant=False) == [{"role": role, "content": "x"}]


def test_the_prompt_is_what_precedes_the_final_answer():
    user, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    follow_up = {"role": "user", "content": "and?"}
    assert prompt_messages([user, answer]) == [user]
    assert prompt_messages([user, answer, follow_up]) == [user, answer, follow_up]  # a prompt-only row: all of it
    with pytest.raises(RowError, match="no user turn before the final assistant turn"):
        prompt_messages([{"role": "system", "content": "s"}, answer])


def test_tool_use_fields_are_kept():
    call = [{"type": "function", "function": {"name": "sum", "arguments": "{}"}}]
    row = {
        "messages": [
            {"role": "user", "content": "sum"},
            {"role": "assistant", "content": None, "tool_calls": call},
            {"role": "tool", "content": "5", "tool_call_id": "c1"},
            {"role": "assistant", "content": "five."},
        ]
    }
    messages = normalize_messages(row)
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": call}
    assert messages[2] == {"role": "tool", "content": "5", "tool_call_id": "c1"}


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"text": "hello"}, "no 'messages' or 'conversations' key"),
        ({"messages": []}, "messages is not a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "content is not text"),
        ({"messages": [{"role": "user", "content": None}]}, "content is not text"),
        ({"messages": [{"role": "user", "content": "hello"}]}, "no assistant turn"),
    ],
)
def test_wrong_schema_gives_a_short_reason(row, reason):
    with pytest.raises(RowError) as err:
        normalize_messages(row)
    assert err.value.reason == reason
