"""Target families, keyed by the target's HF `architectures`; adding a family is one module + `register_family`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from torch import nn

# Modules imported on first lookup; each calls `register_family` for the families it defines.
_FAMILY_MODULES = ("nemo_automodel_dspark.model.families.qwen3", "nemo_automodel_dspark.model.families.gemma4")
_REGISTRY: dict[str, TargetFamily] = {}


@dataclass(frozen=True)
class DecoderParts:
    """Where a target's text stack keeps the pieces that capture hooks into."""

    base_model: nn.Module  # callable as base_model(input_ids=..., attention_mask=...) without the LM head
    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module

    @classmethod
    def of(cls, model: nn.Module, text: nn.Module) -> DecoderParts:
        """The parts of a causal LM `model` whose text stack `text` holds `embed_tokens`, `layers` and `norm`."""
        return cls(
            text,
            cast(nn.Module, text.embed_tokens),
            cast(nn.ModuleList, text.layers),
            cast(nn.Module, text.norm),
            cast(nn.Module, model.lm_head),
        )


@dataclass(frozen=True)
class TargetFamily:
    """Everything family-specific about a target and its draft; the recipe and drafter never branch on family."""

    name: str
    architectures: tuple[str, ...]  # target HF architectures this family serves
    draft_architecture: str  # `architectures` written into the servable draft's config.json
    text_config: Callable  # target HF config → its text config (vocab, hidden size, layers)
    decoder_parts: Callable[[nn.Module], DecoderParts]
    build_layer: Callable  # (text_config, layer_index) → draft decoder layer
    build_norm: Callable  # text_config → final / feature norm module
    model_class: Callable = field(default=lambda config: _auto_causal_lm())  # HF config → class to load the target
    check_supported: Callable = field(default=lambda text_config: None)
    embed_scale: Callable = field(default=lambda text_config: 1.0)
    logit_softcap: Callable = field(default=lambda text_config: None)


def _auto_causal_lm():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def register_family(family: TargetFamily) -> TargetFamily:
    for arch in (*family.architectures, family.draft_architecture):
        _REGISTRY[arch] = family
    return family


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(module)


def supported_architectures() -> list[str]:
    _load_families()
    return sorted({a for f in _REGISTRY.values() for a in f.architectures})


def family_for(config) -> TargetFamily:
    """The family of a target (or a saved draft) from its HF config's `architectures`."""
    _load_families()
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise ValueError(
        f"unsupported target architecture {archs or '(config has no architectures)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )
