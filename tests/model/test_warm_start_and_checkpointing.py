"""`recipe_args.draft_weights_path` warm starts and `distributed.activation_checkpointing` (single process)."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers.drafts import LOSS, batch, make_draft

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.loss import dspark_loss
from nemo_automodel_dspark.model.warm_start import load_warm_start


def loss_of(draft, target, seed: int = 0):
    ids, loss_mask, cap, anchors, keep = batch(target, draft, seed)
    out = draft(ids, cap.features, loss_mask, anchors, keep, target_hidden=cap.last_hidden)
    return dspark_loss(
        out.draft_logits, out.target_logits, out.target_ids, out.eval_mask, out.confidence_logits, LOSS
    ).numerator


def test_activation_checkpointing_gives_equal_loss_and_gradients(qwen3_target):
    plain, checkpointed = make_draft(qwen3_target), make_draft(qwen3_target)
    D.checkpoint_layers(checkpointed.layers)
    a, b = loss_of(plain, qwen3_target), loss_of(checkpointed, qwen3_target)
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    grads_a = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    grads_b = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in checkpointed.named_parameters()}
    assert grads_a.keys() <= grads_b.keys() and any("layers.1.mlp" in n for n in grads_a)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=1e-7, msg=name)
    # the servable tensor names do not change
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()


def test_warm_start_loads_a_saved_draft(qwen3_target, tmp_path):
    saved = make_draft(qwen3_target)
    with torch.no_grad():
        saved.fc.weight.add_(1.0)  # differs from a fresh draft's init
    saved.save_pretrained(tmp_path / "draft")
    fresh = make_draft(qwen3_target)
    assert not torch.equal(fresh.fc.weight, saved.fc.weight)
    load_warm_start(fresh, tmp_path / "draft")
    for name, value in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 6),
        ("mask_token_id", 94),
        ("target_layer_ids", [0, 1]),
        ("architectures", ["Gemma4DSparkModel"]),
        ("num_hidden_layers", 3),
    ],
)
def test_warm_start_refuses_a_different_draft_naming_the_field(qwen3_target, tmp_path, field, value):
    make_draft(qwen3_target).save_pretrained(tmp_path / "draft")
    config_path = tmp_path / "draft" / "config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"draft_weights_path .*: {field} is "):
        load_warm_start(make_draft(qwen3_target), tmp_path / "draft")


def test_warm_start_without_shared_embeddings_keeps_the_targets(qwen3_target, tmp_path):
    """Drafts saved without embed_tokens / lm_head (engines share the target's) load; the target's copies stay."""
    from safetensors.torch import load_file, save_file

    make_draft(qwen3_target).save_pretrained(tmp_path / "draft")
    weights = tmp_path / "draft" / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if k not in ("embed_tokens.weight", "lm_head.weight")}
    save_file(state, str(weights))
    fresh = make_draft(qwen3_target)
    embed = fresh.embed_tokens.weight.clone()
    load_warm_start(fresh, tmp_path / "draft")
    assert torch.equal(fresh.embed_tokens.weight, embed)
    state.pop("fc.weight")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing \['fc.weight'\]"):
        load_warm_start(make_draft(qwen3_target), tmp_path / "draft")


def test_warm_start_reads_the_files_a_served_draft_is_read_from(qwen3_target, tmp_path):
    """A stray `*.safetensors` beside `model.safetensors` (an older copy) is ignored, as `load_draft` ignores it: the
    warm start takes the weights the draft would be served with."""
    from safetensors.torch import save_file

    saved = make_draft(qwen3_target)
    saved.save_pretrained(tmp_path / "draft")
    stale = {k: v + 1.0 for k, v in saved.state_dict().items()}
    save_file(stale, str(tmp_path / "draft" / "old_model.safetensors"))  # sorts after model.safetensors
    fresh = make_draft(qwen3_target)
    with torch.no_grad():
        fresh.fc.weight.add_(2.0)
    load_warm_start(fresh, tmp_path / "draft")
    assert torch.equal(fresh.fc.weight, saved.fc.weight)
    (tmp_path / "draft" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"draft_weights_path .*: no weights"):
        load_warm_start(make_draft(qwen3_target), tmp_path / "draft")
