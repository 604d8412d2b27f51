"""What each serving engine can serve, stated once: the rules `serve_with` checks and `dspark export` refuses by.

Each rule names the engine file its fact comes from (vLLM's `qwen3_dspark.py` / `qwen3_dflash.py` at recent
revisions, SpecForge a6b6b02, speculators c05b95b, Model-Optimizer a2fbac7; see docs SERVING_FACTS.md). The facts
are restated in our words; where an engine's support was not read, no rule is claimed for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nemo_automodel_dspark.model.layer_ids import default_target_layer_ids, servable_range, unservable_ids

ENGINES = ("vllm", "sglang", "specforge", "speculators", "modelopt")


@dataclass(frozen=True)
class DraftOptions:
    """What the rules read. Target fields stay None until the target's config.json is read (then checked again)."""

    markov_rank: int
    markov_head_type: str
    enable_confidence_head: bool
    confidence_head_with_markov: bool
    target_layer_ids: list[int] | None  # None = the default spread, servable by construction
    num_target_layers: int | None = None
    family: str | None = None  # the draft family's name ("qwen3", "gemma4")


@dataclass(frozen=True)
class Finding:
    """One option an engine cannot serve: the recipe key, what goes wrong there, and what to change."""

    engine: str
    key: str
    problem: str
    fix: str
    source: str

    def message(self) -> str:
        return f"recipe_args.{self.key}: {self.engine} cannot serve this draft: {self.problem}; {self.fix}"


Check = Callable[[DraftOptions], tuple[str, str, str] | None]  # → (key, problem, fix) or None


@dataclass(frozen=True)
class Rule:
    engines: tuple[str, ...]
    source: str  # engine file(s) the fact is read from
    check: Check


def _layer_ids(o: DraftOptions) -> tuple[str, str, str] | None:
    if o.target_layer_ids is None:
        return None
    if o.num_target_layers is None:  # before the target is read, only -1 is known to be out of range
        bad = [i for i in o.target_layer_ids if i < 0]
        high = None
    else:
        bad = unservable_ids(o.target_layer_ids, o.num_target_layers)
        high = servable_range(o.num_target_layers)[1]
    if not bad:
        return None
    suggestion = "use ids >= 0"
    if o.num_target_layers is not None:
        spread = default_target_layer_ids(o.num_target_layers, len(o.target_layer_ids))
        suggestion = f"use ids in [0, {high}], e.g. the default {spread}"
    return (
        "target_layer_ids",
        f"ids {bad} have no capture point (it captures the residual stream entering layer id+1; -1 is the "
        "embeddings and n-1 the post-final-norm state, which it never hands to the draft)",
        suggestion + " (or leave target_layer_ids unset)",
    )


def _vanilla_only(o: DraftOptions) -> tuple[str, str, str] | None:
    if o.markov_rank == 0 or o.markov_head_type == "vanilla":
        return None
    return (
        "markov_head_type",
        f"its DSpark model has only the vanilla Markov head (markov_w1/markov_w2); a {o.markov_head_type} head's "
        "extra tensors fail its weight loader",
        "set markov_head_type: vanilla",
    )


def _markov_required(o: DraftOptions) -> tuple[str, str, str] | None:
    if o.markov_rank > 0:
        return None
    return "markov_rank", "its DSpark draft always builds the Markov head", "set markov_rank > 0 (default 256)"


def _confidence_with_markov(o: DraftOptions) -> tuple[str, str, str] | None:
    if not o.enable_confidence_head or o.confidence_head_with_markov:
        return None
    return (
        "confidence_head_with_markov",
        "its confidence head always reads the Markov embedding",
        "set confidence_head_with_markov: true (or confidence_head_alpha: 0)",
    )


def _qwen3_layers(o: DraftOptions) -> tuple[str, str, str] | None:
    if o.family in (None, "qwen3"):
        return None
    return (
        "target_model_name_or_path",
        f"its DSpark draft layer is Qwen3's; a {o.family} draft (its own norms and attention) has no counterpart there",
        "serve this draft with NeMo AutoModel / this plugin, or drop the engine from serve_with",
    )


RULES = (
    Rule(
        ("vllm", "sglang", "specforge", "speculators", "modelopt"),
        "vllm: model_executor/models/qwen3_dflash.py (aux layers from the speculative config, captured as the input "
        "of layer id+1); sglang: set_eagle3_layers_to_capture (same capture point); speculators: "
        "models/dspark/config.py (aux_hidden_state_layer_ids = ours + 1, the last layer only as a pre-norm input); "
        "SpecForge and Model-Optimizer drafts are served by those engines",
        _layer_ids,
    ),
    Rule(
        ("vllm",),
        "vllm: model_executor/models/qwen3_dspark.py (DSparkMarkovHead holds markov_w1/markov_w2 only)",
        _vanilla_only,
    ),
    Rule(
        ("vllm",),
        "vllm: model_executor/models/qwen3_dspark.py (Qwen3DSparkModel builds DSparkMarkovHead with markov_rank)",
        _markov_required,
    ),
    Rule(
        ("modelopt",),
        "Model-Optimizer: torch/speculative/plugins/modeling_dspark.py and hf_dspark.py (markov_rank > 0 required)",
        _markov_required,
    ),
    Rule(
        ("modelopt",),
        "Model-Optimizer: torch/speculative/plugins/modeling_dspark.py (confidence_proj reads hidden + Markov embed)",
        _confidence_with_markov,
    ),
    Rule(
        ("vllm", "sglang", "specforge", "speculators", "modelopt"),
        "vllm: qwen3_dspark.py; SpecForge: modeling/draft/dspark.py; speculators: models/dspark/model_definitions.py; "
        "Model-Optimizer: plugins/modeling_dspark.py (each builds Qwen3 decoder layers)",
        _qwen3_layers,
    ),
)


def findings(options: DraftOptions, engines: tuple[str, ...] | list[str] = ENGINES) -> list[Finding]:
    """Every rule broken for each engine in `engines`, in rule order."""
    out = []
    for engine in engines:
        for rule in RULES:
            if engine in rule.engines and (hit := rule.check(options)) is not None:
                out.append(Finding(engine, *hit, source=rule.source))
    return out


def check_unknown_engines(engines: list[str]) -> list[str]:
    """The names in `engines` that are not one of ENGINES."""
    return [e for e in engines if e not in ENGINES]
