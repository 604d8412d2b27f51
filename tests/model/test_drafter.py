import dataclasses

import pytest
import torch
from _helpers.drafts import (
    batch,
    check_cached_backbone_matches_training,
    check_forward_backward_finite_and_frozen,
    check_same_outputs,
    make_draft,
    saved_tensor_names,
)

from nemo_automodel_dspark import DSparkConfig, DSparkDrafter
from nemo_automodel_dspark.model.families import family_for

VOCAB, MASK_ID = 96, 95


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("fixture", ["qwen3_target", "qwen3_moe_target"])
def test_forward_backward_finite_and_frozen(fixture, head, request):
    check_forward_backward_finite_and_frozen(request.getfixturevalue(fixture), head, VOCAB)


def test_slot_semantics(qwen3_target):
    draft = make_draft(qwen3_target)
    ids, loss_mask, cap, anchors, keep = batch(qwen3_target, draft)
    out = draft(ids, cap.features, loss_mask, anchors, keep)
    a = anchors[0, 0].item()
    assert out.target_ids[0, 0].tolist() == ids[0, a + 1 : a + 5].tolist()  # slot k predicts x_{a+k+1}
    assert out.teacher_positions[0, 0].tolist() == list(range(a, a + 4))
    teacher = draft.teacher_logits(cap.last_hidden, out.teacher_positions)
    full = qwen3_target(ids).logits
    torch.testing.assert_close(teacher[0, 0], full[0, a : a + 4])


def test_block_sees_only_context_before_its_anchor(qwen3_target):
    """Changing features at or after an anchor must not change that block's logits; before it, it must."""
    draft = make_draft(qwen3_target, markov_rank=0, confidence_head_with_markov=False)
    ids, loss_mask, cap, _, _ = batch(qwen3_target, draft)
    anchors, keep = torch.tensor([[10, 15], [12, 14]]), torch.ones(2, 2, dtype=torch.bool)
    base = draft(ids, cap.features, loss_mask, anchors, keep).draft_logits
    after = cap.features.clone()
    after[:, 10:] += 1.0
    same = draft(ids, after, loss_mask, anchors, keep).draft_logits
    torch.testing.assert_close(same[0, 0], base[0, 0])
    before = cap.features.clone()
    before[:, 9] += 1.0
    assert not torch.allclose(draft(ids, before, loss_mask, anchors, keep).draft_logits[0, 0], base[0, 0])


def test_rnn_stepwise_inference_equals_teacher_forced(qwen3_target):
    draft = make_draft(qwen3_target, markov_head_type="rnn")
    ids, loss_mask, cap, anchors, keep = batch(qwen3_target, draft)
    out = draft(ids, cap.features, loss_mask, anchors, keep)
    pos = anchors[0, 0].item()
    prev = ids[0, pos : pos + 4]
    head, state = draft.markov_head, None
    for k in range(4):
        bias, e, state = head.step(out.hidden[0, 0, k], prev[k], state)
        logits = draft.head_logits(out.hidden[0, 0, k]) + bias
        torch.testing.assert_close(logits, out.draft_logits[0, 0, k])
        conf = draft.confidence_head(out.hidden[0, 0, k], e)
        torch.testing.assert_close(conf, out.confidence_logits[0, 0, k])


def test_markov_rank_zero_with_markov_confidence_is_a_config_error():
    with pytest.raises(ValueError, match="confidence_head_with_markov: false"):
        DSparkConfig(mask_token_id=1, markov_rank=0, confidence_head_with_markov=True)
    DSparkConfig(mask_token_id=1, markov_rank=0, confidence_head_with_markov=False)


def test_the_drafter_does_not_mutate_its_config(qwen3_target):
    config = DSparkConfig(mask_token_id=MASK_ID, draft_num_hidden_layers=2, markov_rank=8)
    draft = DSparkDrafter(qwen3_target.config, config)
    assert config.target_layer_ids is None and draft.dspark.target_layer_ids == [1, 2]  # 4 target layers
    assert draft.dspark == dataclasses.replace(config, target_layer_ids=[1, 2])


def test_bad_options_name_the_key(qwen3_target):
    with pytest.raises(ValueError, match="markov_head_type"):
        DSparkConfig(mask_token_id=1, markov_head_type="lstm")
    with pytest.raises(ValueError, match="mask_token_id"):
        make_draft(qwen3_target, mask_token_id=VOCAB)
    with pytest.raises(ValueError, match="target_layer_ids': id 7"):
        make_draft(qwen3_target, target_layer_ids=[1, 7])


def test_unsupported_architecture_lists_supported(qwen3_target):
    config = qwen3_target.config.__class__(**qwen3_target.config.to_dict())
    config.architectures = ["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="unsupported target architecture.*Qwen3ForCausalLM.*Qwen3MoeForCausalLM"):
        family_for(config)


def test_rope_stays_fp32_in_bf16(qwen3_target):
    draft = make_draft(qwen3_target).to(torch.bfloat16)
    assert draft.rotary.inv_freq.dtype == torch.float32
    assert draft.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_save_load_round_trip(qwen3_target, tmp_path, head):
    import json

    draft = make_draft(qwen3_target, markov_head_type=head).eval()
    draft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["tie_word_embeddings"] is False
    assert config["num_hidden_layers"] == 2 and config["num_target_layers"] == 4
    assert config["block_size"] == 4 and config["mask_token_id"] == MASK_ID and config["target_layer_ids"] == [0, 2]
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path).num_hidden_layers == 2  # plain HF can read the dialect config
    names = saved_tensor_names(tmp_path)
    expected = {
        "embed_tokens.weight",
        "fc.weight",
        "hidden_norm.weight",
        "norm.weight",
        "lm_head.weight",
        "layers.0.self_attn.q_proj.weight",
        "layers.1.mlp.down_proj.weight",
        "markov_head.markov_w1.weight",
        "markov_head.markov_w2.weight",
        "confidence_head.proj.weight",
        "confidence_head.proj.bias",
    }
    assert expected <= names
    assert ("markov_head.gate_proj.weight" in names) == (head == "gated")
    assert ("markov_head.joint_proj.weight" in names) == (head == "rnn")
    check_same_outputs(qwen3_target, draft, DSparkDrafter.from_pretrained(tmp_path).eval())


def test_confidence_loss_trains_only_the_confidence_head(qwen3_target):
    draft = make_draft(qwen3_target)
    ids, loss_mask, cap, anchors, keep = batch(qwen3_target, draft)
    out = draft(ids, cap.features, loss_mask, anchors, keep)
    out.confidence_logits.sum().backward()
    for name, param in draft.named_parameters():
        if param.requires_grad:
            assert (param.grad is not None) == name.startswith("confidence_head"), name


def test_cached_context_backbone_equals_training_backbone(qwen3_target):
    check_cached_backbone_matches_training(qwen3_target)


def test_loss_of_a_tiny_drafter_falls_on_a_fixed_batch(qwen3_target):
    from nemo_automodel_dspark.loss import LossConfig, dspark_head_loss

    draft = make_draft(qwen3_target, markov_head_type="gated")
    ids, loss_mask, cap, anchors, keep = batch(qwen3_target, draft)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(30):
        out = draft(ids, cap.features, loss_mask, anchors, keep, target_hidden=cap.last_hidden)
        loss = dspark_head_loss(
            out.head,
            out.hidden,
            out.markov_features,
            out.teacher_hidden,
            out.target_ids,
            out.eval_mask,
            out.confidence_logits,
            LossConfig(loss_decay_gamma=4.0, ce_loss_alpha=0.1, l1_loss_alpha=0.9, confidence_head_alpha=1.0),
        )
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
        losses.append(loss.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("head", ["vanilla", "rnn"])
def test_fsdp2_wrapped_forward_returns_no_views(qwen3_target, tmp_path, head):
    """FSDP2 hooks backward onto the outputs and warns (on every rank's first screen) when one is a view: the
    training outputs own their storage, and the wrapped draft's first step prints no warning."""
    import warnings

    import torch.distributed as dist

    from nemo_automodel_dspark.distributed import fully_shard_draft

    draft = make_draft(qwen3_target, markov_head_type=head)
    ids, loss_mask, cap, anchors, keep = batch(qwen3_target, draft)
    plain = draft(ids, cap.features, loss_mask, anchors, keep)
    for name in ("hidden", "markov_features", "confidence_logits"):
        assert getattr(plain, name)._base is None, name
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        fully_shard_draft(draft, torch.device("cpu"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = draft(ids, cap.features, loss_mask, anchors, keep)
            (out.draft_logits.logsumexp(-1).mean() + out.confidence_logits.mean()).backward()
    finally:
        dist.destroy_process_group()
    assert [str(w.message) for w in caught if "view tensor" in str(w.message)] == []
    torch.testing.assert_close(out.confidence_logits, plain.confidence_logits)
