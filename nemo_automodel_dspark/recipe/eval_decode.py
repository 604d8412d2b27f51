"""`recipe_args.eval_decode`: real speculative decoding during training, on rank 0, with a consolidated copy of the
draft (the trained draft and its optimizer state are untouched)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nemo_automodel_dspark.model.drafter import DSparkDrafter
from nemo_automodel_dspark.recipe.config import RecipeArgs


def decode_metrics(
    target: nn.Module,
    draft: DSparkDrafter,
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    prompts: list | None,
    args: RecipeArgs,
    device: torch.device,
) -> dict[str, Any]:
    """Rank 0: decode `prompts` with a new draft shaped like `draft` holding `state` → decode/tau, speedup, rounds."""
    from nemo_automodel_dspark.inference.evaluate import run_evaluation
    from nemo_automodel_dspark.inference.prompts import load_prompts

    decode = args.eval_decode
    assert decode is not None
    copy = DSparkDrafter(draft.target_config, draft.dspark).to(device)
    copy.load_state_dict(state)
    if prompts is None:
        prompts = load_prompts(decode.data_path, tokenizer, decode.num_prompts, chat_template=args.chat_template)
    report = run_evaluation(
        target,
        copy.eval(),
        tokenizer,
        prompts,
        temperature=decode.temperature,
        max_new_tokens=decode.max_new_tokens,
        seed=args.shuffle_seed,
    ).report
    return {"decode/tau": report["tau"], "decode/speedup": report.get("speedup"), "decode/rounds": report["rounds"]}
