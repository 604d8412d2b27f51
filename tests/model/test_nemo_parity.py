"""Our saved drafts against NeMo AutoModel 0.7.0's own `Qwen3DSparkModel` (a dependency): same tensors, same math.

NeMo's forward samples its anchors from the global RNG; we draw the same anchors with its own sampler under the same
seed and feed them to our forward, then compare the blocks NeMo keeps (slot 0 of a dropped block differs by design).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen3
from nemo_automodel.components.speculative.dspark.common import sample_anchor_positions
from nemo_automodel.components.speculative.dspark.draft_qwen3 import Qwen3DSparkModel
from safetensors.torch import load_file
from transformers import AutoConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from nemo_automodel_dspark import DSparkConfig, DSparkDrafter, capture_target_features
from nemo_automodel_dspark.model.families.gemma4 import _norm as gemma4_norm
from nemo_automodel_dspark.model.layers import RMSNorm

MASK_ID = 95


def _draft(target, **overrides) -> DSparkDrafter:
    options: dict = dict(
        mask_token_id=MASK_ID,
        draft_num_hidden_layers=2,
        block_size=4,
        num_anchors=6,
        markov_rank=8,
        target_layer_ids=[0, 2],
    )
    options.update(overrides)
    torch.manual_seed(3)
    draft = DSparkDrafter.from_target(target, DSparkConfig(**options))
    with torch.no_grad():  # non-trivial norm weights and biases, so a dropped scale or bias would show
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return draft.eval()


def _nemo(directory) -> Qwen3DSparkModel:
    config = AutoConfig.from_pretrained(directory)
    config._attn_implementation = "sdpa"
    nemo = Qwen3DSparkModel(config).eval()
    nemo.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return nemo


def _both_forwards(target, draft: DSparkDrafter, nemo: Qwen3DSparkModel, dtype: torch.dtype):
    """(ours, NeMo's) as dicts of hidden, base logits, Markov-corrected logits, confidence logits on kept blocks."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (2, 24), generator=g)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, :5] = 0
    features = capture_target_features(target, ids, None, draft.dspark.target_layer_ids).features.to(dtype)
    torch.manual_seed(11)
    anchors, keep = sample_anchor_positions(seq_len=24, loss_mask=loss_mask, num_anchors=6, device=ids.device)
    captured = {}
    handle = nemo.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("hidden", out))
    torch.manual_seed(11)
    with torch.no_grad():
        theirs = nemo(ids, features, loss_mask)
        ours = draft(ids, features, loss_mask, anchors, keep)
    handle.remove()
    hidden = captured["hidden"].view_as(ours.hidden)
    kept = keep.bool()
    a = dict(hidden=ours.hidden, base=draft.head_logits(ours.hidden), logits=ours.draft_logits)
    b = dict(hidden=hidden, base=nemo.compute_logits(hidden), logits=theirs.draft_logits)
    if ours.confidence_logits is not None:
        a["confidence"], b["confidence"] = ours.confidence_logits, theirs.confidence_pred
    return {k: v[kept] for k, v in a.items()}, {k: v[kept] for k, v in b.items()}


@pytest.mark.parametrize(
    "options",
    [
        dict(markov_head_type="vanilla"),
        dict(markov_head_type="gated"),
        dict(markov_head_type="rnn"),
        dict(markov_head_type="rnn", confidence_head_with_markov=False),
        dict(markov_rank=0, confidence_head_with_markov=False),
        dict(enable_confidence_head=False),
    ],
    ids=["vanilla", "gated", "rnn", "rnn-conf-plain", "no-markov", "no-confidence"],
)
def test_saved_draft_loads_strictly_into_nemo_and_computes_the_same_in_fp32(qwen3_target, options, tmp_path):
    draft = _draft(qwen3_target, **options)
    draft.save_pretrained(tmp_path)
    ours, theirs = _both_forwards(qwen3_target, draft, _nemo(tmp_path), torch.float32)
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_bf16_logits_match_nemo_within_a_tight_bound(qwen3_target, tmp_path):
    """With transformers' RMSNorm order the bf16 draft is NeMo's draft up to kernel rounding, not ~1e-2 apart."""
    draft = _draft(qwen3_target)
    draft.save_pretrained(tmp_path)
    ours, theirs = _both_forwards(qwen3_target, draft.bfloat16(), _nemo(tmp_path).bfloat16(), torch.bfloat16)
    for key in ours:
        diff = (ours[key].float() - theirs[key].float()).abs().max().item()
        assert diff <= 2e-3, (key, diff)
    assert torch.equal(ours["logits"].argmax(-1), theirs["logits"].argmax(-1))


def test_attention_bias_target_gives_a_biased_o_proj_that_nemo_loads(tmp_path):
    target = tiny_qwen3(layers=4, seed=1)
    target.config.attention_bias = True
    biased = type(target)(target.config).eval()
    draft = _draft(biased)
    names = set(draft.state_dict())
    assert {"layers.0.self_attn.o_proj.bias", "layers.1.self_attn.q_proj.bias"} <= names
    draft.save_pretrained(tmp_path)
    ours, theirs = _both_forwards(biased, draft, _nemo(tmp_path), torch.float32)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_rmsnorm_rounds_like_transformers_in_bf16():
    """Qwen3 casts the normalised x to bf16 before the weight; Gemma4 multiplies in fp32 first. Bit-exact both."""
    torch.manual_seed(0)
    x = (torch.randn(64, 48) * 3).bfloat16()
    weight = (1 + torch.randn(48) * 0.5).bfloat16()
    for ours, theirs in ((RMSNorm(48, 1e-6), Qwen3RMSNorm(48, 1e-6)), (gemma4_norm(48, 1e-6), Gemma4RMSNorm(48, 1e-6))):
        ours, theirs = ours.bfloat16(), theirs.bfloat16()
        with torch.no_grad():
            ours.weight.copy_(weight)
            theirs.weight.copy_(weight)
        assert ours(x).dtype == torch.bfloat16
        assert torch.equal(ours(x), theirs(x)), type(theirs).__name__
    qwen, gemma = RMSNorm(48, 1e-6).bfloat16(), gemma4_norm(48, 1e-6).bfloat16()
    with torch.no_grad():
        qwen.weight.copy_(weight)
        gemma.weight.copy_(weight)
    assert not torch.equal(qwen(x), gemma(x))  # the two orders do round differently: the test can tell them apart
