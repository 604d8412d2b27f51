"""`DSparkDrafter`: parallel backbone over anchor blocks + feature projection + Markov and confidence heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from nemo_automodel_dspark.loss.head import LogitHead
from nemo_automodel_dspark.masks import (
    build_eval_mask,
    context_start,
    dense_block_mask,
    flex_block_mask,
    slot_positions,
)
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.families import TargetFamily, family_for
from nemo_automodel_dspark.model.heads import ConfidenceHead, MarkovHead
from nemo_automodel_dspark.model.layers import ContextBlockAttention, RotaryEmbedding, rope_inv_freq


@dataclass
class DSparkOutput:
    """What one training forward produces; losses are computed elsewhere (`dspark_head_loss`).

    No `[B, N, K, V]` tensor is built here: the objective applies `head` to `hidden`, `markov_features` and
    `teacher_hidden` chunk by chunk. `draft_logits` / `target_logits` materialise them (tests, diagnostics).
    """

    hidden: Tensor  # [B, N, K, H] backbone output after the final norm
    markov_features: Tensor | None  # [B, N, K, r] m with Markov bias b = W2·m (None without a Markov head)
    head: LogitHead  # the LM head (+ softcap) and W2, as this forward saw them
    eval_mask: Tensor  # [B, N, K] bool: supervised slots
    target_ids: Tensor  # [B, N, K] data token each slot predicts (x_{a+k+1})
    teacher_positions: Tensor  # [B, N, K] position whose target hidden gives the teacher distribution (a+k)
    confidence_logits: Tensor | None  # [B, N, K]
    teacher_hidden: Tensor | None = None  # [B, N, K, H] target final hidden at teacher_positions, when it was given

    @property
    def draft_logits(self) -> Tensor:
        """Materialised `Z = U + b` [B, N, K, V]."""
        return self.head.draft_logits(self.hidden, self.markov_features)

    @property
    def target_logits(self) -> Tensor | None:
        """Materialised teacher logits [B, N, K, V] (None without the target's hidden)."""
        return None if self.teacher_hidden is None else self.head.teacher_logits(self.teacher_hidden)


def init_weight_and_bias(weight: Tensor, bias: Tensor | None) -> None:
    """The draft's initialisation of every Linear and Embedding (after construction): N(0, 0.02), zero bias."""
    nn.init.normal_(weight, std=0.02)
    if bias is not None:
        nn.init.zeros_(bias)


class DSparkDrafter(nn.Module):
    """A DSpark draft for one target; module names are the serving tensor names (SPEC §8)."""

    def __init__(self, target_config, dspark: DSparkConfig, *, init_weights: bool = True) -> None:
        """`init_weights=False` leaves the N(0, 0.02) draws to `model.meta_init.materialize_draft` (meta builds)."""
        super().__init__()
        self.family: TargetFamily = family_for(target_config)
        text = self.family.text_config(target_config)
        self.family.check_supported(text)
        num_target_layers = text.num_hidden_layers
        dspark = dspark.for_target(num_target_layers, text.vocab_size)  # checked; target_layer_ids resolved
        assert dspark.target_layer_ids is not None
        self.dspark, self.text_config, self.target_config = dspark, text, target_config
        self.num_target_layers = num_target_layers
        hidden, vocab = text.hidden_size, text.vocab_size

        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.fc = nn.Linear(len(dspark.target_layer_ids) * hidden, hidden, bias=False)
        self.hidden_norm = self.family.build_norm(text)
        self.layers = nn.ModuleList(self.family.build_layer(text, i) for i in range(dspark.draft_num_hidden_layers))
        self.norm = self.family.build_norm(text)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
        with torch.device("cpu"):  # real frequencies even when the draft is built on the meta device
            self.rotary = RotaryEmbedding(*rope_inv_freq(text, head_dim))
        self.markov_head = (
            MarkovHead(hidden, vocab, dspark.markov_rank, dspark.markov_head_type) if dspark.markov_rank else None
        )
        self.confidence_head = (
            ConfidenceHead(hidden, dspark.markov_rank, dspark.confidence_head_with_markov)
            if dspark.enable_confidence_head
            else None
        )
        self.embed_scale = float(self.family.embed_scale(text))
        self.logit_softcap = self.family.logit_softcap(text)
        if init_weights:
            self.apply(self._init_weights)
        self.set_embeddings_trainable(not dspark.freeze_embeddings)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            init_weight_and_bias(module.weight, getattr(module, "bias", None))  # nn.Embedding has no bias

    def set_embeddings_trainable(self, trainable: bool) -> None:
        self.embed_tokens.weight.requires_grad_(trainable)
        self.lm_head.weight.requires_grad_(trainable)

    @classmethod
    def from_target(cls, target: nn.Module, dspark: DSparkConfig) -> DSparkDrafter:
        """A fresh draft for `target`, with the target's `embed_tokens` and `lm_head` copied in (frozen by default)."""
        parts = family_for(target.config).decoder_parts(target)
        embed, lm_head = cast(Tensor, parts.embed_tokens.weight), cast(Tensor, parts.lm_head.weight)
        return cls.from_embeddings(target.config, dspark, embed, lm_head)

    @classmethod
    def from_embeddings(cls, target_config, dspark: DSparkConfig, embed: Tensor, lm_head: Tensor) -> DSparkDrafter:
        """A fresh draft with the given target embedding [V, H] and LM head [V, H] copied in."""
        draft = cls(target_config, dspark)
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(embed)
            draft.lm_head.weight.copy_(lm_head)
        return draft

    # ------------------------------------------------------------------ forward pieces
    def head_logits(self, hidden: Tensor) -> Tensor:
        """Frozen LM head (+ the family's final softcap): [..., H] → [..., V]; also gives teacher logits."""
        logits = self.lm_head(hidden)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    @torch.no_grad()
    def teacher_logits(self, target_hidden: Tensor, teacher_positions: Tensor) -> Tensor:
        """Target next-token logits only at the supervised slots: [B, S, H] + [B, N, K] → [B, N, K, V]."""
        return self.head_logits(self.teacher_rows(target_hidden, teacher_positions).to(self.lm_head.weight.dtype))

    @staticmethod
    @torch.no_grad()
    def teacher_rows(target_hidden: Tensor, teacher_positions: Tensor) -> Tensor:
        """The target's final hidden at the supervised slots: [B, S, H] + [B, N, K] → [B, N, K, H]."""
        batch, n, k = teacher_positions.shape
        index = teacher_positions.view(batch, -1, 1).expand(-1, -1, target_hidden.shape[-1])
        return torch.gather(target_hidden, 1, index).view(batch, n, k, -1)

    def logit_head(self) -> LogitHead:
        """The weights the objective projects with (inside `forward`, FSDP2's gathered parameters)."""
        w2 = None if self.markov_head is None else self.markov_head.markov_w2.weight
        return LogitHead(weight=self.lm_head.weight, markov_weight=w2, softcap=self.logit_softcap)

    def project_context(self, target_features: Tensor) -> Tensor:
        """Concatenated target features [B, S, L·H] → context C [B, S, H] read by every backbone layer."""
        return self.hidden_norm(self.fc(target_features.to(self.fc.weight.dtype)))

    def attention_mask(self, anchors: Tensor, keep: Tensor, seq_len: int, start: Tensor | None = None):
        """Block attention mask; `start` [B, N] is each block's document start in packed rows."""
        if self.dspark.attention_backend == "flex_attention" and anchors.is_cuda:
            return flex_block_mask(anchors, keep, seq_len, self.dspark.block_size, start)
        return dense_block_mask(anchors, keep, seq_len, self.dspark.block_size, start)

    def backbone(
        self, block_tokens: Tensor, slot_pos: Tensor, ctx: Tensor, mask, ctx_pos: Tensor | None = None
    ) -> Tensor:
        """Parallel stage: block tokens [B, Q] at positions [B, Q] attend to ctx [B, S, H] → normed hidden [B, Q, H].

        `ctx_pos` [B, S] are the context rows' RoPE positions (default 0..S−1; per document in packed rows)."""
        x = self.embed_tokens(block_tokens) * self.embed_scale
        x = x.to(ctx.dtype)
        if ctx_pos is None:
            ctx_pos = torch.arange(ctx.shape[1], device=ctx.device).expand(ctx.shape[0], -1)
        rope_q = self.rotary(slot_pos, x.dtype)
        rope_kv = self.rotary(torch.cat([ctx_pos, slot_pos], dim=1), x.dtype)
        for layer in self.layers:
            x = layer(x, ctx, rope_q, rope_kv, mask)
        return self.norm(x)

    # ------------------------------------------------------------------ incremental inference (SPEC §5)
    def context_kv(self, target_features: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per-layer context keys/values for new committed rows: features [B, T, L·H], positions [B, T].

        Context rows never change once committed, so callers append these along dim 2 to a cache and pass the
        concatenation to `backbone_cached` each round instead of re-projecting the whole prefix.
        """
        ctx = self.project_context(target_features)
        rope = self.rotary(positions, ctx.dtype)
        return [cast(ContextBlockAttention, layer.self_attn).context_kv(ctx, rope) for layer in self.layers]

    def backbone_cached(self, block_tokens: Tensor, slot_pos: Tensor, ctx_kv: list[tuple[Tensor, Tensor]]) -> Tensor:
        """One block per row (tokens/positions [B, K]) seeing every cached context row → normed hidden [B, K, H]."""
        x = (self.embed_tokens(block_tokens) * self.embed_scale).to(ctx_kv[0][0].dtype)
        rope = self.rotary(slot_pos, x.dtype)
        for layer, kv in zip(self.layers, ctx_kv, strict=True):
            x = layer(x, None, rope, rope, None, kv)
        return self.norm(x)

    def block_tokens(self, input_ids: Tensor, anchors: Tensor) -> Tensor:
        """Slot 0 = anchor token, slots 1..K−1 = mask token → [B, N, K]."""
        tokens = anchors.new_full((*anchors.shape, self.dspark.block_size), self.dspark.mask_token_id)
        tokens[..., 0] = torch.gather(input_ids, 1, anchors)
        return tokens

    def forward(
        self,
        input_ids: Tensor,
        target_features: Tensor,
        loss_mask: Tensor,
        anchors: Tensor,
        block_keep: Tensor,
        target_hidden: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> DSparkOutput:
        """Teacher-forced training forward over N anchor blocks per row (input_ids [B, S], features [B, S, L·H]).

        With `target_hidden` [B, S, H] (the target's final-norm output) its rows at the supervised slots are returned
        too; the objective projects them through `out.head`, the LM head as this forward saw it.
        `position_ids` [B, S] marks packed rows (positions restart per document, `masks` module docstring): blocks
        then see only their document's context, at the document's RoPE positions.
        """
        batch, seq = input_ids.shape
        k = self.dspark.block_size
        pos = slot_positions(anchors, k)  # [B, N, K] row positions
        rope_pos = pos if position_ids is None else slot_positions(torch.gather(position_ids, 1, anchors), k)
        ctx = self.project_context(target_features)
        mask = self.attention_mask(anchors, block_keep, seq, context_start(anchors, position_ids))
        tokens = self.block_tokens(input_ids, anchors).flatten(1)
        hidden = self.backbone(tokens, rope_pos.flatten(1), ctx, mask, position_ids)
        hidden = _not_a_view(hidden.view(batch, -1, k, hidden.shape[-1]))  # [B, N, K, H]
        last = seq - 1
        prev_tokens = torch.gather(input_ids, 1, pos.clamp(max=last).flatten(1)).view_as(pos)  # x_{a+k}
        target_ids = torch.gather(input_ids, 1, (pos + 1).clamp(max=last).flatten(1)).view_as(pos)  # x_{a+k+1}
        markov, conf = self.heads(hidden, prev_tokens)
        return DSparkOutput(
            hidden=hidden,
            markov_features=markov,
            head=self.logit_head(),
            eval_mask=build_eval_mask(loss_mask, anchors, block_keep, k, position_ids),
            target_ids=target_ids,
            teacher_positions=pos.clamp(max=last),
            confidence_logits=None if conf is None else _not_a_view(conf),
            teacher_hidden=None if target_hidden is None else self.teacher_rows(target_hidden, pos.clamp(max=last)),
        )

    def heads(self, hidden: Tensor, prev_tokens: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Markov features m (bias b = W2·m) and confidence logits, teacher-forced on `prev_tokens` [B, N, K]."""
        markov, e = None, None
        if self.markov_head is not None:
            markov, e = self.markov_head.features(hidden, prev_tokens)
        conf = None
        if self.confidence_head is not None:
            # Detached inputs: the confidence loss trains only the confidence head, never the draft distribution.
            conf = self.confidence_head(hidden.detach(), None if e is None else e.detach())
        return markov, conf

    # ------------------------------------------------------------------ persistence (SPEC §8)
    def save_pretrained(self, directory) -> None:
        """Servable draft: `config.json` in the DSpark dialect + `model.safetensors`."""
        from nemo_automodel_dspark.model.serving import save_draft

        save_draft(self, directory)

    @classmethod
    def from_pretrained(cls, directory, *, device="cpu") -> DSparkDrafter:
        from nemo_automodel_dspark.model.serving import load_draft

        return load_draft(cls, directory, device=device)


def _not_a_view(t: Tensor) -> Tensor:
    """`t` in storage of its own (a copy when it is a view; a few MiB at most here, the view's base is then freed).

    FSDP2 hooks its backward all-gather onto the wrapped module's outputs and warns, once per rank and run, that the
    hook on a view is lost to any later in-place op; the training outputs are therefore never views.
    """
    return t if t._base is None else t.clone()
