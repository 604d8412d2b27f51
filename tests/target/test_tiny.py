"""The shared tiny-target builders: every family builds, is one the plugin supports, and explicit fields win."""

import pytest
import torch

from nemo_automodel_dspark.model.families import family_for
from nemo_automodel_dspark.target.tiny import FAMILIES, gemma4_layer_types, tiny_config, tiny_target


def _text(config):
    return getattr(config, "text_config", config)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_a_supported_target(family):
    target = tiny_target(family, num_hidden_layers=2, vocab_size=48)
    parts = family_for(target.config).decoder_parts(target)
    assert len(parts.layers) == 2 and parts.embed_tokens.weight.shape == (48, 32)
    assert not target.training and type(target).__name__ == target.config.architectures[0]
    logits = target(input_ids=torch.tensor([[1, 2, 3]])).logits  # [1, 3, V]
    assert logits.shape == (1, 3, 48) and torch.isfinite(logits).all()


def test_fields_override_family_defaults_and_the_seed_decides_the_weights():
    config = tiny_config("gemma4", num_hidden_layers=4, sliding_window=3)
    assert _text(config).layer_types == gemma4_layer_types(4) == ["sliding_attention"] + ["full_attention"] * 3
    assert _text(config).sliding_window == 3 and _text(config).final_logit_softcapping == 30.0
    assert tiny_config("qwen3_moe", num_experts=8).num_experts == 8
    a, b, c = (tiny_target("qwen3", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_an_unknown_family_names_the_choices():
    with pytest.raises(ValueError, match="unknown tiny family 'llama'; choose one of qwen3, qwen3_moe, gemma4"):
        tiny_config("llama")
