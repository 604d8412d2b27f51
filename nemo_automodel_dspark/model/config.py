"""The DSpark drafter's own options (SPEC §1), declared once; the target's architecture comes from its HF config.

`DSparkConfig` is frozen: `for_target` returns the copy checked against one target (mask row inside the
vocabulary, layer ids in range) with `target_layer_ids` resolved, and that copy is what the drafter holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nemo_automodel_dspark.model.layer_ids import default_target_layer_ids, validate_target_layer_ids
from nemo_automodel_dspark.options import ConfigError, Options, option, rule

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
ATTENTION_BACKENDS = ("flex_attention", "sdpa")


@dataclass(frozen=True, kw_only=True)
class DSparkConfig(Options):
    """Drafter options, read from `recipe_args`; `target_layer_ids=None` is the even spread of SPEC §2."""

    SECTION = "recipe_args"

    mask_token_id: int = option(ge=0, doc="id fed to the K-1 masked slots of a block; a row of the target's vocab")
    draft_num_hidden_layers: int = option(5, ge=1)
    block_size: int = option(7, ge=1, doc="K: the anchor slot plus K-1 drafted tokens")
    num_anchors: int = option(512, ge=1, doc="anchor blocks sampled per row")
    target_layer_ids: list[int] | None = option(None, ge=-1, doc="target layers whose outputs feed the draft")
    markov_rank: int = option(256, ge=0, doc="0 disables the Markov head")
    markov_head_type: str = option("vanilla", choices=MARKOV_HEAD_TYPES)
    confidence_head_with_markov: bool = option(True)
    freeze_embeddings: bool = option(True)
    attention_backend: str = option(
        "flex_attention", choices=ATTENTION_BACKENDS, doc="flex_attention runs on CUDA; elsewhere a dense mask is used"
    )
    enable_confidence_head: bool = option(True, from_yaml=False, doc="set from recipe_args.confidence_head_alpha > 0")
    confidence_temperatures: list[float] | None = option(None, gt=0, from_yaml=False, doc="written by calibrate")

    def rules(self) -> None:
        rule(
            not (self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0),
            f"'{self.key('confidence_head_with_markov')}': true needs the Markov embedding, but markov_rank is 0; "
            "set confidence_head_with_markov: false, or markov_rank > 0, or confidence_head_alpha: 0",
        )
        ids = self.target_layer_ids
        if ids is not None:
            rule(len(ids) > 0, f"'{self.key('target_layer_ids')}' must not be empty (null spreads them evenly)")
            rule(
                all(b > a for a, b in zip(ids, ids[1:], strict=False)),
                f"'{self.key('target_layer_ids')}' must be strictly increasing, got {ids}",
            )

    def for_target(self, num_target_layers: int, vocab_size: int) -> DSparkConfig:
        """This config checked against a target's text config, with `target_layer_ids` resolved (same object if set)."""
        rule(
            self.mask_token_id < vocab_size,
            f"'{self.key('mask_token_id')}' must be in [0, {vocab_size}) for this target, got {self.mask_token_id}",
        )
        ids = self.target_layer_ids or default_target_layer_ids(num_target_layers, self.draft_num_hidden_layers)
        bad = [i for i in ids if not -1 <= i <= num_target_layers - 1]
        if bad:
            raise ConfigError(
                f"'{self.key('target_layer_ids')}': id {bad[0]} is out of range for this target "
                f"({num_target_layers} layers); valid ids are -1..{num_target_layers - 1}"
            )
        ids = validate_target_layer_ids(ids, num_target_layers)
        return self if ids == self.target_layer_ids else dataclasses.replace(self, target_layer_ids=ids)
