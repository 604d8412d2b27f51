"""The tiny target's training loop: chat-formatted stdlib rows, packed into windows that start at a row start."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from nemo_automodel_dspark.tools.stdlib_corpus import stdlib_chat_rows

_HELD_OUT_ROWS = 16


def render_rows(tokenizer, rows: list[dict]) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in rows]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def training_windows(tokenizer, *, seed: int, num_windows: int, seq_length: int) -> torch.Tensor:
    """`[num_windows, seq_length]` token windows; window j starts at row j's `<|im_start|>` and runs on into the
    following rows, so every window looks like the start of a chat while no token is padding."""
    extra_rows = seq_length // 64 + 8  # rows hold >= ~90 tokens: enough to fill the last window
    rows = render_rows(tokenizer, stdlib_chat_rows("train", num_windows + extra_rows, seed))
    stream: list[int] = []
    starts: list[int] = []
    for ids in rows:
        starts.append(len(stream))
        stream.extend(ids)
    stream_t = torch.tensor(stream, dtype=torch.long)
    windows = [stream_t[start : start + seq_length] for start in starts[:num_windows]]
    if any(len(w) < seq_length for w in windows):
        raise RuntimeError("the stdlib rows are too short to fill the training windows")
    return torch.stack(windows)


def _window_order(spec) -> torch.Tensor:
    """Indices of the windows each step trains on: `spec.epochs` passes over steps·B/epochs distinct windows, each
    pass in its own seeded order (the default is one pass: every window is new)."""
    total = spec.steps * spec.batch_size
    distinct = math.ceil(total / spec.epochs)
    generator = torch.Generator().manual_seed(spec.seed)
    passes = [torch.randperm(distinct, generator=generator) for _ in range(spec.epochs)]
    return torch.cat(passes)[:total]


def lr_at(step: int, *, steps: int, lr: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine down to 10% of `lr`."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(model: torch.nn.Module, tokenizer, spec, *, progress: bool = True) -> list[float]:
    """AdamW over `spec.steps` batches of `spec.batch_size` windows; returns the per-step train loss (nats/token)."""
    order = _window_order(spec)  # [steps * B]
    windows = training_windows(tokenizer, seed=spec.seed, num_windows=int(order.max()) + 1, seq_length=spec.seq_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(spec.steps), desc="tiny target", unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps=spec.steps, lr=spec.lr)
        batch = windows[order[step * spec.batch_size : (step + 1) * spec.batch_size]]  # [B, S]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, tokenizer, spec) -> float:
    """Token-weighted next-token loss on held-out-file chat rows (never seen in training)."""
    rows = render_rows(tokenizer, stdlib_chat_rows("held_out", _HELD_OUT_ROWS, spec.seed))
    total, count = 0.0, 0
    for ids in rows:
        ids_t = torch.tensor([ids[: spec.seq_length]])  # [1, S]
        n = ids_t.shape[1] - 1
        total += model(input_ids=ids_t, labels=ids_t).loss.item() * n
        count += n
    return total / count
