"""Loss masks from chat templates: exactly the assistant's content + end-of-turn token, whatever the template style."""

from __future__ import annotations

import pytest

from nemo_automodel_dspark.data.chat import TokenizedRow, has_generation_tags, tokenize_conversation
from nemo_automodel_dspark.data.sources import RowError

END = "<|im_end|>"


def supervised_text(tokenizer, row: TokenizedRow) -> list[str]:
    """Decoded text of each maximal run of supervised tokens (one run per supervised assistant turn)."""
    runs: list[list[int]] = []
    for t, (token, m) in enumerate(zip(row.input_ids, row.loss_mask, strict=True)):
        if m and t > 0 and row.loss_mask[t - 1]:
            runs[-1].append(token)
        elif m:
            runs.append([token])
    return [tokenizer.decode(run) for run in runs]


def with_reasoning(messages: list[dict], *reasoning: str) -> list[dict]:
    """Attach reasoning_content to the assistant turns, in order."""
    turns = iter(reasoning)
    return [{**m, "reasoning_content": next(turns)} if m["role"] == "assistant" else m for m in messages]


@pytest.mark.parametrize("style", ["plain", "generation"])
def test_mask_is_the_assistant_content_and_end_token(tokenizer, templates, conversation, style):
    messages = conversation("What is two plus two?", "two plus two equals four.")
    row = tokenize_conversation(messages, tokenizer, 128, chat_template=templates[style])
    rendered = tokenizer.apply_chat_template(messages, chat_template=templates[style], tokenize=False)
    assert tokenizer.decode(row.input_ids) == rendered  # the whole conversation, tokenised once
    # Not the role header, not the "\n" after the end token, nothing of the system or user turns.
    assert supervised_text(tokenizer, row) == ["two plus two equals four." + END]
    assert not row.truncated


def test_generation_tags_are_detected(templates):
    assert has_generation_tags(templates["generation"]) and has_generation_tags(templates["qwen3_generation"])
    assert not has_generation_tags(templates["plain"]) and not has_generation_tags(templates["qwen3"])


@pytest.mark.parametrize("prefix_style, tagged_style", [("plain", "generation"), ("qwen3", "qwen3_generation")])
@pytest.mark.parametrize("mask_reasoning", [False, True])
def test_prefix_rendering_agrees_with_generation_tags(
    tokenizer, templates, conversation, prefix_style, tagged_style, mask_reasoning
):
    messages = with_reasoning(
        conversation("how do I sort a list?", "use sorted.", "and reverse?", "pass reverse true.", "thanks", "ok."),
        "plan first",
        "think step",
        "",
    )
    by_prefix, by_tags = (
        tokenize_conversation(
            messages, tokenizer, 256, chat_template=templates[style], mask_reasoning_content=mask_reasoning
        )
        for style in (prefix_style, tagged_style)
    )
    assert by_prefix.input_ids == by_tags.input_ids
    assert by_prefix.loss_mask == by_tags.loss_mask
    assert len(supervised_text(tokenizer, by_prefix)) == 3


def test_every_assistant_turn_is_marked(tokenizer, conversation):
    messages = conversation("hello", "hello world.", "what is the capital of france?", "paris.", "why?", "because.")
    row = tokenize_conversation(messages, tokenizer, 256)
    assert supervised_text(tokenizer, row) == ["hello world." + END, "paris." + END, "because." + END]


def test_template_that_drops_earlier_reasoning(tokenizer, templates, conversation):
    """Qwen3 style: the first turn is rendered without its reasoning once a later user turn follows."""
    messages = with_reasoning(conversation("sum two plus four?", "five.", "why?", "because."), "plan", "think step")
    rendered = tokenizer.apply_chat_template(messages, chat_template=templates["qwen3"], tokenize=False)
    assert "plan" not in rendered  # so rendering messages[:2] is not a prefix of the whole conversation
    row = tokenize_conversation(messages, tokenizer, 256, chat_template=templates["qwen3"])
    assert supervised_text(tokenizer, row) == ["five." + END, "<think>\nthink step\n</think>\n\nbecause." + END]
    row = tokenize_conversation(messages, tokenizer, 256, chat_template=templates["qwen3"], mask_reasoning_content=True)
    assert supervised_text(tokenizer, row) == ["five." + END, "because." + END]


@pytest.mark.parametrize("where", ["inline", "reasoning_content"])
def test_mask_reasoning_content_removes_the_think_block(tokenizer, conversation, where):
    messages = conversation("sum two plus four?", "<think>\nfirst plan\n</think>\n\nfive.")
    if where == "reasoning_content":
        messages = with_reasoning(conversation("sum two plus four?", "five."), "first plan")
    kept = tokenize_conversation(messages, tokenizer, 128)
    assert supervised_text(tokenizer, kept) == ["<think>\nfirst plan\n</think>\n\nfive." + END]
    masked = tokenize_conversation(messages, tokenizer, 128, mask_reasoning_content=True)
    assert masked.input_ids == kept.input_ids  # only the supervision changes, never the text
    assert supervised_text(tokenizer, masked) == ["five." + END]


def test_reasoning_rendered_without_think_tags_is_masked(tokenizer, conversation):
    template = tokenizer.chat_template.replace("<think>", "[reasoning]").replace("</think>", "[/reasoning]")
    messages = with_reasoning(conversation("sum two plus four?", "five."), "first plan")
    row = tokenize_conversation(messages, tokenizer, 128, chat_template=template, mask_reasoning_content=True)
    assert "first plan" not in "".join(supervised_text(tokenizer, row))


def test_truncation_keeps_the_prefix(tokenizer, conversation):
    messages = conversation("hello", "the answer is a simple small list of numbers.")
    full = tokenize_conversation(messages, tokenizer, 512)
    first_supervised = full.loss_mask.index(1)
    cut = first_supervised + 3
    row = tokenize_conversation(messages, tokenizer, cut)
    assert row.truncated and row.input_ids == full.input_ids[:cut] and row.loss_mask == full.loss_mask[:cut]
    with pytest.raises(RowError, match="nothing supervised after truncation"):
        tokenize_conversation(messages, tokenizer, first_supervised)


def test_leading_assistant_turn_is_context_only(tokenizer):
    messages = [
        {"role": "assistant", "content": "hello, how can I help?"},
        {"role": "user", "content": "sum two plus four"},
        {"role": "assistant", "content": "five."},
    ]
    row = tokenize_conversation(messages, tokenizer, 128)
    assert supervised_text(tokenizer, row) == ["five." + END]


def test_template_whose_turns_cannot_be_located_is_refused(tokenizer, conversation):
    """A template that renders the turn count changes every earlier turn: skip the row rather than guess."""
    template = "{{- messages | length }}\n" + tokenizer.chat_template
    with pytest.raises(RowError, match="cannot locate an assistant turn"):
        tokenize_conversation(conversation("hello", "hello world."), tokenizer, 128, chat_template=template)


def test_chat_template_override_from_file(tokenizer, templates, conversation, tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(templates["generation"])
    messages = conversation("hello", "hello world.")
    from_file = tokenize_conversation(messages, tokenizer, 128, chat_template=str(path))
    assert from_file == tokenize_conversation(messages, tokenizer, 128, chat_template=templates["generation"])


def test_tokenizer_without_chat_template_is_a_clear_error(tokenizer, conversation):
    bare = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_conversation(conversation("hello", "hello world."), bare, 128)
