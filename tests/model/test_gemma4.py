"""Gemma4 targets and the Gemma4-style draft, on tiny configs built from transformers config classes."""

import json

import pytest
import torch
from _helpers.drafts import (
    batch,
    check_cached_backbone_matches_training,
    check_forward_backward_finite_and_frozen,
    check_fused_matches_materialised,
    check_same_outputs,
    make_draft,
    saved_tensor_names,
)

from nemo_automodel_dspark import DSparkConfig, DSparkDrafter, capture_target_features
from nemo_automodel_dspark.model.families import family_for
from nemo_automodel_dspark.model.families.gemma4 import Gemma4DraftLayer, draft_text_config
from nemo_automodel_dspark.model.layers import RotaryEmbedding, rope_inv_freq
from nemo_automodel_dspark.target.tiny import tiny_config, tiny_target

VOCAB, MASK_ID, SOFTCAP = 96, 95, 0.5
# Sliding layers: head_dim 8, 2 kv heads, default RoPE. Full layers: head_dim 16, proportional RoPE on a quarter of it,
# and (with K=V) one kv head. The draft must take the full-attention values.
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    global_head_dim=16,
    num_global_key_value_heads=1,
    layer_types=LAYER_TYPES,
    sliding_window=4,
    final_logit_softcapping=SOFTCAP,
    max_position_embeddings=128,
)


def text_config(kind: str = "conditional", **overrides):
    """The text config of a tiny Gemma4 (`kind` unified: the Unified variant's)."""
    family = "gemma4_unified" if kind == "unified" else "gemma4_causal"
    config = tiny_config(family, **{**TEXT, "attention_k_eq_v": True, **overrides})
    return config.text_config if kind == "unified" else config


def tiny_gemma4(kind: str = "conditional", seed: int = 0, **overrides):
    """kind: conditional (Gemma4ForConditionalGeneration), causal (Gemma4ForCausalLM) or unified."""
    family = {"conditional": "gemma4", "causal": "gemma4_causal", "unified": "gemma4_unified"}[kind]
    model = tiny_target(family, seed=seed, **{**TEXT, "attention_k_eq_v": True, **overrides})
    config = model.config
    with torch.no_grad():  # random norm weights and layer scalars, so that copying or skipping one shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
        for layer in family_for(config).decoder_parts(model).layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def targets():
    return {
        "conditional": tiny_gemma4(),
        "causal": tiny_gemma4("causal"),
        "unified": tiny_gemma4("unified"),
        "k_ne_v": tiny_gemma4(attention_k_eq_v=False),
    }


@pytest.mark.parametrize("kind", ["conditional", "causal", "unified"])
def test_capture_equals_hf_hidden_states(targets, kind):
    """hidden_states[0] of Gemma4 is the *scaled* embedding; capture must give exactly HF's tensors."""
    target = targets[kind]
    ids = torch.randint(0, 90, (2, 11), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    layer_ids = [-1, 1, 3]
    cap = capture_target_features(target, ids, attn, layer_ids)
    with torch.no_grad():
        hs = target(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
    assert len(hs) == 5
    torch.testing.assert_close(cap.features, torch.cat([hs[i + 1] for i in layer_ids], dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(cap.last_hidden, hs[-1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["conditional", "unified", "k_ne_v"])
def test_draft_layer_is_the_targets_full_attention_layer(targets, kind):
    """With the target's full-attention weights, no context and a causal mask, a draft layer IS that HF layer.

    This pins the sandwich norms, attention scale 1.0, q/k norms, the scale-less v_norm, K=V, the full-attention head
    dim and kv heads, the proportional RoPE, layer_scalar and the HF tensor names (strict load).
    """
    target = targets[kind]
    hf_layer = family_for(target.config).decoder_parts(target).layers[1]  # a full-attention layer
    view = draft_text_config(target.config)
    layer = Gemma4DraftLayer(view, 0).eval()
    layer.load_state_dict(hf_layer.state_dict(), strict=True)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(9).expand(2, -1)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    rope = RotaryEmbedding(*rope_inv_freq(view, view.head_dim))(pos, x.dtype)
    ours = layer(x, x[:, :0], rope, rope, causal)
    text_model = family_for(target.config).decoder_parts(target).base_model
    with torch.no_grad():
        hf_rope = text_model.rotary_emb(x, pos, "full_attention")
        theirs = hf_layer(x, shared_kv_states={}, position_embeddings=hf_rope, attention_mask=causal, position_ids=pos)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("kind", ["conditional", "causal", "k_ne_v"])
def test_forward_backward_finite_and_frozen(targets, kind, head):
    check_forward_backward_finite_and_frozen(targets[kind], head, VOCAB)


@pytest.mark.parametrize("kind", ["conditional", "causal"])
def test_teacher_logits_are_the_targets_softcapped_logits(targets, kind):
    target = targets[kind]
    draft = make_draft(target)
    ids, loss_mask, cap, anchors, keep = batch(target, draft)
    out = draft(ids, cap.features, loss_mask, anchors, keep, target_hidden=cap.last_hidden)
    with torch.no_grad():
        full = target(input_ids=ids).logits  # HF applies final_logit_softcapping
    expected = torch.stack([full[b, out.teacher_positions[b].flatten()] for b in range(2)]).view_as(out.target_logits)
    torch.testing.assert_close(out.target_logits, expected)
    raw = draft.lm_head(cap.last_hidden)
    assert not torch.allclose(torch.tanh(raw / SOFTCAP) * SOFTCAP, raw, atol=1e-3)  # the cap is not a no-op here


def test_draft_logits_are_softcapped_before_the_markov_bias(targets):
    target = targets["conditional"]
    plain = make_draft(target, markov_rank=0, confidence_head_with_markov=False)
    ids, loss_mask, cap, anchors, keep = batch(target, plain)
    assert plain(ids, cap.features, loss_mask, anchors, keep).draft_logits.abs().max() <= SOFTCAP
    draft = make_draft(target)
    with torch.no_grad():
        draft.markov_head.markov_w1.weight.normal_(std=1.0)  # a bias far larger than the cap
        draft.markov_head.markov_w2.weight.normal_(std=1.0)
        out = draft(ids, cap.features, loss_mask, anchors, keep)
        prev = torch.gather(ids, 1, out.teacher_positions.flatten(1)).view_as(out.teacher_positions)
        bias, _ = draft.markov_head(out.hidden, prev)
    torch.testing.assert_close(out.draft_logits, draft.head_logits(out.hidden) + bias)
    assert out.draft_logits.abs().max() > SOFTCAP


def test_fused_loss_equals_loss_of_the_materialised_softcapped_logits(targets):
    target = targets["conditional"]
    draft = make_draft(target, markov_head_type="rnn", freeze_embeddings=False)
    check_fused_matches_materialised(draft, *batch(target, draft))


@pytest.mark.parametrize("kind", ["conditional", "causal", "unified", "k_ne_v"])
def test_save_load_round_trip(targets, kind, tmp_path):
    target = targets[kind]
    draft = make_draft(target, markov_head_type="rnn").eval()
    draft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Gemma4DSparkModel"] and config["tie_word_embeddings"] is False
    assert config["model_type"] == ("gemma4_unified_text" if kind == "unified" else "gemma4_text")
    kv_heads = 2 if kind == "k_ne_v" else 1
    assert config["global_head_dim"] == config["head_dim"] == 16
    assert config["num_global_key_value_heads"] == config["num_key_value_heads"] == kv_heads
    assert config["final_logit_softcapping"] == SOFTCAP and config["num_target_layers"] == 4
    names = saved_tensor_names(tmp_path)
    expected = {
        "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.q_norm.weight",
        "layers.0.layer_scalar",
        "layers.0.pre_feedforward_layernorm.weight",
        "layers.1.post_feedforward_layernorm.weight",
        "layers.1.post_attention_layernorm.weight",
        "layers.1.mlp.gate_proj.weight",
        "norm.weight",
    }
    assert expected <= names
    assert ("layers.0.self_attn.v_proj.weight" in names) == (kind == "k_ne_v")
    loaded = DSparkDrafter.from_pretrained(tmp_path).eval()
    assert loaded.logit_softcap == SOFTCAP and loaded.embed_scale == draft.embed_scale == 32**0.5
    assert torch.equal(loaded.rotary.inv_freq, draft.rotary.inv_freq)
    check_same_outputs(target, draft, loaded)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16), "enable_moe_block"),
        (dict(hidden_size_per_layer_input=8), "hidden_size_per_layer_input"),
        (dict(use_double_wide_mlp=True, num_kv_shared_layers=2), "use_double_wide_mlp.*num_kv_shared_layers"),
        (dict(hidden_activation="relu"), "hidden_activation"),
    ],
)
def test_unsupported_variants_name_the_field(overrides, field):
    config = text_config(**overrides)
    config.architectures = ["Gemma4ForCausalLM"]
    with pytest.raises(ValueError, match=field):
        DSparkDrafter(config, DSparkConfig(mask_token_id=MASK_ID, draft_num_hidden_layers=1, target_layer_ids=[1]))


def test_kv_shared_layers_alone_are_supported():
    """KV sharing only changes how the target computes its own k/v; the draft layers have their own."""
    config = text_config(num_kv_shared_layers=2)
    config.architectures = ["Gemma4ForCausalLM"]
    draft = DSparkDrafter(config, DSparkConfig(mask_token_id=MASK_ID, draft_num_hidden_layers=1, target_layer_ids=[1]))
    assert draft.layers[0].mlp.up_proj.out_features == 64


def test_model_class_follows_the_architecture(targets):
    for kind in ("conditional", "causal", "unified"):
        config = targets[kind].config
        assert family_for(config).model_class(config) is type(targets[kind])


def test_cached_context_backbone_equals_training_backbone(targets):
    check_cached_backbone_matches_training(targets["conditional"])
