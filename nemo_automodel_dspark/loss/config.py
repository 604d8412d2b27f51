"""The objective's options (SPEC §4), declared once and passed whole to the loss, the metrics and the recipe."""

from __future__ import annotations

from dataclasses import dataclass

from nemo_automodel_dspark.options import Options, option, rule


@dataclass(frozen=True, kw_only=True)
class LossConfig(Options):
    """`loss = α_ce·CE + α_l1·L1 + α_conf·BCE`, each slot weighted by `exp(−k/γ)`; read from `recipe_args`."""

    SECTION = "recipe_args"

    ce_loss_alpha: float = option(0.1, ge=0, doc="weight of the cross-entropy to the data token")
    l1_loss_alpha: float = option(0.9, ge=0, doc="weight of the L1 (total variation) distance to the teacher")
    confidence_head_alpha: float = option(1.0, ge=0, doc="weight of the confidence BCE; 0 builds no confidence head")
    loss_decay_gamma: float | None = option(4.0, doc="slot k weighs exp(-k/gamma); null or <= 0 disables the decay")

    def rules(self) -> None:
        rule(
            self.ce_loss_alpha + self.l1_loss_alpha > 0,
            f"'{self.key('ce_loss_alpha')}' and '{self.key('l1_loss_alpha')}' are both 0: the draft would not learn",
        )
