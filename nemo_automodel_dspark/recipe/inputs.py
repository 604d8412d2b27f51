"""Training inputs: checked before anything loads (paths that cannot work are one line naming the config key), then
opened."""

from __future__ import annotations

from typing import Any

from nemo_automodel_dspark.data import DSparkChatDataset
from nemo_automodel_dspark.data.cache import default_cache_root
from nemo_automodel_dspark.data.sources import check_data_path
from nemo_automodel_dspark.distributed import DistInfo
from nemo_automodel_dspark.errors import ToolError
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.recipe.config import RecipeArgs


def check_data(args: RecipeArgs) -> None:
    """Every data path exists and is data (a model folder is not)."""
    check_data_path(args.train_data_path, "recipe_args.train_data_path")
    if args.val_data_path:
        check_data_path(args.val_data_path, "recipe_args.val_data_path")
    if args.eval_decode is not None:
        check_data_path(args.eval_decode.data_path, "recipe_args.eval_decode.data_path")


def load_decode_prompts(args: RecipeArgs, tokenizer: Any) -> list | None:
    """The eval_decode prompts, read at setup so a bad file fails before training, not at the first decode."""
    from nemo_automodel_dspark.inference.prompts import load_prompts

    decode = args.eval_decode
    if decode is None:
        return None
    try:
        return load_prompts(decode.data_path, tokenizer, decode.num_prompts, chat_template=args.chat_template)
    except ValueError as err:
        raise ToolError(f"recipe_args.eval_decode.data_path: {err}") from err


def open_dataset(
    args: RecipeArgs, tokenizer: Any, path: str, split: str, draft_config: DSparkConfig, info: DistInfo
) -> DSparkChatDataset:
    """The tokenised rows of one data file as the recipe options say (the cache, or in memory); progress on rank 0."""
    return DSparkChatDataset(
        path,
        tokenizer,
        args.seq_length,
        split=split,
        chat_template=args.chat_template,
        mask_reasoning_content=args.mask_reasoning_content,
        mask_token_id=draft_config.mask_token_id,
        show_progress=info.is_main,
        cache_dir=(args.tokenized_cache_dir or default_cache_root()) if args.tokenized_cache else None,
        num_proc=args.tokenize_num_proc,
    )
