"""Lossless DSpark speculative decoding, batch 1 (SPEC §5), and plain target-only decoding as the speed baseline.

One round: the draft backbone reads the cached context K/V of every committed position before the anchor and one
block (anchor + K−1 masks); the Markov head then samples `y_k ~ p_d,k(· | x0, y_<k)` left to right. The target
verifies `[x0, y_0..y_{ℓ−1}]` in one forward with its KV cache and the standard speculative-sampling rule
(Leviathan et al. 2023; Chen et al. 2023) decides how many survive. Temperature 0 is the limit of that rule with
one-hot distributions, so greedy and sampled decoding share one code path and greedy equals the target's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from nemo_automodel_dspark.target.capture import hidden_state_hooks

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedConfig

    from nemo_automodel_dspark.model.drafter import DSparkDrafter


def probabilities(logits: Tensor, temperature: float) -> Tensor:
    """Logits [..., V] → fp32 probabilities softmax(logits / T); T = 0 gives the one-hot argmax (greedy)."""
    logits = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, dim=-1)


def sample(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One token id per row of `probs` [..., V] → [...], by inverting the CDF at one uniform draw.

    Cheaper than `torch.multinomial` (one uniform instead of V exponentials) and exact: the CDF is fp64 and the
    uniform is an fp32 draw < 1, so u·total < total and a zero-probability token is never returned.
    """
    cdf = probs.double().cumsum(-1)
    u = torch.rand((*probs.shape[:-1], 1), generator=generator, device=probs.device).double() * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def pick(logits: Tensor, temperature: float, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Logits [..., V] → (token [...], its sampling distribution [..., V]); T = 0 is the argmax and no distribution.

    Greedy needs no probabilities at all: skipping the softmax / one-hot / CDF per token is most of what a greedy
    draft step costs at a small vocabulary, and the argmax is exactly what `sample(probabilities(·, 0))` returns.
    """
    if temperature <= 0:
        return logits.argmax(-1), None
    probs = probabilities(logits, temperature)
    return sample(probs, generator), probs


def greedy_verify(target_logits: Tensor, draft_tokens: Tensor) -> tuple[int, Tensor]:
    """`verify_block` at temperature 0: target logits [ℓ+1, V], draft tokens [ℓ] → (accepted n, next token []).

    With one-hot distributions min(1, p_t/p_d) is 1 exactly when the draft token is the target's argmax, and the
    residual (or bonus) distribution is the one-hot of the target's argmax at the first mismatch.
    """
    best = target_logits.argmax(-1)
    n = int((best[: draft_tokens.numel()] == draft_tokens).long().cumprod(0).sum())
    return n, best[n]


def verify_block(
    p_target: Tensor, p_draft: Tensor, draft_tokens: Tensor, generator: torch.Generator
) -> tuple[int, Tensor]:
    """Speculative sampling: p_target [ℓ+1, V], p_draft [ℓ, V], draft_tokens [ℓ] → (accepted n, next token []).

    y_k survives with probability min(1, p_t(y_k) / p_d(y_k)); at the first rejection the next token is drawn from
    norm(max(0, p_t − p_d)), and when all ℓ survive it is the bonus token drawn from p_t,ℓ. The output is then
    distributed exactly as the target's own sampling.
    """
    length = draft_tokens.numel()
    rows = torch.arange(length, device=draft_tokens.device)
    p_t, p_d = p_target[rows, draft_tokens], p_draft[rows, draft_tokens]
    uniform = torch.rand(length, generator=generator, device=generator.device)
    accepted = uniform * p_d < p_t  # u < p_t / p_d without dividing; p_d > 0 for a token sampled from p_d
    n = int(accepted.long().cumprod(0).sum())
    if n == length:
        return n, sample(p_target[n], generator)
    residual = (p_target[n] - p_draft[n]).clamp_min(0)
    if float(residual.sum()) <= 0:  # p_t == p_d up to rounding: a rejection had ~0 probability
        residual = p_target[n]
    return n, sample(residual / residual.sum(), generator)


def eos_token_ids(target: nn.Module) -> set[int]:
    """The target's end-of-sequence ids: `generation_config` first, then `config`."""
    for source in (getattr(target, "generation_config", None), target.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return set(eos) if isinstance(eos, list | tuple) else {int(eos)}
    return set()


@dataclass
class RoundRecord:
    """What one draft/verify round did; `accept_length` = accepted draft tokens + 1 (the corrected/bonus token)."""

    verify_len: int
    num_accepted: int
    confidence_logits: list[float] | None  # [verify_len] raw logits c_k before sigmoid / calibration

    @property
    def accept_length(self) -> int:
        return self.num_accepted + 1

    @property
    def acceptance(self) -> list[int]:
        """Realised acceptance of the positions this round reached: 1 for each accepted, 0 for the rejected one."""
        return [1] * self.num_accepted + ([0] if self.num_accepted < self.verify_len else [])


@dataclass
class DecodeState:
    """Committed text and both caches; the last committed token is the next round's anchor."""

    tokens: list[int]  # prompt + generated ids
    prompt_len: int
    target_cache: DynamicCache  # holding K/V of tokens[:-1]
    draft_kv: list[tuple[Tensor, Tensor]]  # per draft layer ([1, kv, S, D], [1, kv, S, D]) for tokens[:-1]
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


def _truncate(tokens: list[int], budget: int, eos: set[int]) -> tuple[list[int], bool]:
    """Keep at most `budget` tokens and nothing after the first EOS; True when decoding must stop."""
    for i, token in enumerate(tokens[:budget]):
        if token in eos:
            return tokens[: i + 1], True
    return tokens[:budget], len(tokens) >= budget


class SpeculativeDecoder:
    """A target and its DSpark draft, decoding one sequence at a time (the draft's `dspark` config gives K, mask)."""

    def __init__(
        self,
        target: nn.Module,
        draft: DSparkDrafter,
        *,
        temperature: float = 0.0,
        verify_len: int | None = None,
        eos: set[int] | None = None,
    ) -> None:
        block = draft.dspark.block_size
        if verify_len is not None and not 1 <= verify_len <= block:
            raise ValueError(f"verify_len must be in [1, block_size={block}], got {verify_len}")
        self.target, self.draft, self.temperature = target, draft, temperature
        self.verify_len = verify_len or block
        layer_ids = draft.dspark.target_layer_ids
        assert layer_ids is not None  # DSparkDrafter.__init__ resolves and validates them
        self.layer_ids = list(layer_ids)
        self.eos = eos_token_ids(target) if eos is None else set(eos)
        self.device = next(target.parameters()).device

    # ------------------------------------------------------------------ target side
    def _target_forward(self, ids: Tensor, cache, logits_to_keep: int) -> tuple[Tensor, Tensor]:
        """ids [1, T] after `cache` → (logits [T', V], draft context features [1, T, L·H]); `cache` grows by T."""
        with hidden_state_hooks(self.target, self.layer_ids) as captured:
            out = self.target(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
        return out.logits[0], torch.cat([captured[i] for i in self.layer_ids], dim=-1)

    def _append_context(self, state: DecodeState, features: Tensor, start: int) -> None:
        """Project new committed rows (positions start..) once and append their K/V to the draft cache."""
        positions = torch.arange(start, start + features.shape[1], device=self.device).unsqueeze(0)
        new = self.draft.context_kv(features, positions)
        if not state.draft_kv:
            state.draft_kv = new
            return
        state.draft_kv = [
            (torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2))
            for (k, v), (nk, nv) in zip(state.draft_kv, new, strict=True)
        ]

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int], generator: torch.Generator) -> DecodeState:
        """Run the target over the prompt and sample the first token (the first anchor) from its last logits."""
        from transformers import DynamicCache

        cache = DynamicCache(config=cast("PreTrainedConfig", self.target.config))
        cache.activate_past_recording()  # sliding-window layers must keep what a rejection may roll back
        ids = torch.tensor([prompt_ids], device=self.device)
        logits, features = self._target_forward(ids, cache, logits_to_keep=1)
        first = int(pick(logits[-1], self.temperature, generator)[0])
        state = DecodeState(tokens=[*prompt_ids, first], prompt_len=len(prompt_ids), target_cache=cache, draft_kv=[])
        self._append_context(state, features, 0)
        return state

    # ------------------------------------------------------------------ draft side
    def draft_block(
        self, state: DecodeState, length: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Propose `length` tokens → (tokens [ℓ], p_d [ℓ, V] or None at T = 0, confidence logits [ℓ] or None)."""
        draft, block = self.draft, self.draft.dspark.block_size
        anchor = len(state.tokens) - 1
        tokens = torch.full((1, block), draft.dspark.mask_token_id, device=self.device)
        tokens[0, 0] = state.tokens[-1]
        positions = torch.arange(anchor, anchor + block, device=self.device).unsqueeze(0)
        hidden = draft.backbone_cached(tokens, positions, state.draft_kv)[0, :length]  # [ℓ, H]
        base = draft.head_logits(hidden).float()  # U [ℓ, V]
        if draft.markov_head is None:  # no sequential stage: every slot is drawn from U alone
            ys, probs = pick(base, self.temperature, generator)
            conf = None if draft.confidence_head is None else draft.confidence_head(hidden, None).float()
            return ys, probs, conf
        prev, rnn_state = tokens[0, :1], None
        picked, dists, embeds = [], [], []
        for k in range(length):  # the sequential stage: each slot conditions on the token drawn before it
            bias, e, rnn_state = draft.markov_head.step(hidden[k : k + 1], prev, rnn_state)
            prev, p = pick(base[k : k + 1] + bias.float(), self.temperature, generator)
            picked.append(prev)
            dists.append(p)
            embeds.append(e)
        conf = None
        if draft.confidence_head is not None:
            conf = draft.confidence_head(hidden, torch.cat(embeds)).float()
        probs = None if self.temperature <= 0 else torch.cat(cast("list[Tensor]", dists))
        return torch.cat(picked), probs, conf

    # ------------------------------------------------------------------ one round
    @torch.inference_mode()
    def step(self, state: DecodeState, generator: torch.Generator) -> list[int]:
        """One draft/verify round; commits and returns the new tokens (accepted drafts + corrected/bonus token)."""
        anchor = len(state.tokens) - 1
        length = self.verify_len
        ys, p_draft, conf = self.draft_block(state, length, generator)
        ids = torch.cat([torch.tensor(state.tokens[-1:], device=self.device), ys]).unsqueeze(0)
        logits, features = self._target_forward(ids, state.target_cache, logits_to_keep=0)
        if p_draft is None:
            n, nxt = greedy_verify(logits, ys)
        else:
            n, nxt = verify_block(probabilities(logits, self.temperature), p_draft, ys, generator)
        state.target_cache.crop(n - length)  # drop rejected drafts: keep x0 and y_<n; the next anchor is `nxt`
        self._append_context(state, features[:, : n + 1], anchor)
        new = [*ys[:n].tolist(), int(nxt)]
        state.tokens.extend(new)
        state.rounds.append(RoundRecord(length, n, None if conf is None else conf.tolist()))
        return new

    def generate(self, prompt_ids: list[int], max_new_tokens: int, generator: torch.Generator) -> DecodeState:
        """Decode until EOS or exactly `max_new_tokens` new tokens (the last round's extra tokens are dropped)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        state = self.prefill(prompt_ids, generator)
        done = state.tokens[-1] in self.eos or max_new_tokens == 1
        while not done:
            budget = max_new_tokens - len(state.generated)
            new = self.step(state, generator)
            kept, done = _truncate(new, budget, self.eos)
            del state.tokens[len(state.tokens) - len(new) + len(kept) :]
        return state


@torch.inference_mode()
def target_decode(
    target: nn.Module,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
    eos: set[int] | None = None,
) -> list[int]:
    """Plain target decoding with its KV cache and the same sampling rule; returns the generated ids."""
    from transformers import DynamicCache

    eos = eos_token_ids(target) if eos is None else eos
    device = next(target.parameters()).device
    cache = DynamicCache(config=cast("PreTrainedConfig", target.config))
    ids = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    while True:
        logits = target(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        token = pick(logits, temperature, generator)[0]
        out.append(int(token))
        if out[-1] in eos or len(out) >= max_new_tokens:
            return out
        ids = token.view(1, 1)
