"""The one chat-template renderer: training, `dspark regenerate` and `dspark evaluate` render rows through here.

So a row means the same token ids everywhere, and a custom template (`recipe_args.chat_template` for training,
`--chat-template` for regenerate and evaluate, the same values: inline Jinja, a template name, or a `.jinja` file)
is honoured the same way by all three. Text is tokenised without added special tokens: the template writes its own.
"""

from __future__ import annotations

from typing import Any

import jinja2

from nemo_automodel_dspark.data.sources import (
    RowError,
    has_token_ids,
    normalize_messages,
    prompt_messages,
    token_id_list,
)


def resolve_chat_template(tokenizer: Any, chat_template: str | None = None) -> str:
    """Return the Jinja text to render with: the override (inline, a name, a .jinja path) or the tokenizer's own."""
    if chat_template is not None and "{" not in chat_template and chat_template.endswith(".jinja"):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    try:
        return tokenizer.get_chat_template(chat_template)
    except ValueError as err:
        raise ValueError(f"cannot render chats: {err} (set recipe_args.chat_template / --chat-template)") from err


def render_text(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: str,
    *,
    generation_prompt: bool = False,
    enable_thinking: bool | None = None,
) -> str:
    """`messages` rendered with `template`; a template that rejects the conversation is a RowError.

    `enable_thinking` is passed to the template only when given (templates without the variable ignore it).
    """
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt, **extra
        )
    except jinja2.TemplateError as err:
        raise RowError(f"chat template error: {str(err)[:80]}") from err


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text (no BOS/EOS added: the template has its own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], template: str, *, enable_thinking: bool = False
) -> list[int]:
    """The ids a model reads before answering `messages`: rendered with the generation prompt. Thinking templates
    are asked not to think unless `enable_thinking`."""
    return encode_text(
        tokenizer, render_text(tokenizer, messages, template, generation_prompt=True, enable_thinking=enable_thinking)
    )


def row_prompt_ids(row: dict[str, Any], tokenizer: Any, template: str, *, enable_thinking: bool = False) -> list[int]:
    """The prompt ids of a chat row: its own `prompt_ids` when it carries the target's ids (training reads those
    too), else its messages before the final assistant turn, rendered with the generation prompt."""
    if has_token_ids(row):
        ids = token_id_list(row, "prompt_ids", len(tokenizer))
        if not ids:
            raise RowError("empty prompt_ids")
        return list(ids)
    messages = prompt_messages(normalize_messages(row, require_assistant=False))
    return render_prompt(tokenizer, messages, template, enable_thinking=enable_thinking)
