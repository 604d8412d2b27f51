"""Each target family end to end through the registry: train 3 steps, save a servable draft, decode losslessly."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers.recipe_assets import base_config, build_target_dir

from nemo_automodel_dspark import DSparkDrafter
from nemo_automodel_dspark.inference.evaluate import run_evaluation
from nemo_automodel_dspark.inference.prompts import load_prompts
from nemo_automodel_dspark.target.loading import load_target, load_tokenizer
from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family, draft_arch", [("qwen3_moe", "Qwen3DSparkModel"), ("gemma4", "Gemma4DSparkModel")])
def test_family_trains_saves_and_decodes_losslessly(tmp_path, tiny_assets, family, draft_arch):
    target_dir = build_target_dir(tmp_path / family, family=family)
    assets = {**tiny_assets, "target": target_dir}
    out = tmp_path / "run"
    recipe = TrainDSparkRecipe(base_config(assets, out, max_steps=3, target_layer_ids=[0, 1]))
    recipe.setup()
    recipe.run_train_validation_loop()

    records = [json.loads(line) for line in (out / "dspark_train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    final = out / "ckpt" / "epoch_0_step_3"
    assert json.loads((final / "config.json").read_text())["architectures"] == [draft_arch]

    target = load_target(str(target_dir), dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(str(target_dir))
    draft = DSparkDrafter.from_pretrained(final).eval()
    prompts = load_prompts(tiny_assets["val"], tokenizer, num_prompts=3)
    run = run_evaluation(
        target,
        draft,
        tokenizer,
        prompts,
        temperature=0.0,
        max_new_tokens=12,
        verify_len=None,
        seed=0,
        measure_speed=False,
    )
    for prompt, gen in zip(prompts, run.generations, strict=True):
        ids = torch.tensor([prompt.ids])
        expected = target.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=0,
        )
        assert gen["token_ids"] == expected[0, ids.shape[1] :].tolist()
