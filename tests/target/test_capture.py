import pytest
import torch

from nemo_automodel_dspark.model.layer_ids import default_target_layer_ids, unservable_ids, validate_target_layer_ids
from nemo_automodel_dspark.target.capture import capture_target_features, is_right_padded
from nemo_automodel_dspark.target.tiny import tiny_target


def test_default_spread_is_even_and_servable():
    assert default_target_layer_ids(28, 5) == [1, 7, 14, 20, 26]  # 1 + i·25/4, rounded
    assert default_target_layer_ids(28, 1) == [26]
    assert default_target_layer_ids(4, 1) == [2]  # the demo's target
    assert default_target_layer_ids(4, 5) == [1, 2]  # deduplicated, never past n-2
    assert default_target_layer_ids(2, 3) == [0] and default_target_layer_ids(3, 2) == [1]
    for n in range(3, 65):
        for f in range(1, 9):
            ids = default_target_layer_ids(n, f)
            assert unservable_ids(ids, n) == [] and min(ids) >= 1 and ids == sorted(set(ids)), (n, f)
            assert ids[-1] == n - 2 and len(ids) == min(f, n - 2), (n, f)


def test_unservable_ids_are_the_embeddings_and_the_final_norm():
    assert unservable_ids([-1, 0, 5, 26, 27], 28) == [-1, 27]


@pytest.mark.parametrize(
    "ids, match",
    [
        ([], "empty"),
        ([1, 1], "strictly increasing"),
        ([3, 1], "strictly"),
        ([-2, 1], "id -2"),
        ([1, 4], "id 4 .* -1..3"),
    ],
)
def test_bad_ids_name_the_id(ids, match):
    with pytest.raises(ValueError, match=match):
        validate_target_layer_ids(ids, 4)


@pytest.mark.parametrize("fixture", ["qwen3_target", "qwen3_moe_target"])
def test_capture_equals_hf_hidden_states(fixture, request):
    target = request.getfixturevalue(fixture)
    ids = torch.randint(0, 90, (2, 11), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    layer_ids = [-1, 1, 3]
    layer_ids = validate_target_layer_ids(layer_ids, 4)
    cap = capture_target_features(target, ids, attn, layer_ids)
    with torch.no_grad():
        hs = target(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
    expected = torch.cat([hs[i + 1] for i in layer_ids], dim=-1)
    torch.testing.assert_close(cap.features, expected, rtol=0, atol=0)
    torch.testing.assert_close(cap.last_hidden, hs[-1], rtol=0, atol=0)
    assert not cap.features.requires_grad


def test_hooks_removed_when_forward_raises(qwen3_target):
    parts = qwen3_target.model
    modules = [parts.embed_tokens, parts.layers[1], parts.norm]
    before = [dict(m._forward_hooks) for m in modules]
    with pytest.raises(IndexError):  # token id outside the vocabulary fails inside the target forward
        capture_target_features(qwen3_target, torch.full((1, 4), 10_000), None, [-1, 1])
    assert [dict(m._forward_hooks) for m in modules] == before


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gemma4"])
def test_right_padding_needs_no_mask(family):
    """Causal attention: right padding cannot reach a real token, so the target runs without a padding mask and the
    captured features of every real token are those of the masked forward (Gemma4: its sliding window of 8 is
    shorter than the rows, so the sliding layers' own mask is exercised too)."""
    target = tiny_target(family, pad_token_id=0)
    lengths = [24, 13, 9]
    ids = torch.randint(2, 60, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(24) < torch.tensor(lengths)[:, None]).long()
    ids = torch.where(mask.bool(), ids, 0)  # pad id 0
    assert is_right_padded(mask)
    layer_ids = [0, 1]
    masked = capture_target_features(target, ids, mask, layer_ids)
    unmasked = capture_target_features(target, ids, None, layer_ids)
    real = mask.bool()
    torch.testing.assert_close(unmasked.features[real], masked.features[real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unmasked.last_hidden[real], masked.last_hidden[real], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unmasked.last_hidden[~real], masked.last_hidden[~real])  # only padding differs


def test_is_right_padded():
    assert is_right_padded(torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]]))
    assert not is_right_padded(torch.tensor([[1, 1, 0], [0, 1, 1]]))  # left padding
    assert not is_right_padded(torch.tensor([[1, 0, 1]]))  # a hole
