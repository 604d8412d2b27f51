"""Token-id rows in bulk: the cache build's fast path for JSONL rows carrying `prompt_ids`/`response_ids`.

`chat.tokenize_row` is the reference. This module returns the same tokens for the rows it can prove clean and
`None` for every other row, which the build then gives to `tokenize_row`; so the cache's rows, skip reasons and
counts are the per-row loop's by construction, and only the clean rows (nearly all of a regenerated dataset) are
fast:

* **Reading.** The value after each key's last occurrence in the raw line must be a `[...]` of digits and commas
  (a blank after a comma allowed, as `json.dumps` writes). Both lists are cut out and replaced by a random sentinel
  string; the rest of the line is parsed by `json.loads` and checked by `normalize_messages`, exactly as the loop
  reads it. The sentinel comes back as the top-level value of both keys only if the cut lists were those values.
* **Ids.** The lists of a block of rows are parsed by one numpy call and checked together: JSON integers only (each
  field 1 to 9 digits without a leading zero: no empty field, nothing int32 cannot hold), ids in [0, vocab), no
  end/pad token before the last one, no mask token in the response, a prompt shorter than seq_length, and no
  <think>/</think> token under mask_reasoning_content (those rows take the reference path).
* **Decoding.** The response must decode to the final assistant message (as the reference checks): by a byte table
  when the tokenizer's decoder is byte-level (`ByteTable`), else by the tokenizer's `decode_batch`.
"""

from __future__ import annotations

import json
import re
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from nemo_automodel_dspark.data.byte_table import ByteTable, decode_many
from nemo_automodel_dspark.data.chat import (
    EMPTY_ANSWER,
    THINK_CLOSE,
    THINK_OPEN,
    TOKEN_IDS,
    TRUNCATED,
    RowOptions,
    RowTokens,
    _single_token_id,
    split_reasoning,
)
from nemo_automodel_dspark.data.sources import ROLES, TOKEN_ID_KEYS, RowError, normalize_messages

_KEYS = tuple(f'"{key}"'.encode() for key in TOKEN_ID_KEYS)
_LIST_OPEN = re.compile(rb"[ \t\r]*:[ \t\r]*\[")  # after a key: the colon and the list's bracket (JSON blanks)


@dataclass(frozen=True)
class IdContext:
    """What the fast path needs, made once per build (`id_context`)."""

    tokenizer: Any
    vocab: int
    seq_length: int
    ends: np.ndarray  # end and pad ids: only allowed as a response's last token
    last_specials: np.ndarray  # ids after which the reference also tries the response without its last token
    banned: np.ndarray  # ids that send a response to the reference: mask token, <think>, </think>
    watched: np.ndarray  # ends and banned: the ids `_check_ids` looks at one by one
    sentinel: str
    table: ByteTable | None


def id_context(tokenizer: Any, options: RowOptions) -> IdContext | None:
    """The fast path's context, or None where every row must take the reference path (reasoning masking with
    <think>/</think> that are not single tokens: there the reference decodes the response to look for them)."""
    banned = [] if options.mask_token_id is None else [options.mask_token_id]
    if options.mask_reasoning_content:
        tags = [_single_token_id(tokenizer, tag) for tag in (THINK_OPEN, THINK_CLOSE)]
        if None in tags:
            return None
        banned += [t for t in tags if t is not None]
    ends = sorted({tokenizer.eos_token_id, tokenizer.pad_token_id} - {None})
    return IdContext(
        tokenizer=tokenizer,
        vocab=len(tokenizer),
        seq_length=options.seq_length,
        ends=np.asarray(ends, np.int64),
        last_specials=np.asarray(sorted({*ends, *tokenizer.all_special_ids}), np.int64),
        banned=np.asarray(banned, np.int64),
        watched=np.asarray(sorted({*ends, *banned}), np.int64),
        sentinel="#dspark-" + secrets.token_hex(16),
        table=ByteTable.of(tokenizer),
    )


def tokenize_id_lines(lines: list[bytes], ctx: IdContext) -> list[RowTokens | None]:
    """Each JSONL line's tokens when the fast path proves them equal to `tokenize_row`'s, else None."""
    out: list[RowTokens | None] = [None] * len(lines)
    rows, regions, contents = [], [], []
    marker = json.dumps(ctx.sentinel).encode()
    for i, line in enumerate(lines):
        parsed = _read(line, marker, ctx.sentinel)
        if parsed is not None:
            rows.append(i)
            regions += parsed[1]
            contents.append(parsed[0])
    if not rows:
        return out
    values, counts, ok = _parse_lists(regions)  # counts [2n]: prompt, response of row 0, then row 1, ...
    both_ok = np.asarray(ok.reshape(-1, 2).all(axis=1))  # [n]
    good, starts = _check_ids(values, counts.reshape(-1, 2), both_ok, ctx)
    good &= _decodes_to(values, counts.reshape(-1, 2), starts, good, contents, ctx)
    for j in np.flatnonzero(good).tolist():
        prompt, response = int(counts[2 * j]), int(counts[2 * j + 1])
        length = min(prompt + response, ctx.seq_length)
        mask = np.zeros(length, np.int8)  # [L]
        mask[prompt:] = 1
        flags = TOKEN_IDS | (TRUNCATED if prompt + response > ctx.seq_length else 0)
        flags |= EMPTY_ANSWER if not contents[j].strip() else 0
        ids = values[starts[j] : starts[j] + length]
        out[rows[j]] = RowTokens(ids, mask, flags)
    return out


def _read(line: bytes, marker: bytes, sentinel: str) -> tuple[str, list[bytes]] | None:
    """(final assistant content, [prompt list text, response list text]) of a line the loop would read as a
    token-id row whose messages are valid; None for anything else (the reference decides).

    The last occurrence of each key is cut (Python keeps a repeated key's last value); if it was not the row's own
    key, the row's value is not the sentinel."""
    spans = []
    for key in _KEYS:
        at = line.rfind(key)
        opened = _LIST_OPEN.match(line, at + len(key)) if at >= 0 else None
        close = line.find(b"]", opened.end()) if opened else -1
        if opened is None or close < 0:
            return None
        spans.append((opened.end() - 1, close + 1))
    (a0, a1), (b0, b1) = sorted(spans)
    if a1 > b0:
        return None
    try:
        row = json.loads(b"".join((line[:a0], marker, line[a1:b0], marker, line[b1:])))
    except ValueError:
        return None
    if not isinstance(row, dict) or row.get(TOKEN_ID_KEYS[0]) != sentinel or row.get(TOKEN_ID_KEYS[1]) != sentinel:
        return None
    messages = row.get("messages")
    if not _plain(messages):  # the common case needs no copy: normalize_messages would return these messages
        try:
            messages = normalize_messages(row)
        except RowError:
            return None
    assert messages is not None
    if messages[-1]["role"] != "assistant":
        return None
    return messages[-1]["content"], [line[s + 1 : e - 1] for s, e in spans]


def _plain(messages: Any) -> bool:
    """OpenAI messages that are exactly {"role": one of ROLES, "content": a string}, with an assistant turn: what
    `normalize_messages` returns unchanged."""
    if type(messages) is not list or not messages:
        return False
    plain = all(
        type(m) is dict and len(m) == 2 and m.get("role") in ROLES and type(m.get("content")) is str for m in messages
    )
    return plain and any(m["role"] == "assistant" for m in messages)


def _parse_lists(regions: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values [sum counts] int32, counts [R] int64, ok [R] bool) of the list texts; a list that is not JSON integers
    (one blank allowed between a comma and a digit) is not ok (count 0). Parsed in one call when all are clean, else
    halved until the bad ones are alone."""
    joined = b",".join(regions)
    if all(regions) and not joined.translate(None, b"0123456789, "):
        text = np.frombuffer(joined, np.uint8)
        comma = text == ord(",")
        if _fields_exact(text, comma, text == ord(" ")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    values = np.fromstring(joined, dtype=np.int32, sep=",")  # type: ignore[call-overload]
                except ValueError:
                    values = np.zeros(0, np.int32)
            firsts = np.cumsum([0] + [len(r) + 1 for r in regions[:-1]])  # [R] each list's first character
            counts = np.add.reduceat(comma, firsts, dtype=np.int64)  # [R] commas to the next list's first character
            counts[-1] += 1  # = fields: each list but the last also counts the comma joining it to the next
            if len(values) == counts.sum():
                return values, counts, np.ones(len(regions), bool)
    if len(regions) == 1:
        return np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(1, bool)
    half = len(regions) // 2
    parts = [_parse_lists(regions[:half]), _parse_lists(regions[half:])]
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]


def _fields_exact(text: np.ndarray, comma: np.ndarray, blank: np.ndarray) -> bool:
    """Text of digits, commas and blanks whose every comma-separated field is one optional blank, then 1 to 9 digits
    without a leading zero: a JSON integer that numpy's int32 parse reads exactly (it would read an empty or blank
    field as 0, and wrap or saturate a longer number). `comma`, `blank`: [T] where text is one."""
    if comma[0] or comma[-1] or blank[0] or blank[-1] or (comma[1:] & comma[:-1]).any():  # an empty field
        return False
    if (blank[1:] > comma[:-1]).any() or (blank[:-1] & (comma[1:] | blank[1:])).any():  # a blank not ", <digit>"
        return False
    digit = ~(comma | blank)
    first = np.concatenate([[True], ~digit[:-1]])  # [T] the character starts a number if it is a digit
    if (first[:-1] & (text[:-1] == ord("0")) & digit[1:]).any():  # a leading zero
        return False
    runs = digit[:-1] & digit[1:]  # [T - 1] two digits from here on; then 4, 8 and 10
    runs = runs[:-2] & runs[2:]
    runs = runs[:-4] & runs[4:]
    return not (runs[:-2] & runs[2:]).any()


def _check_ids(values: np.ndarray, counts: np.ndarray, ok: np.ndarray, ctx: IdContext) -> tuple[np.ndarray, ...]:
    """(good [n] bool, starts [n]: first value of each row's prompt) — rows whose ids pass every id rule."""
    totals = counts.sum(axis=1)  # [n]
    starts = np.cumsum(totals) - totals  # [n]
    good = ok & (counts > 0).all(axis=1) & (counts[:, 0] < ctx.seq_length)
    suspects = np.flatnonzero((values >= ctx.vocab) | np.isin(values, ctx.watched))  # [hits] rare ids only
    rows = np.searchsorted(starts, suspects, side="right") - 1
    position = suspects - starts[rows] - counts[rows, 0]  # index within the response, < 0 in the prompt
    hit = values[suspects]
    bad = (hit >= ctx.vocab) | ((position >= 0) & np.isin(hit, ctx.banned))
    bad |= (position >= 0) & (position < counts[rows, 1] - 1) & np.isin(hit, ctx.ends)
    good[rows[bad]] = False
    return good, starts


def _decodes_to(
    values: np.ndarray, counts: np.ndarray, starts: np.ndarray, good: np.ndarray, contents: list[str], ctx: IdContext
) -> np.ndarray:
    """[n] bool: the good rows whose response decodes (skipping special tokens) to the final assistant message, as
    it is or without its last token when that is an end or special token (the reference's two candidates)."""
    rows = np.flatnonzero(good)
    responses = [values[starts[j] + counts[j, 0] : starts[j] + counts[j].sum()] for j in rows.tolist()]
    texts = _texts(responses, ctx)
    match = np.zeros(len(counts), bool)
    retry = []
    for j, text, response in zip(rows.tolist(), texts, responses, strict=True):
        if split_reasoning(text)[1] == contents[j]:
            match[j] = True
        elif response[-1] in ctx.last_specials:
            retry.append(j)
    shorter = [values[starts[j] + counts[j, 0] : starts[j] + counts[j].sum() - 1] for j in retry]
    for j, text in zip(retry, _texts(shorter, ctx), strict=True):
        match[j] = split_reasoning(text)[1] == contents[j]
    return match


def _texts(responses: list[np.ndarray], ctx: IdContext) -> list[str]:
    """Decoded responses (special tokens skipped): by table where it can, the rest by the tokenizer."""
    texts: list[str | None] = ctx.table.texts(responses) if ctx.table is not None else [None] * len(responses)
    missing = [i for i, text in enumerate(texts) if text is None]
    for i, text in zip(missing, decode_many(ctx.tokenizer, [responses[i] for i in missing]), strict=True):
        texts[i] = text
    return texts  # type: ignore[return-value]
