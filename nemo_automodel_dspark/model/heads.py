"""The sequential Markov head (paper eq. 5–6) and the confidence head (eq. 7), SPEC §1."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MarkovHead(nn.Module):
    """Prefix-dependent logit bias `b_k` from the previous token; `vanilla | gated | rnn`."""

    def __init__(self, hidden: int, vocab: int, rank: int, head_type: str) -> None:
        super().__init__()
        self.rank, self.head_type = rank, head_type
        self.markov_w1 = nn.Embedding(vocab, rank)  # W1: previous-token embedding e_k
        self.markov_w2 = nn.Linear(rank, vocab, bias=False)  # W2: low-rank logit projection
        if head_type == "gated":
            self.gate_proj = nn.Linear(hidden + rank, rank)
        elif head_type == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden, 3 * rank)  # gate α, candidate β, output ω

    def step_features(
        self, h: Tensor, prev_token: Tensor, state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One slot: h [..., H], prev_token [...] → features m [..., r] (bias = W2·m), e [..., r], RNN state."""
        e = self.markov_w1(prev_token)
        if self.head_type == "vanilla":
            return e, e, None  # eq. 5: b = W2 · W1[x_prev]
        if self.head_type == "gated":
            g = torch.sigmoid(self.gate_proj(torch.cat([h, e.to(h.dtype)], dim=-1)))
            return g * e, e, None
        if state is None:
            state = h.new_zeros(*h.shape[:-1], self.rank)  # s_0 = 0 at every block start
        alpha, beta, omega = self.joint_proj(torch.cat([state, e.to(h.dtype), h], dim=-1)).chunk(3, dim=-1)
        gate = torch.sigmoid(alpha)
        state = gate * state + (1 - gate) * torch.tanh(beta)  # eq. 6
        return torch.tanh(omega), e, state

    def step(self, h: Tensor, prev_token: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """One slot: h [..., H], prev_token [...] → bias [..., V], e [..., r], new RNN state [..., r] (or None)."""
        m, e, state = self.step_features(h, prev_token, state)
        return self.markov_w2(m), e, state

    def features(self, h: Tensor, prev_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced features for all blocks: h [B, N, K, H], prev_tokens [B, N, K] → (m, e), each [B, N, K, r].

        The bias is `W2·m`; the objective applies W2 chunk by chunk so that the `[B, N, K, V]` bias never exists.
        """
        if self.head_type != "rnn":
            m, e, _ = self.step_features(h, prev_tokens, None)
            return m, e
        features, embeds, state = [], [], None
        for k in range(h.shape[2]):  # the recurrence runs along the block; K is small (7)
            m, e, state = self.step_features(h[:, :, k], prev_tokens[:, :, k], state)
            features.append(m)
            embeds.append(e)
        return torch.stack(features, dim=2), torch.stack(embeds, dim=2)

    def forward(self, h: Tensor, prev_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced bias for all blocks: h [B, N, K, H], prev_tokens [B, N, K] → ([B, N, K, V], [B, N, K, r])."""
        m, e = self.features(h, prev_tokens)
        return self.markov_w2(m), e


class ConfidenceHead(nn.Module):
    """`c_k = σ(w·[h_k ; e_k] + b)`: P(slot k survives verification | slots < k accepted). Returns logits."""

    def __init__(self, hidden: int, rank: int, with_markov: bool) -> None:
        super().__init__()
        self.with_markov = with_markov
        self.proj = nn.Linear(hidden + (rank if with_markov else 0), 1)

    def forward(self, h: Tensor, e: Tensor | None) -> Tensor:
        """h [..., H], e [..., r] → logits [...]. Callers pass detached inputs (the head only estimates)."""
        if self.with_markov:
            assert e is not None, "a confidence head with_markov needs the Markov embeddings e"
            x = torch.cat([h, e.to(h.dtype)], dim=-1)
        else:
            x = h
        return self.proj(x).squeeze(-1)
