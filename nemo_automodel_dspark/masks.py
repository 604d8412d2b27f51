"""Anchor sampling, the eval mask, and the block attention mask in two backends (SPEC §3).

Block slot (n, k) sits at position `a_n + k` and predicts token `a_n + k + 1`. Queries are the `N·K` block slots;
keys/values are `[context (S rows) | all blocks (N·K rows)]`. A slot of block n sees context rows `j < a_n` and
every slot of its own block; a padding block (kept = False) sees only itself so that no attention row is empty.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def sample_anchors(loss_mask: Tensor, num_anchors: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw min(N, #candidates) anchors per row uniformly without replacement, sorted; pad to N with dummies.

    Candidates are `i in [0, S-2]` with `loss_mask[i] = loss_mask[i+1] = 1`. Returns `anchors [B, N]` (long, 0 on
    padding) and `keep [B, N]` (bool). Uses only `generator` for randomness and never syncs with the host.
    """
    batch, seq = loss_mask.shape  # [B, S]
    mask = loss_mask.bool()
    valid = mask[:, :-1] & mask[:, 1:]  # [B, S-1]
    keys = torch.rand(valid.shape, generator=generator, device=generator.device).to(valid.device)
    keys = torch.where(valid, keys, torch.full_like(keys, -1.0))
    take = min(num_anchors, seq - 1)
    picked_keys, picked = keys.topk(take, dim=1)  # random keys → uniform sample without replacement
    sentinel = torch.full_like(picked, seq)
    picked = torch.where(picked_keys >= 0, picked, sentinel).sort(dim=1).values  # valid ascending, pads last
    if take < num_anchors:
        picked = torch.cat([picked, sentinel.new_full((batch, num_anchors - take), seq)], dim=1)
    keep = picked < seq
    return torch.where(keep, picked, torch.zeros_like(picked)), keep


def slot_positions(anchors: Tensor, block_size: int) -> Tensor:
    """Position id of every block slot, `a_n + k` → [B, N, K]."""
    return anchors.unsqueeze(-1) + torch.arange(block_size, device=anchors.device)


def build_eval_mask(loss_mask: Tensor, anchors: Tensor, keep: Tensor, block_size: int) -> Tensor:
    """Supervised slots [B, N, K]: label `t = a + k + 1` inside the row, on a loss token, block kept; prefix only."""
    seq = loss_mask.shape[1]
    labels = slot_positions(anchors, block_size) + 1  # [B, N, K]
    inside = labels < seq
    on_loss = torch.gather(loss_mask.bool(), 1, labels.clamp(max=seq - 1).flatten(1)).view_as(labels)
    valid = inside & on_loss & keep.unsqueeze(-1)
    return valid.long().cumprod(dim=-1).bool()  # only the contiguous valid prefix of a block counts


def dense_block_mask(anchors: Tensor, keep: Tensor, seq_len: int, block_size: int) -> Tensor:
    """Boolean SDPA mask [B, 1, N·K, S + N·K] (True = may attend), for CPU and as the reference backend."""
    batch, num_blocks = anchors.shape
    device = anchors.device
    q_block = torch.arange(num_blocks * block_size, device=device) // block_size  # [Q]
    ctx_idx = torch.arange(seq_len, device=device)
    anchor_of_q = anchors[:, q_block]  # [B, Q]
    keep_of_q = keep[:, q_block]  # [B, Q]
    sees_ctx = (ctx_idx.view(1, 1, -1) < anchor_of_q.unsqueeze(-1)) & keep_of_q.unsqueeze(-1)  # [B, Q, S]
    same_block = (q_block.view(-1, 1) == q_block.view(1, -1)).expand(batch, -1, -1)  # [B, Q, Q]
    return torch.cat([sees_ctx, same_block], dim=-1).unsqueeze(1)


def block_mask_predicate(anchors: Tensor, keep: Tensor, seq_len: int, block_size: int) -> Callable:
    """The same rule as `dense_block_mask`, as a FlexAttention `mask_mod(b, h, q_idx, kv_idx)`."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        block = q_idx // block_size
        in_ctx = kv_idx < seq_len
        sees_ctx = (kv_idx < anchors[b, block]) & keep[b, block]
        same_block = (kv_idx - seq_len) // block_size == block
        return torch.where(in_ctx, sees_ctx, same_block)

    return mask_mod


def flex_block_mask(anchors: Tensor, keep: Tensor, seq_len: int, block_size: int):
    """FlexAttention BlockMask for the block attention pattern (used on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, num_blocks = anchors.shape
    q_len = num_blocks * block_size
    predicate = block_mask_predicate(anchors, keep, seq_len, block_size)
    return create_block_mask(predicate, batch, None, q_len, seq_len + q_len, device=anchors.device)
