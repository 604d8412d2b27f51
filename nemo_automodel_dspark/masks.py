"""Anchor sampling, the eval mask, and the block attention mask in two backends (SPEC §3).

Block slot (n, k) sits at position `a_n + k` and predicts token `a_n + k + 1`. Queries are the `N·K` block slots;
keys/values are `[context (S rows) | all blocks (N·K rows)]`. A slot of block n sees context rows `j < a_n` and
every slot of its own block; a padding block (kept = False) sees only itself so that no attention row is empty.

Packed rows (several documents end to end, `position_ids` restarting at 0 per document) keep every rule per
document: a block sees context rows `start(a_n) ≤ j < a_n` with `start(a) = a − position_ids[a]`, a slot is
supervised only while its label stays inside the anchor's document, and RoPE uses the document's positions.
Anchor counts (`pack_anchor_count`, `split_anchor_budget`): a packed row of P tokens has the blocks of a padded
step of the same token count, `B = max(1, ⌊num_anchors · P / seq_length⌋)` (a static shape: the draft costs what
it costs on padded rows), and draws `min(B, C)` anchors, `C` its documents' candidates, spread over its documents
in proportion to their candidate counts (largest remainder, ties to the earlier document); each document draws its
share uniformly among its own candidates from its own generator. Every candidate of the row is (up to rounding)
equally likely to be an anchor, a document never draws more than its candidates, and a row holding one document
draws `min(num_anchors, C)` when `P = seq_length` — the padded rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def pack_anchor_count(packed_sequence_size: int, num_anchors: int, seq_length: int) -> int:
    """Blocks per packed row, `max(1, ⌊num_anchors · P / seq_length⌋)`: a padded step's blocks for P tokens."""
    return max(1, num_anchors * packed_sequence_size // seq_length)


def candidate_count(loss_mask: Tensor) -> int:
    """Candidate anchors of one document [L]: `i` with `loss_mask[i] = loss_mask[i+1] = 1` (host-side, CPU)."""
    mask = loss_mask.bool()
    return int((mask[:-1] & mask[1:]).sum())


def split_anchor_budget(candidates: Sequence[int], budget: int) -> list[int]:
    """Anchors per document of a packed row: `min(budget, Σc)` in proportion to the candidate counts `c`.

    Largest remainder: document i gets `⌊take·c_i / Σc⌋`, and the anchors left go one each to the largest
    remainders `take·c_i mod Σc` (ties: the earlier document). No share exceeds its document's candidates.
    """
    total = sum(candidates)
    take = min(budget, total)
    if take == 0:
        return [0] * len(candidates)
    shares = [take * c // total for c in candidates]
    by_remainder = sorted(range(len(candidates)), key=lambda i: (-(take * candidates[i] % total), i))
    for i in by_remainder[: take - sum(shares)]:
        shares[i] += 1
    return shares


def sample_pack_anchors(
    loss_mask: Tensor,  # [P] one packed row, on the CPU (its candidate counts are read on the host)
    spans: list[tuple[int, int]],  # (start, length) of each document in the row
    generators: list[torch.Generator],  # one per document
    *,
    total: int,  # the row's blocks (`pack_anchor_count`)
) -> tuple[Tensor, Tensor]:
    """`split_anchor_budget` shares of the row's `total` blocks, each drawn by `sample_anchors` inside its document
    and shifted to the row: anchors and keep `[1, total]`, documents in row order, padding blocks last."""
    docs = [loss_mask[start : start + length] for start, length in spans]
    shares = split_anchor_budget([candidate_count(doc) for doc in docs], total)
    anchors, keep = [], []
    for (start, _), doc, share, generator in zip(spans, docs, shares, generators, strict=True):
        if share == 0:
            continue
        a, k = sample_anchors(doc.unsqueeze(0), share, generator)
        anchors.append(a[0] + start)
        keep.append(k[0])
    a_row = torch.cat([*anchors, loss_mask.new_zeros(0)]).long()
    k_row = torch.cat([*keep, torch.zeros(0, dtype=torch.bool, device=loss_mask.device)])
    pad = total - a_row.numel()
    a_row = torch.cat([a_row, a_row.new_zeros(pad)])
    k_row = torch.cat([k_row, k_row.new_zeros(pad)])
    return a_row.unsqueeze(0), k_row.unsqueeze(0)


def slot_positions(anchors: Tensor, block_size: int) -> Tensor:
    """Position id of every block slot, `a_n + k` → [B, N, K]."""
    return anchors.unsqueeze(-1) + torch.arange(block_size, device=anchors.device)


def context_start(anchors: Tensor, position_ids: Tensor | None) -> Tensor | None:
    """First row of each anchor's document, `a − position_ids[a]` [B, N]; None for unpacked rows (row start 0)."""
    if position_ids is None:
        return None
    return anchors - torch.gather(position_ids, 1, anchors)


def build_eval_mask(
    loss_mask: Tensor,  # [B, S]
    anchors: Tensor,  # [B, N]
    keep: Tensor,  # [B, N]
    block_size: int,
    position_ids: Tensor | None = None,  # [B, S] per-document positions of packed rows
) -> Tensor:
    """Supervised slots [B, N, K]: label `t = a + k + 1` inside the row (and the anchor's document), on a loss
    token, block kept; prefix only. Inside a packed document positions grow by exactly 1, and a later document
    restarts lower, so `t` is in the anchor's document iff `position_ids[t] = position_ids[a] + k + 1`."""
    seq = loss_mask.shape[1]
    labels = slot_positions(anchors, block_size) + 1  # [B, N, K]
    inside = labels < seq
    clamped = labels.clamp(max=seq - 1).flatten(1)
    on_loss = torch.gather(loss_mask.bool(), 1, clamped).view_as(labels)
    if position_ids is not None:
        doc_pos = slot_positions(torch.gather(position_ids, 1, anchors), block_size) + 1  # [B, N, K]
        inside = inside & (torch.gather(position_ids, 1, clamped).view_as(labels) == doc_pos)
    valid = inside & on_loss & keep.unsqueeze(-1)
    return valid.long().cumprod(dim=-1).bool()  # only the contiguous valid prefix of a block counts


def dense_block_mask(
    anchors: Tensor, keep: Tensor, seq_len: int, block_size: int, start: Tensor | None = None
) -> Tensor:
    """Boolean SDPA mask [B, 1, N·K, S + N·K] (True = may attend), for CPU and as the reference backend.

    `start` [B, N] (packed rows): the first context row a block may see, its document's start."""
    batch, num_blocks = anchors.shape
    device = anchors.device
    q_block = torch.arange(num_blocks * block_size, device=device) // block_size  # [Q]
    ctx_idx = torch.arange(seq_len, device=device)
    anchor_of_q = anchors[:, q_block]  # [B, Q]
    keep_of_q = keep[:, q_block]  # [B, Q]
    sees_ctx = (ctx_idx.view(1, 1, -1) < anchor_of_q.unsqueeze(-1)) & keep_of_q.unsqueeze(-1)  # [B, Q, S]
    if start is not None:
        sees_ctx = sees_ctx & (ctx_idx.view(1, 1, -1) >= start[:, q_block].unsqueeze(-1))
    same_block = (q_block.view(-1, 1) == q_block.view(1, -1)).expand(batch, -1, -1)  # [B, Q, Q]
    return torch.cat([sees_ctx, same_block], dim=-1).unsqueeze(1)


def block_mask_predicate(
    anchors: Tensor, keep: Tensor, seq_len: int, block_size: int, start: Tensor | None = None
) -> Callable:
    """The same rule as `dense_block_mask`, as a FlexAttention `mask_mod(b, h, q_idx, kv_idx)`."""
    first = torch.zeros_like(anchors) if start is None else start

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        block = q_idx // block_size
        in_ctx = kv_idx < seq_len
        sees_ctx = (kv_idx < anchors[b, block]) & (kv_idx >= first[b, block]) & keep[b, block]
        same_block = (kv_idx - seq_len) // block_size == block
        return torch.where(in_ctx, sees_ctx, same_block)

    return mask_mod


def flex_block_mask(anchors: Tensor, keep: Tensor, seq_len: int, block_size: int, start: Tensor | None = None):
    """FlexAttention BlockMask for the block attention pattern (used on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, num_blocks = anchors.shape
    q_len = num_blocks * block_size
    predicate = block_mask_predicate(anchors, keep, seq_len, block_size, start)
    return create_block_mask(predicate, batch, None, q_len, seq_len + q_len, device=anchors.device)
