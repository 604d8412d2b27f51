"""Divergence guard: a NaN or an exploded (finite) loss injected into one step is never applied; the run stops naming
the step, the value, the reference and the last good checkpoint, or skips and counts it when
`recipe_args.max_skipped_steps` allows; non-finite weights are never saved; the reference survives a resume."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from _helpers.recipe_assets import base_config, write_config
from safetensors.torch import load_file

from nemo_automodel_dspark.recipe.config import ConfigError, RecipeArgs
from nemo_automodel_dspark.recipe.guards import NON_FINITE, REFERENCE_STEPS, DivergenceGuard, RunStopped
from nemo_automodel_dspark.train_dspark import TrainDSparkRecipe, main


def poison_step(recipe: TrainDSparkRecipe, bad_step: int, factor: float = float("nan")) -> None:
    """Multiply every loss of optimizer step `bad_step` (1-based) by `factor`: NaN by default, as an absurd
    learning rate gives; a huge finite factor is a loss that explodes (8e11 in the issue)."""
    forward = recipe.runner._forward_loss

    def patched(batch, anchors, keep):
        loss = forward(batch, anchors, keep)
        if recipe.step + 1 == bad_step:
            loss.numerator = loss.numerator * factor
            loss.sums = {k: v * factor for k, v in loss.sums.items()}
        return loss

    recipe.runner._forward_loss = patched


def verdicts(guard: DivergenceGuard, losses: list[float | None]) -> list[str | None]:
    """Feed `losses` as steps (grad norm 1.0) the way `DSparkStep.train_step` does; one verdict per step."""
    found = []
    for loss in losses:
        found.append(guard.verdict(loss, 1.0))
        if found[-1] is None:
            guard.record(loss)
    return found


# ---------------------------------------------------------------------------------------- the rule, hand-built


def test_the_rule_waits_for_the_warm_up_then_compares_with_the_median_of_applied_steps():
    guard = DivergenceGuard(10.0, window=4)
    # warm-up: 3 applied steps are too few for a reference, so even 1e9 passes (it joins the window)
    assert verdicts(guard, [2.0, 1e9, 1.0]) == [None, None, None] and guard.reference() is None
    assert verdicts(guard, [3.0]) == [None]
    assert guard.recent == [2.0, 1e9, 1.0, 3.0] and guard.reference() == 2.5  # the median shrugs off the outlier
    assert verdicts(guard, [25.0]) == [None]  # exactly factor x reference: not above it
    assert guard.reference() == statistics.median([1e9, 1.0, 3.0, 25.0]) == 14.0
    refused = guard.verdict(140.5, 1.0)
    assert refused == (
        "loss 140.5 is above recipe_args.divergence_factor=10 x 14, the median loss of the last 4 applied steps"
    )
    assert guard.recent == [1e9, 1.0, 3.0, 25.0]  # a refused step never joins the reference


def test_non_finite_values_are_refused_even_in_the_warm_up_and_steps_without_tokens_are_ignored():
    guard = DivergenceGuard(10.0, window=2)
    assert guard.verdict(float("nan"), 1.0) == NON_FINITE and guard.verdict(1.0, math.inf) == NON_FINITE
    assert guard.verdict(float("inf"), 1.0) == NON_FINITE
    assert verdicts(guard, [1.0, None, 1.0, None]) == [None] * 4 and guard.recent == [1.0, 1.0]
    assert guard.verdict(11.0, 1e12) is not None and guard.verdict(10.0, 1e12) is None  # a big grad norm alone: fine


def test_a_zero_reference_gives_no_scale():
    guard = DivergenceGuard(10.0, window=2)
    assert verdicts(guard, [0.0, 0.0, 5.0]) == [None, None, None] and guard.reference() == 2.5


def test_the_rule_is_off_with_a_null_factor():
    guard = DivergenceGuard(None, window=2)
    assert verdicts(guard, [1.0, 1.0, 8e11]) == [None, None, None]
    assert guard.verdict(float("nan"), 1.0) == NON_FINITE


def test_a_resumed_guard_decides_exactly_as_an_uninterrupted_one():
    losses = [5.0, 4.0, 4.5, None, 3.0, 400.0, 2.5, 2.0, 8e11, 1.9, 300.0, 1.8]
    reference = verdicts(DivergenceGuard(50.0, window=3), losses)
    assert [i for i, v in enumerate(reference) if v] == [5, 8, 10]  # 400 > 50 x 4, 8e11 > 50 x 2.5, 300 > 50 x 2
    for cut in range(len(losses) + 1):
        first = DivergenceGuard(50.0, window=3)
        head = verdicts(first, losses[:cut])
        saved = json.loads(json.dumps(first.state_dict()))  # through the JSON of trainer_state.json
        resumed = DivergenceGuard(50.0, window=3)
        resumed.load_state_dict(saved)
        assert head + verdicts(resumed, losses[cut:]) == reference
    old = DivergenceGuard(50.0, window=3)
    old.load_state_dict(None)  # a checkpoint from before the rule: the warm-up starts again
    assert old.recent == []


@pytest.mark.parametrize("value", [1.0, 0.5, -3])
def test_divergence_factor_must_be_above_one(value):
    options = dict(target_model_name_or_path="t", train_data_path="d", output_dir="o", seq_length=8)
    with pytest.raises(ConfigError, match=rf"^'recipe_args.divergence_factor' must be > 1 or null, got {value}"):
        RecipeArgs(**options, divergence_factor=value)
    assert RecipeArgs(**options).divergence_factor == 100.0  # the default
    assert RecipeArgs(**options, divergence_factor=None).divergence_factor is None


# ---------------------------------------------------------------------------------------- real tiny steps


def ckpt_weights(out: Path, step: int) -> dict:
    return load_file(str(out / "ckpt" / f"epoch_0_step_{step}" / "model.safetensors"))


def steps_logged(out: Path) -> list[int]:
    lines = (out / "dspark_train_metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_nan_step_stops_the_run_naming_the_step_and_last_checkpoint(tiny_assets, tmp_path):
    out = tmp_path / "run"
    recipe = TrainDSparkRecipe(base_config(tiny_assets, out, max_steps=4, ckpt_every_steps=1))
    recipe.setup()
    poison_step(recipe, 3)
    with pytest.raises(RunStopped) as info:
        recipe.run_train_validation_loop()
    message = str(info.value)
    assert message.startswith("step 3: non-finite loss or gradient norm; the update was not applied")
    # step 3's loss came from the weights of step 2, so the last good checkpoint is the one before them
    assert f"the last good checkpoint is {out / 'ckpt' / 'epoch_0_step_1'}" in message
    assert (out / "ckpt" / "epoch_0_step_2").exists() and not (out / "ckpt" / "epoch_0_step_3").exists()
    # nothing earlier was lost, and the weights in memory are still those of step 2 (the NaN was never applied)
    assert steps_logged(out) == [1, 2]
    saved = ckpt_weights(out, 2)
    assert all(torch.equal(saved[k], v) for k, v in recipe.draft.state_dict().items() if k in saved)
    assert all(torch.isfinite(p).all() for p in recipe.draft.parameters())


def test_allowed_skips_leave_weights_and_optimizer_untouched_and_are_counted(tiny_assets, tmp_path):
    out = tmp_path / "skip"
    recipe = TrainDSparkRecipe(base_config(tiny_assets, out, max_steps=3, ckpt_every_steps=1, max_skipped_steps=1))
    recipe.setup()
    poison_step(recipe, 2)
    recipe.run_train_validation_loop()
    one, two = ckpt_weights(out, 1), ckpt_weights(out, 2)
    assert all(torch.equal(one[k], two[k]) for k in one)  # the skipped step changed nothing
    opt1 = torch.load(out / "ckpt" / "epoch_0_step_1" / "optimizer.pt", weights_only=True)
    opt2 = torch.load(out / "ckpt" / "epoch_0_step_2" / "optimizer.pt", weights_only=True)
    for key, state in opt1["state"].items():
        assert all(torch.equal(v, opt2["state"][key][k]) for k, v in state.items())
    records = [json.loads(line) for line in (out / "dspark_train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3]  # step 2's window held only the skipped step
    assert records[-1]["skipped_steps"] == 1 and all(r["loss"] == r["loss"] for r in records)
    state = json.loads((out / "ckpt" / "epoch_0_step_3" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1


def test_second_non_finite_step_beyond_the_allowance_stops(tiny_assets, tmp_path):
    out = tmp_path / "two"
    recipe = TrainDSparkRecipe(base_config(tiny_assets, out, max_steps=3, max_skipped_steps=1))
    recipe.setup()
    for p in recipe.draft.parameters():  # poisoned weights make every later step non-finite
        if p.requires_grad:
            p.data.fill_(float("nan"))
            break
    stop = r"step 2: non-finite .*\(2 refused steps, recipe_args.max_skipped_steps=1\); no good checkpoint was written "
    stop += r"yet. Lower optimizer.lr and start again \(recipe_args.overwrite_output_dir: true moves this run aside\)"
    with pytest.raises(RunStopped, match=stop):
        recipe.run_train_validation_loop()


def test_a_checkpoint_with_non_finite_weights_is_never_written(tiny_assets, tmp_path):
    out = tmp_path / "save"
    recipe = TrainDSparkRecipe(base_config(tiny_assets, out, max_steps=1))
    recipe.setup()
    name, param = next((n, p) for n, p in recipe.draft.named_parameters() if p.requires_grad)
    param.data[0] = float("inf")
    recipe.step = 1
    with pytest.raises(RunStopped, match=rf"step 1: the draft has non-finite weights \({name}\); no checkpoint"):
        recipe._save(0)
    assert not (out / "ckpt").exists() or not any((out / "ckpt").iterdir())


def test_main_prints_one_line_and_exits_non_zero(tiny_assets, tmp_path, capsys):
    cfg = base_config(tiny_assets, tmp_path / "lr", max_steps=2)
    cfg["optimizer"]["lr"] = 1e30  # an absurd learning rate: the loss is non-finite from step 2
    path = write_config(cfg, tmp_path / "lr.yaml")
    with pytest.raises(SystemExit) as info:
        main(["-c", str(path)])
    assert info.value.code == 2  # every one-line stop exits like a refused option
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dspark train: error: step ") and "Traceback" not in "\n".join(err)


def test_an_exploding_finite_loss_stops_the_run_naming_the_value_and_the_reference(tiny_assets, tmp_path):
    out, bad = tmp_path / "explode", REFERENCE_STEPS + 2
    cfg = base_config(tiny_assets, out, max_steps=bad + 1, ckpt_every_steps=1, log_every_steps=1)
    recipe = TrainDSparkRecipe(cfg)
    recipe.setup()
    poison_step(recipe, bad, factor=1e11)
    with pytest.raises(RunStopped) as info:
        recipe.run_train_validation_loop()
    records = [json.loads(line) for line in (out / "dspark_train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, bad))
    reference = recipe.runner.guard.reference()
    assert reference == pytest.approx(statistics.median(r["loss"] for r in records[-REFERENCE_STEPS:]), rel=1e-5)
    exploded, good = recipe.runner.last_loss, out / "ckpt" / f"epoch_0_step_{bad - 2}"
    assert exploded is not None and math.isfinite(exploded) and exploded > 1e10
    assert str(info.value) == (
        f"step {bad}: loss {exploded:.4g} is above recipe_args.divergence_factor=100 x {reference:.4g}, the median "
        f"loss of the last {REFERENCE_STEPS} applied steps; the update was not applied and the run stopped; the last "
        f"good checkpoint is {good}. Lower optimizer.lr and resume with checkpoint.restore_from: {good}, or let the "
        "run skip such steps with recipe_args.max_skipped_steps"
    )
    # the exploded step reached neither the weights nor a checkpoint; every earlier checkpoint is kept
    saved = ckpt_weights(out, bad - 1)
    assert all(torch.equal(saved[k], v) for k, v in recipe.draft.state_dict().items() if k in saved)
    assert sorted((out / "ckpt").iterdir())[-1].name == f"epoch_0_step_{bad - 1}"


def test_the_guard_s_loss_is_the_logged_loss_and_its_reference_is_checkpointed(tiny_assets, tmp_path):
    out = tmp_path / "ref"
    recipe = TrainDSparkRecipe(base_config(tiny_assets, out, max_steps=3, ckpt_every_steps=1, log_every_steps=1))
    recipe.setup()
    recipe.run_train_validation_loop()
    logged = [json.loads(line)["loss"] for line in (out / "dspark_train_metrics.jsonl").read_text().splitlines()]
    assert recipe.runner.guard.recent == pytest.approx(logged, rel=1e-5)
    state = json.loads((out / "ckpt" / "epoch_0_step_3" / "trainer_state.json").read_text())
    assert state["divergence"] == {"recent": recipe.runner.guard.recent}


def test_a_non_finite_grad_norm_makes_the_step_wide_loss_nan_even_with_finite_sums():
    """The grad norm joins the loss's all-reduced 'bad' flag, so every rank refuses such a step alike."""
    from types import SimpleNamespace

    from nemo_automodel_dspark.recipe.step import DSparkStep

    step = object.__new__(DSparkStep)
    step.info = SimpleNamespace(device=torch.device("cpu"), world_size=1)
    sums = {"ce": torch.tensor(3.0)}
    numerator, den = torch.tensor(6.0), torch.tensor(2.0)
    assert step._global_loss_and_norm(sums, numerator, den, torch.tensor(0.5)) == (3.0, 0.5)
    loss, norm = step._global_loss_and_norm(sums, numerator, den, torch.tensor(float("inf")))
    assert math.isnan(loss) and norm == float("inf")
