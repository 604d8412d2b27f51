"""Chat data: read rows (sources), render prompts (render), tokenise with a loss mask on assistant tokens (chat), sample
resumably (dataset). Training, `dspark regenerate` and `dspark evaluate` all read and render rows through here."""

from nemo_automodel_dspark.data.chat import TokenizedRow, has_generation_tags, tokenize_conversation
from nemo_automodel_dspark.data.dataset import DSparkChatDataset, ResumableSampler, batches, collate
from nemo_automodel_dspark.data.render import render_prompt, resolve_chat_template, row_prompt_ids
from nemo_automodel_dspark.data.sources import RowError, iter_rows, normalize_messages, open_rows, prompt_messages

__all__ = [
    "DSparkChatDataset",
    "ResumableSampler",
    "RowError",
    "TokenizedRow",
    "batches",
    "collate",
    "has_generation_tags",
    "iter_rows",
    "normalize_messages",
    "open_rows",
    "prompt_messages",
    "render_prompt",
    "resolve_chat_template",
    "row_prompt_ids",
    "tokenize_conversation",
]
