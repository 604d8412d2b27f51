"""The cache's bulk path for token-id rows: it takes the clean rows, and every edge case ends exactly as in the loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from nemo_automodel_dspark.data import cache_build, fast_ids
from nemo_automodel_dspark.data.byte_table import ByteTable
from nemo_automodel_dspark.data.chat import _decode, split_reasoning
from nemo_automodel_dspark.data.dataset import DSparkChatDataset

SEQ = 64


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _parts(tokenizer, response: list[int], user: str = "hello") -> tuple[list[dict], list[int]]:
    """(messages whose answer is the response decoded, prompt ids)."""
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": ""}]
    messages[-1]["content"] = split_reasoning(tokenizer.decode(response, skip_special_tokens=True))[1]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    return messages, _encode(tokenizer, prompt)


def _line(messages, prompt: str, response: str, *, extra: str = "", first: str = "prompt_ids", ascii=True) -> str:
    """A JSONL line with the id lists written verbatim (to plant odd formatting)."""
    second = "response_ids" if first == "prompt_ids" else "prompt_ids"
    values = {"prompt_ids": prompt, "response_ids": response}
    lists = f'"{first}": {values[first]}, "{second}": {values[second]}'
    return f'{{"messages": {json.dumps(messages, ensure_ascii=ascii)}, {lists}{extra}}}'


def _rows(tokenizer) -> list[str]:
    """Clean token-id rows in several layouts among every kind of row the bulk path must leave to the reference."""
    eos, pad, mask_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|mask|>"))
    ok_response = _encode(tokenizer, "hello world.") + [eos]
    messages, prompt = _parts(tokenizer, ok_response)
    p, r = json.dumps(prompt), json.dumps(ok_response)
    compact = lambda ids: json.dumps(ids, separators=(",", ":"))  # noqa: E731
    accents = _encode(tokenizer, "héllo wörld ✓") + [eos]
    split_char = _encode(tokenizer, "hé")[:-1] + [eos]  # bytes that are not UTF-8: decoded lossily
    long_answer = _encode(tokenizer, " ".join(["the answer is two plus four"] * 8)) + [eos]
    wrong = [dict(m) for m in messages]
    wrong[-1]["content"] = "goodbye."
    answer = messages[1]["content"]
    return [
        _line(messages, p, r),
        _line(messages, compact(prompt), compact(ok_response), first="response_ids"),
        _line(messages, "[ " + p[1:-1].replace(", ", " ,\t") + " ]", r),  # other JSON blanks: the reference's
        _line(_parts(tokenizer, accents)[0], p, json.dumps(accents)),
        _line(_parts(tokenizer, accents)[0], p, json.dumps(accents), ascii=False),  # UTF-8 in the line
        _line(_parts(tokenizer, split_char)[0], p, json.dumps(split_char)),
        _line(_parts(tokenizer, long_answer)[0], p, json.dumps(long_answer)),  # truncated to SEQ
        _line(messages, "[0" + p[1:], r),  # a leading zero: invalid JSON
        _line(messages, p[:-1] + ", 007]", r),
        _line(messages, "[0, 0, " + p[1:], r),  # the id 0, twice: used
        _line(messages, p[:-1] + ", 1.0]", r),  # a float id
        _line(messages, p[:-1] + ", -1]", r),
        _line(messages, "[true, " + p[1:], r),  # a bool is an int to the loop: used
        _line(messages, p[:-1] + ", 99999999999999999999]", r),
        _line(messages, p[:-1] + ", 999999999]", r),  # outside the vocabulary
        _line(messages, p[:-1] + ", 4294967297]", r),  # 2**32 + 1: read as 1 in int32
        _line(messages, "[]", r),
        _line(messages, p, r[:-1] + ",]"),  # trailing comma: invalid JSON
        _line(messages, p, r, extra=', "prompt_ids": ' + p),  # a duplicate key: the last one counts
        _line(messages, "[5]", r, extra=', "prompt_ids": ' + p),
        _line(messages, p, r).replace('"prompt_ids"', '"prompt\\u005fids"'),
        _line([{"role": "user", "content": 'say "prompt_ids'}, messages[1]], p, r),
        _line(messages, p, r).replace('"assistant"', '"robot"'),
        _line(messages[:1], p, r),  # no final assistant message
        _line(messages, p, json.dumps(_encode(tokenizer, "hello") + [eos] + _encode(tokenizer, " world.") + [eos])),
        _line(messages, p, json.dumps(ok_response + [pad, pad])),
        _line(messages, p, json.dumps(_encode(tokenizer, "hello") + [mask_id] + ok_response)),
        _line(wrong, p, r),  # the answer is not what the ids say
        _line(messages, json.dumps(prompt * 12), r),  # nothing supervised after truncation
        _line(messages, "null", r),
        '{"messages": ' + json.dumps(messages) + ', "prompt_ids": ' + p + ', "response_ids": "' + r + '"}',
        "\ufeff" + _line(messages, p, r),  # a byte-order mark opens the line
        _line(messages, p, r) + "\r",  # CRLF line ending
        "",
        "   ",
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "paris."}]}),
        _line(messages, p, r)[:-1],  # cut short
        _line(messages, p, r),
        # messages that are not plain {"role", "content"} pairs: normalize_messages decides, as in the loop
        _line([{**messages[0], "name": "bob"}, messages[1]], p, r),
        _line([messages[0], {**messages[1], "reasoning_content": "think"}], p, r),
        _line([messages[0], {"role": "assistant", "content": [{"type": "text", "text": answer}]}], p, r),
        _line([messages[0], {"role": "assistant", "content": None}], p, r),
        '{"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": '
        + json.dumps(messages[1]["content"])
        + "}], "
        + f'"prompt_ids": {p}, "response_ids": {r}}}',
    ]


def _write(tmp_path, lines: list[str], invalid_utf8: bool = True):
    path = tmp_path / "rows.jsonl"
    data = "\n".join(lines).encode()
    if invalid_utf8:
        data += b'\n{"messages": [{"role": "user", "content": "\xff"}]}\n'
    path.write_bytes(data + b"\n" + lines[0].encode())  # the last line without a newline
    return str(path)


def _same(a: DSparkChatDataset, b: DSparkChatDataset) -> None:
    assert len(a) == len(b) and a.lengths() == b.lengths() and a.report() == b.report()
    assert list(a.skipped.items()) == list(b.skipped.items()) and a.first_skipped == b.first_skipped
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["loss_mask"], y["loss_mask"])


@pytest.mark.parametrize(("num_proc", "chunk_bytes"), [(1, 1 << 20), (2, 700), (1, 1)])
def test_every_edge_case_ends_as_in_the_loop(tmp_path, tokenizer, monkeypatch, num_proc, chunk_bytes):
    monkeypatch.setattr(cache_build, "CHUNK_BYTES", chunk_bytes)  # chunks of one line, a few lines, all
    path = _write(tmp_path, _rows(tokenizer))
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    loop = DSparkChatDataset(path, tokenizer, SEQ, mask_token_id=mask_id)
    cached = DSparkChatDataset(
        path, tokenizer, SEQ, mask_token_id=mask_id, cache_dir=str(tmp_path / "c"), num_proc=num_proc
    )
    _same(cached, loop)
    assert loop.num_token_ids == 21 and loop.num_truncated == 1 and len(loop) == 22
    assert sum(loop.skipped.values()) == 22 and len(loop.skipped) == 13 and loop.skipped["not UTF-8 text"] == 1


def test_clean_token_id_rows_never_reach_the_per_row_function(tmp_path, tokenizer, monkeypatch):
    rows = [row for i, row in enumerate(_rows(tokenizer)[:7]) if i != 2]  # not the one with tabs in its lists
    path = _write(tmp_path, rows * 3, invalid_utf8=False)
    reference = []
    monkeypatch.setattr(cache_build, "tokenize_row", lambda *a: reference.append(a) or pytest.fail("per-row path"))
    monkeypatch.setattr(fast_ids, "normalize_messages", lambda *a: pytest.fail("plain messages need no copy"))
    cached = DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(tmp_path / "c"))
    assert len(cached) == 19 and cached.num_token_ids == 19 and not reference
    monkeypatch.undo()
    _same(cached, DSparkChatDataset(path, tokenizer, SEQ))


@pytest.mark.parametrize("mask_reasoning", [False, True])
def test_reasoning_and_non_special_end_tokens_as_in_the_loop(tmp_path, qwen3_tokenizer, mask_reasoning):
    """Think tags the decoder keeps; an end token it keeps too (the loop then tries the response without it)."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=qwen3_tokenizer.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = qwen3_tokenizer.chat_template
    kept_end = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</think>")
    kept_end.chat_template = tok.chat_template
    eos = tok.eos_token_id
    responses = [
        _encode(tok, "<think>\nplan\n</think>\n\nparis.") + [eos],
        _encode(tok, "<think>\nplan cut"),
        _encode(tok, "paris.") + [eos],
        _encode(tok, "paris.") + [kept_end.eos_token_id],
    ]
    for t in (tok, kept_end):
        lines = []
        for response in responses:
            messages, prompt = _parts(t, response)
            lines.append(_line(messages, json.dumps(prompt), json.dumps(response)))
        path = _write(tmp_path, lines, invalid_utf8=False)
        loop = DSparkChatDataset(path, t, SEQ, mask_reasoning_content=mask_reasoning)
        cached = DSparkChatDataset(
            path, t, SEQ, mask_reasoning_content=mask_reasoning, cache_dir=str(tmp_path / "c"), num_proc=1
        )
        _same(cached, loop)
        # used: all 5 lines; with </think> as the end token, not the two rows that hold it before their end
        # token; with reasoning masked, not the rows whose whole answer is reasoning
        assert (
            len(loop)
            == {(False, False): 5, (True, False): 3, (False, True): 3, (True, True): 1}[t is kept_end, mask_reasoning]
        )


@pytest.mark.parametrize("think_special", [True, False])
def test_byte_table_decodes_as_the_tokenizer(tokenizer, qwen3_tokenizer, think_special):
    tok = tokenizer if think_special else qwen3_tokenizer
    table = ByteTable.of(tok)
    assert table is not None and not table.unsafe.any()
    rng = np.random.default_rng(0)
    responses = [rng.integers(0, len(tok), size=n) for n in (1, 2, 7, 30, 200)]
    responses += [np.asarray(_encode(tok, "héllo wörld ✓ <think>x</think>") + [tok.eos_token_id])]
    expected = [_decode(tok, r.tolist(), skip_special_tokens=True) for r in responses]
    texts = table.texts(responses + [np.zeros(0, np.int64)])
    assert texts[-1] is None  # an empty list is left to the tokenizer
    for text, want in zip(texts, expected, strict=False):
        assert text is None and "\ufffd" in want or text == want
    assert texts[-2] == expected[-1]  # valid UTF-8: decoded by the table


def test_the_table_is_an_arrow_stream_datasets_reads(tmp_path, tokenizer):
    import datasets

    path = _write(tmp_path, _rows(tokenizer)[:6], invalid_utf8=False)
    cached = DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(tmp_path / "c"))
    (table,) = list((tmp_path / "c").glob("*/rows.arrow"))
    rows = datasets.Dataset.from_file(str(table))
    assert len(rows) == len(cached) == 7
    assert [list(r["input_ids"]) for r in rows] == [cached[i]["input_ids"].tolist() for i in range(len(cached))]
    with pytest.raises(IndexError):
        cached[len(cached)]


def test_without_a_byte_table_the_tokenizer_decodes(tmp_path, tokenizer, monkeypatch):
    """A decoder that is not byte-level (table None): `decode_batch` checks the responses, same rows as the loop."""
    from nemo_automodel_dspark.data import fast_ids

    monkeypatch.setattr(fast_ids.ByteTable, "of", classmethod(lambda cls, tok: None))
    path = _write(tmp_path, _rows(tokenizer))
    loop = DSparkChatDataset(path, tokenizer, SEQ)
    _same(DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(tmp_path / "c")), loop)
    assert loop.num_token_ids == 21


def test_an_unsafe_id_leaves_its_row_to_the_tokenizer(tokenizer):
    table = ByteTable.of(tokenizer)
    assert table is not None
    hello = np.asarray(_encode(tokenizer, "hello world."))
    table.unsafe[hello[1]] = True  # as if this id's bytes disagreed with the tokenizer
    texts = table.texts([hello, hello[:1], hello[2:]])
    assert texts[0] is None and texts[1] == _decode(tokenizer, hello[:1].tolist())
    assert texts[2] == _decode(tokenizer, hello[2:].tolist())


def test_a_blank_field_is_no_zero(tmp_path, tokenizer):
    """numpy reads a field of blanks as 0 (`1, ,2`, a trailing `, `), one digit more than its text: a leading zero
    elsewhere in the block (`04`) must not make the digit totals agree. All these lines are invalid JSON."""
    rows = _rows(tokenizer)
    messages, prompt = _parts(tokenizer, _encode(tokenizer, "hello world.") + [tokenizer.eos_token_id])
    p, r = json.dumps(prompt), json.dumps(_encode(tokenizer, "hello world.") + [tokenizer.eos_token_id])
    lines = [
        _line(messages, p[:-1] + ", ,04]", r),  # one row: the blank field and the leading zero
        _line(messages, "[01, " + p[1:-1] + ", ]", r),  # a trailing blank field
        _line(messages, p[:-1] + ", , 5]", r),  # two rows of one block: blank field here ...
        _line(messages, "[07, " + p[1:], r),  # ... leading zero there
        rows[0],
    ]
    path = _write(tmp_path, lines, invalid_utf8=False)  # and lines[0] again, last
    loop = DSparkChatDataset(path, tokenizer, SEQ)
    _same(DSparkChatDataset(path, tokenizer, SEQ, cache_dir=str(tmp_path / "c")), loop)
    assert len(loop) == 1 and sum(loop.skipped.values()) == 5
