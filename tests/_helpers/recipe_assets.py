"""A tiny Qwen3 target directory (word-level tokenizer + chat template) and chat JSONL data, built locally."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
WORDS = [f"w{i}" for i in range(40)] + ["user", "assistant", "system"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_model(family: str, eos: int, seed: int = 0):
    """A tiny random target of one family (vocab 64, hidden 32, 3 layers), ready to save."""
    from nemo_automodel_dspark.target.tiny import tiny_target

    return tiny_target(family, seed=seed, eos_token_id=eos, pad_token_id=0)


def build_target_dir(out: Path, seed: int = 0, family: str = "qwen3") -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:]
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(out)
    tiny_model(family, eos=vocab["<|im_end|>"], seed=seed).save_pretrained(out)
    return out


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            start = rng.randrange(30)
            prompt = " ".join(f"w{rng.randrange(40)}" for _ in range(rng.randrange(2, 6)))
            answer = " ".join(f"w{(start + j) % 40}" for j in range(rng.randrange(8, 20)))
            row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            f.write(json.dumps(row) + "\n")
    return path


def base_config(assets: dict, out: Path, **recipe_args) -> dict:
    args = dict(
        target_model_name_or_path=str(assets["target"]),
        train_data_path=str(assets["train"]),
        output_dir=str(out),
        seq_length=48,
        micro_batch_size=2,
        grad_accumulation_steps=1,
        num_epochs=1,
        draft_num_hidden_layers=2,
        block_size=4,
        num_anchors=6,
        mask_token_id=3,
        markov_rank=8,
        log_every_steps=1,
        target_layer_ids=[0, 2],
    )
    args.update(recipe_args)
    return {
        "recipe": "nemo_automodel_dspark.train_dspark.TrainDSparkRecipe",
        "dist_env": {"backend": "gloo"},
        "recipe_args": args,
        "optimizer": {"lr": 3e-3, "warmup_ratio": 0.2},
        "checkpoint": {"enabled": True, "checkpoint_dir": str(out / "ckpt")},
    }


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def random_documents(lengths, seed: int = 0, vocab: int = 60) -> list[dict]:
    """Documents of these lengths, random ids in [1, vocab): a third prompt (unsupervised), then the response."""
    import torch

    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        loss_mask = torch.ones(n, dtype=torch.long)
        loss_mask[: n // 3] = 0
        docs.append({"input_ids": torch.randint(1, vocab, (n,), generator=g), "loss_mask": loss_mask})
    return docs
