"""Render one conversation with a chat template and mark the assistant tokens the draft is trained on.

The training text is always the whole conversation rendered once, tokenised once (so `input_ids` are exactly what
`apply_chat_template` gives). Which tokens are supervised is decided in one of two ways:

* **Generation tags.** A template with `{% generation %}` blocks says itself what the assistant generates; we use
  `apply_chat_template(..., return_assistant_tokens_mask=True)`.
* **Prefix rendering** (every other template). Assistant turn `i` is the text that `messages[: i + 1]` adds to
  `messages[:i]` rendered with a generation prompt: the role header is part of the prompt, the content and the
  end-of-turn token are what the model generates. Comparison is on characters, not tokens, so BPE merges at a
  boundary cannot misalign it; tokens are mapped to characters through the tokenizer's offsets.
  Some templates render a turn differently once later turns follow (Qwen3 drops the reasoning of earlier turns),
  so the prefix is not always a prefix of the whole conversation. Then the turn is located as the text that
  removing it from the whole conversation takes away (same head, same tail); if neither works the row is
  skipped ("cannot locate an assistant turn") rather than trained on a guessed mask. Whitespace after the
  end-of-turn token (Qwen's "\n" after `<|im_end|>`) is not supervised: the model stops at the end token, and
  this keeps both methods in agreement. An assistant message at index 0 has no prompt and is context only.

**The target's own ids.** A row that `dspark regenerate` wrote with a local target also carries `prompt_ids` (what
the target read) and `response_ids` (what it wrote, up to and including its end token). Such a row is used as those
ids, not re-tokenised: a model's output is often not the tokenizer's canonical segmentation of its own text (tiny
models do this all the time, large ones now and then), and the draft must learn the token stream it will meet when
decoding. The response is supervised; the prompt, earlier assistant turns included, is context.

`mask_reasoning_content=True` also removes `<think>…</think>` blocks (with the whitespace after them; an unclosed
block runs to the end of the turn) and the literal text of `reasoning_content` fields from the supervision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import jinja2
import numpy as np

from nemo_automodel_dspark.data.render import render_text, resolve_chat_template
from nemo_automodel_dspark.data.sources import TOKEN_ID_KEYS, RowError, has_token_ids, normalize_messages, token_id_list

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + r".*?(?:" + re.escape(THINK_CLOSE) + r"\s*|\Z)", re.DOTALL)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Span = tuple[int, int]  # [start, end) character offsets into the rendered text


@dataclass(frozen=True)
class TokenizedRow:
    """One conversation: `input_ids` [L] and `loss_mask` [L] (1 on supervised tokens), L <= seq_length."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False


# Facts about one used row, as bits of `RowTokens.flags` (the dataset's accounting sums them).
TRUNCATED, TOKEN_IDS, EMPTY_ANSWER, MASK_TOKEN_HIT = 1, 2, 4, 8


@dataclass(frozen=True)
class RowOptions:
    """Everything besides the row and the tokenizer that decides a row's tokens (and the tokenised cache's key)."""

    template: str  # the resolved chat template text
    seq_length: int
    mask_reasoning_content: bool = False
    mask_token_id: int | None = None


@dataclass(frozen=True)
class RowTokens:
    input_ids: np.ndarray  # [L] int32
    loss_mask: np.ndarray  # [L] int8, 1 on supervised tokens
    flags: int  # TRUNCATED | TOKEN_IDS | EMPTY_ANSWER | MASK_TOKEN_HIT


def tokenize_row(row: dict[str, Any], tokenizer: Any, options: RowOptions) -> RowTokens:
    """One chat row → its tokens: the target's own ids when it carries them, else the rendered conversation.

    A row that cannot be used raises RowError (the caller counts it as skipped); a supervised `mask_token_id` is
    only flagged (MASK_TOKEN_HIT), since that is an error of the whole dataset, not of the row.
    """
    messages = normalize_messages(row)
    flags = EMPTY_ANSWER if not str(messages[-1].get("content") or "").strip() else 0
    if has_token_ids(row):
        tokenized = tokenize_token_ids(
            row,
            messages,
            tokenizer,
            options.seq_length,
            mask_reasoning_content=options.mask_reasoning_content,
            mask_token_id=options.mask_token_id,
        )
        flags |= TOKEN_IDS
    else:
        tokenized = tokenize_conversation(
            messages,
            tokenizer,
            options.seq_length,
            chat_template=options.template,
            mask_reasoning_content=options.mask_reasoning_content,
        )
    ids, mask = np.asarray(tokenized.input_ids, np.int32), np.asarray(tokenized.loss_mask, np.int8)
    if options.mask_token_id is not None and bool(((ids == options.mask_token_id) & (mask != 0)).any()):
        flags |= MASK_TOKEN_HIT
    return RowTokens(ids, mask, flags | (TRUNCATED if tokenized.truncated else 0))


def has_generation_tags(template: str) -> bool:
    """True when the template marks assistant output with `{% generation %}` blocks."""
    return _GENERATION_TAG.search(template) is not None


def tokenize_conversation(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    seq_length: int,
    *,
    chat_template: str | None = None,
    mask_reasoning_content: bool = False,
) -> TokenizedRow:
    """Tokenise a normalised conversation; loss_mask is 1 exactly on assistant content + end-of-turn tokens."""
    template = resolve_chat_template(tokenizer, chat_template)
    if has_generation_tags(template):
        input_ids, offsets, mask = _encode_with_generation_tags(tokenizer, messages, template)
        text = render_text(tokenizer, messages, template) if mask_reasoning_content else ""
        turns = _supervised_runs(offsets, mask)
    else:
        text = render_text(tokenizer, messages, template)
        turns = [_turn_span(tokenizer, messages, i, template, text) for i in _assistant_turns(messages)]
        input_ids, offsets = _encode(tokenizer, text)
        mask = [int(hit) for hit in _token_hits(offsets, turns, len(text))]
    if mask_reasoning_content:
        reasoning = _token_hits(offsets, _reasoning_spans(text, turns, messages), len(text))
        mask = [m * (not hit) for m, hit in zip(mask, reasoning, strict=True)]
    return _truncate(input_ids, mask, seq_length)


def tokenize_token_ids(
    row: dict[str, Any],
    messages: list[dict[str, Any]],
    tokenizer: Any,
    seq_length: int,
    *,
    mask_reasoning_content: bool = False,
    mask_token_id: int | None = None,
) -> TokenizedRow:
    """A row with the target's own `prompt_ids` + `response_ids` → those ids, loss_mask 1 on the response.

    The response must decode to the row's final assistant message, which catches ids made with another tokenizer
    and rows edited after regeneration; an end/pad token may only be its last token; a response in which the
    target wrote `mask_token_id` cannot be trained on. Each is a RowError (the dataset reports the first line).
    The chat template plays no part: the prompt is what the target read.
    """
    vocab = len(tokenizer)
    prompt, response = (token_id_list(row, key, vocab) for key in TOKEN_ID_KEYS)
    if not prompt or not response:
        raise RowError("empty prompt_ids or response_ids")
    if messages[-1]["role"] != "assistant":
        raise RowError("response_ids without a final assistant message")
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    if ends.intersection(response[:-1]):
        raise RowError("response_ids hold an end or pad token before their last token")
    if mask_token_id is not None and mask_token_id in response:
        raise RowError("the target wrote mask_token_id in response_ids")
    candidates = [response]
    if response[-1] in ends or response[-1] in tokenizer.all_special_ids:  # an end token decoding may not skip
        candidates.append(response[:-1])
    content = messages[-1]["content"]
    if all(split_reasoning(_decode(tokenizer, ids, skip_special_tokens=True))[1] != content for ids in candidates):
        raise RowError("response_ids do not decode to the final assistant message (another tokenizer?)")
    mask = [0] * len(prompt) + [1] * len(response)
    if mask_reasoning_content:
        reasoning_end = _reasoning_end(tokenizer, response)
        mask[len(prompt) : len(prompt) + reasoning_end] = [0] * reasoning_end
    return _truncate(prompt + response, mask, seq_length)


def _decode(tokenizer: Any, ids: list[int], *, skip_special_tokens: bool = False) -> str:
    """`tokenizer.decode` of a flat list of ints without its per-token Python conversion (`to_py_obj`), which costs
    more than the decoding itself; the same text, since `decode` does nothing else before `_decode`."""
    decode = getattr(tokenizer, "_decode", None)
    if decode is None:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return decode(token_ids=ids, skip_special_tokens=skip_special_tokens)


def _reasoning_end(tokenizer: Any, response: list[int]) -> int:
    """Tokens of `response` up to its first `</think>` and the whitespace after it (where `split_reasoning` splits);
    all of it when a `<think>` is never closed (cut by max_new_tokens), as the text path does; 0 without one."""
    think_open, close = (_single_token_id(tokenizer, tag) for tag in (THINK_OPEN, THINK_CLOSE))
    if think_open is None or close is None:
        if THINK_OPEN in _decode(tokenizer, response):
            raise RowError(f"cannot mask reasoning in response_ids: {THINK_OPEN}, {THINK_CLOSE} are not single tokens")
        return 0
    if close not in response:
        return len(response) if think_open in response else 0
    end = response.index(close) + 1
    while end < len(response) and not tokenizer.decode([response[end]]).strip():
        end += 1
    return end


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    token = tokenizer.convert_tokens_to_ids(text)
    return token if isinstance(token, int) and tokenizer.decode([token]) == text else None


def _truncate(input_ids: list[int], mask: list[int], seq_length: int) -> TokenizedRow:
    if not any(mask):
        raise RowError("no supervised token")
    truncated = len(input_ids) > seq_length
    input_ids, mask = input_ids[:seq_length], mask[:seq_length]
    if not any(mask):
        raise RowError("nothing supervised after truncation")
    return TokenizedRow(input_ids=input_ids, loss_mask=mask, truncated=truncated)


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[Span]]:
    """Token ids of the rendered text (no extra BOS/EOS: the template has its own) and their character offsets."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def _encode_with_generation_tags(
    tokenizer: Any, messages: list[dict[str, Any]], template: str
) -> tuple[list[int], list[Span], list[int]]:
    try:
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            tokenizer_kwargs={"return_offsets_mapping": True},
        )
    except jinja2.TemplateError as err:
        raise RowError(f"chat template error: {str(err)[:80]}") from err
    offsets = [tuple(o) for o in out["offset_mapping"]]
    return list(out["input_ids"]), offsets, [int(m) for m in out["assistant_masks"]]


def _assistant_turns(messages: list[dict[str, Any]]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]


def _turn_span(tokenizer: Any, messages: list[dict[str, Any]], i: int, template: str, full: str) -> Span:
    """Character span of assistant turn i inside `full`: after its role header, up to its end-of-turn token."""
    before = render_text(tokenizer, messages[:i], template)
    prompt = render_text(tokenizer, messages[:i], template, generation_prompt=True)
    upto = render_text(tokenizer, messages[: i + 1], template)
    start = _common_prefix_len(prompt, upto)  # where the turn leaves its generation prompt
    if full.startswith(upto) and start >= len(before):
        return _rstrip(full, start, len(upto))
    # Rendered differently once later turns follow: the turn is what removing it takes away (same head and tail).
    without = render_text(tokenizer, messages[:i] + messages[i + 1 :], template)
    tail = without[len(before) :]
    start, end = _common_prefix_len(full, prompt), len(full) - len(tail)
    if without.startswith(before) and full.endswith(tail) and len(before) <= start <= end:
        return _rstrip(full, start, end)
    raise RowError("cannot locate an assistant turn in the rendered chat")


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _rstrip(text: str, start: int, end: int) -> Span:
    """Drop whitespace that follows the end-of-turn token: the model stops at the token and never generates it."""
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _token_hits(offsets: list[Span], spans: list[Span], num_chars: int) -> list[bool]:
    """hits[t] is True iff token t's character range overlaps any span."""
    marked = bytearray(num_chars + 1)
    for start, end in spans:
        marked[start:end] = b"\x01" * (end - start)
    before = list(accumulate(marked, initial=0))  # before[c] = marked characters in [0, c)
    return [before[end] > before[start] for start, end in offsets]


def _supervised_runs(offsets: list[Span], mask: list[int]) -> list[Span]:
    """Character spans of the maximal runs of supervised tokens (one per assistant turn)."""
    runs: list[Span] = []
    for t, m in enumerate(mask):
        if not m:
            continue
        if t > 0 and mask[t - 1]:
            runs[-1] = (runs[-1][0], offsets[t][1])
        else:
            runs.append(offsets[t])
    return runs


def _reasoning_spans(text: str, turns: list[Span], messages: list[dict[str, Any]]) -> list[Span]:
    """Reasoning inside the assistant turns: <think> blocks, and the rendered text of `reasoning_content` fields."""
    spans = [m.span() for start, end in turns for m in _THINK_BLOCK.finditer(text, start, end)]
    fields = [m["reasoning_content"].strip() for m in messages if m.get("reasoning_content", "").strip()]
    for field in fields:  # templates that render reasoning without <think> tags
        hit = next((pos for start, end in turns if (pos := text.find(field, start, end)) >= 0), -1)
        if hit >= 0:
            spans.append((hit, hit + len(field)))
    return spans


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split a raw generation into (reasoning, content) at `</think>`, as Qwen3-style templates render them back."""
    if "</think>" not in text:
        return None, text
    reasoning, content = text.split("</think>", 1)
    reasoning = reasoning.split("<think>", 1)[-1].strip("\n")
    return reasoning, content.lstrip("\n")
