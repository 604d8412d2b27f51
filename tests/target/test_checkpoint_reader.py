"""The streaming reader: every model tensor read whole from the safetensors files, equal to `from_pretrained`'s."""

from __future__ import annotations

import pytest
import torch
from _helpers.recipe_assets import build_target_dir
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from nemo_automodel_dspark.recipe.sharded_target import init_non_persistent_buffers
from nemo_automodel_dspark.target.checkpoint_reader import CheckpointReader, plan_sources
from nemo_automodel_dspark.target.loading import load_target, target_skeleton


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe", "gemma4"])
def folder_and_model(request, tmp_path_factory):
    folder = build_target_dir(tmp_path_factory.mktemp(request.param), family=request.param)
    return folder, load_target(str(folder), dtype=torch.float32, device=torch.device("cpu"))


def test_every_tensor_reads_as_from_pretrained_loads_it(folder_and_model):
    """Same names, values bit for bit (Qwen3-MoE: per-expert tensors fused in transformers' order; Gemma4: the tied
    lm_head read from the stored embedding); one reader per checkpoint, closed after."""
    folder, loaded = folder_and_model
    skeleton = target_skeleton(loaded.config, torch.float32)
    reader = CheckpointReader(folder)
    sources = plan_sources(skeleton, reader)
    assert not isinstance(sources, str), sources
    expected = loaded.state_dict()
    assert sorted(sources) == sorted(expected)
    unequal = [k for k, read in sources.items() if not torch.equal(read().float(), expected[k])]
    reader.close()
    assert unequal == []


def test_non_persistent_buffers_match_and_weights_stay(folder_and_model):
    """RoPE frequencies (and Gemma4's embed_scale) computed on an emptied skeleton equal the loaded model's; the
    weights next to them (Gemma4's scaled embedding) are not re-initialised."""
    _, loaded = folder_and_model
    skeleton = target_skeleton(loaded.config, torch.float32).to_empty(device="cpu")
    with torch.no_grad():
        for p in skeleton.parameters():
            p.fill_(7.0)
    init_non_persistent_buffers(skeleton)
    persistent = set(loaded.state_dict())
    expected = {k: v for k, v in loaded.named_buffers() if k not in persistent}
    assert expected, "every tiny target has RoPE buffers"
    got = dict(skeleton.named_buffers())
    assert [k for k, v in expected.items() if not torch.equal(got[k], v)] == []
    assert all(bool((p == 7.0).all()) for p in skeleton.parameters())


def test_an_unknown_layout_is_named(tmp_path):
    folder = build_target_dir(tmp_path / "t")
    state = load_file(str(folder / "model.safetensors"))
    state["model.final_norm.weight"] = state.pop("model.norm.weight")
    save_file(state, str(folder / "model.safetensors"))
    skeleton = target_skeleton(AutoConfig.from_pretrained(folder), torch.float32)
    reason = plan_sources(skeleton, CheckpointReader(folder))
    assert reason == "the checkpoint has no tensor (or none of the model's shape) for model.norm.weight"


def test_an_index_names_the_files(tmp_path):
    """Sharded files with an index: only the files it names are read, a stray copy beside them is ignored."""
    folder = build_target_dir(tmp_path / "t")
    loaded = load_target(str(folder), dtype=torch.float32, device=torch.device("cpu"))
    (folder / "model.safetensors").unlink()
    loaded.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    save_file({"model.norm.weight": torch.zeros(loaded.config.hidden_size)}, str(folder / "consolidated.safetensors"))
    reader = CheckpointReader(folder)
    sources = plan_sources(target_skeleton(loaded.config, torch.float32), reader)
    assert len(reader.files) > 1 and all(f.name != "consolidated.safetensors" for f in reader.files)
    assert not isinstance(sources, str)
    assert all(torch.equal(read(), loaded.state_dict()[k]) for k, read in sources.items())
    reader.close()
