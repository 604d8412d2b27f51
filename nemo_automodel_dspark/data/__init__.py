"""Chat data for DSpark training: read rows, tokenise with a loss mask on assistant tokens, sample resumably."""

from nemo_automodel_dspark.data.chat import (
    TokenizedRow,
    has_generation_tags,
    resolve_chat_template,
    tokenize_conversation,
)
from nemo_automodel_dspark.data.dataset import DSparkChatDataset, ResumableSampler, batches, collate
from nemo_automodel_dspark.data.sources import RowError, iter_rows, normalize_messages, open_rows

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
    "resolve_chat_template",
    "tokenize_conversation",
]
