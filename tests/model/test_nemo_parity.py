"""Our saved drafts against NeMo AutoModel 0.7.0's own `Qwen3DSparkModel` (a dependency): same tensors, same math.

NeMo's forward samples its anchors from the global RNG; we draw the same anchors with its own sampler under the same
seed and feed them to our forward, then compare the blocks NeMo keeps (slot 0 of a dropped block differs by design).
"""

from __future__ import annotations

import json

import pytest
import torch
from _helpers.nemo_drafts import nemo_saved_draft
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
from nemo_automodel_dspark.model.serving import DraftFormatError

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


# ------------------------------------------------------------------------------------- drafts NeMo's code writes
@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
@pytest.mark.parametrize(
    "rank, alpha", [(8, 1.0), (0, 1.0), (8, 0.0), (0, 0.0)], ids=["heads-on", "no-markov", "no-confidence", "none"]
)
def test_nemo_saved_draft_is_read_and_computes_what_nemo_computes(qwen3_target, tmp_path, sharded, rank, alpha):
    nemo = nemo_saved_draft(
        qwen3_target, tmp_path, sharded=sharded, markov_rank=rank, confidence_alpha=alpha, layer_ids=[0, 2]
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert ("markov_head_type" in config) == (rank > 0)  # the omissions this reader must fill in
    assert ("confidence_head_with_markov" in config) == (alpha > 0)
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    assert (tmp_path / "model.safetensors").is_file() != sharded
    draft = DSparkDrafter.from_pretrained(tmp_path).eval()
    assert (draft.markov_head is None) == (rank == 0) and (draft.confidence_head is None) == (alpha == 0)
    ours, theirs = _both_forwards(qwen3_target, draft, nemo, torch.float32)
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_unreadable_draft_folders_name_the_file_and_key(qwen3_target, tmp_path):
    nemo_saved_draft(qwen3_target, tmp_path, sharded=True, markov_rank=8, confidence_alpha=1.0, layer_ids=[0, 2])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).rename(tmp_path / "elsewhere")
    with pytest.raises(DraftFormatError, match=f"shard {shard} is listed in 'weight_map' but missing"):
        DSparkDrafter.from_pretrained(tmp_path)
    (tmp_path / "elsewhere").rename(tmp_path / shard)
    config = json.loads((tmp_path / "config.json").read_text())
    config["markov_rank"] = 4  # the saved markov tensors now have the wrong rank
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        DraftFormatError, match=r"wrongly shaped tensor\(s\) for its config.json: confidence_head.proj.weight"
    ):
        DSparkDrafter.from_pretrained(tmp_path)
    del config["block_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DraftFormatError, match=r"config.json: missing DSpark key\(s\) block_size"):
        DSparkDrafter.from_pretrained(tmp_path)


def test_dspark_evaluate_decodes_losslessly_with_a_nemo_saved_sharded_draft(tmp_path):
    from _helpers.recipe_assets import build_target_dir
    from transformers import AutoModelForCausalLM

    from nemo_automodel_dspark.cli import main

    target_dir = build_target_dir(tmp_path / "target")
    target = AutoModelForCausalLM.from_pretrained(target_dir)
    nemo_saved_draft(target, tmp_path / "draft", sharded=True, markov_rank=8, confidence_alpha=1.0, layer_ids=[0, 1])
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "w1 w2 w3"}]}) + "\n")
    report = tmp_path / "report.json"
    argv = ["evaluate", "--target", str(target_dir), "--draft", str(tmp_path / "draft"), "--data", str(data)]
    argv += ["--max-new-tokens", "10", "--device", "cpu", "--output", str(report)]
    assert main(argv) == 0
    result = json.loads(report.read_text())
    assert result["matches_target_greedy"] is True and result["rounds"] >= 1
