"""The recipe's state objects: progress and metrics window round-trip through state_dict, and the cadences."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_automodel_dspark.distributed import DistInfo
from nemo_automodel_dspark.recipe.config import parse_config
from nemo_automodel_dspark.recipe.state import MetricsWindow, Progress, due_after_step, every

CPU = torch.device("cpu")


def _info(rank: int = 0, world_size: int = 1) -> DistInfo:
    return DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=CPU)


def _sums(scale: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.tensor(2.0 * scale), "accept": torch.tensor([scale, 3.0 * scale])}


def test_progress_round_trips_and_reads_checkpoints_without_skipped_steps():
    progress = Progress(step=7, epoch=1, skipped_steps=2)
    restored = Progress()
    restored.load_state_dict(json.loads(json.dumps(progress.state_dict())))
    assert restored == progress
    old = Progress()
    old.load_state_dict({"step": 3, "epoch": 0})
    assert old == Progress(step=3, epoch=0, skipped_steps=0)


def test_window_adds_steps_and_logs_the_mean_grad_norm():
    window = MetricsWindow()
    window.add(_sums(1.0), torch.tensor(0.5))
    window.add(_sums(2.0), torch.tensor(1.5))
    window.tokens = 40
    reduced = window.reduce(_info())
    torch.testing.assert_close(reduced.sums["accept"], torch.tensor([3.0, 9.0]))
    assert reduced.sums["weight"].item() == 6.0
    assert reduced.grad_norm == pytest.approx(1.0) and reduced.tokens == 40.0 and window.steps == 2
    window.reset()
    assert window.sums is None and (window.steps, window.tokens, float(window.grad_norm)) == (0, 0, 0.0)


def test_a_restored_window_logs_what_the_saved_one_would_have_logged():
    """Saved reduced with grad norm x world size, restored on rank 0 alone: the next record is unchanged."""
    world = 2
    saved = MetricsWindow()
    saved.add(_sums(1.0), torch.tensor(3.0))  # the global grad norm: the same value on both ranks
    # Two ranks before the save: the reduce sums both ranks' grad norm (2 x 3.0) and divides by the world size.
    expected_grad_norm = (3.0 * world) / 1 / world
    state = json.loads(json.dumps(saved.state_dict(_info(0, world))))
    assert state["grad_norm"] == 3.0 * world and state["steps"] == 1

    rank0, rank1 = MetricsWindow(), MetricsWindow()
    rank0.load_state_dict(state, _info(0, world))
    rank1.load_state_dict(state, _info(1, world))
    assert rank1.sums is None and rank1.steps == 0  # other ranks start empty: the state is counted once
    # Without a process group the all-reduce is the identity, which is exactly rank 0's share (rank 1 adds 0).
    reduced = rank0.reduce(_info(0, world))
    assert reduced.grad_norm == pytest.approx(expected_grad_norm)
    torch.testing.assert_close(reduced.sums["accept"], torch.tensor([1.0, 3.0]))
    assert MetricsWindow().state_dict(_info()) is None


def test_every_is_never_for_null_or_zero():
    assert [s for s in range(1, 10) if every(3, s)] == [3, 6, 9]
    assert not any(every(None, s) or every(0, s) for s in range(1, 10))


def _config(**recipe_args) -> dict:
    args = dict(target_model_name_or_path="t", train_data_path="d", output_dir="o", seq_length=8, mask_token_id=3)
    return {"recipe_args": {**args, **recipe_args}, "optimizer": {"lr": 1e-3}, "checkpoint": {"ckpt_every_steps": 4}}


def test_cadences():
    cfg = parse_config(
        _config(
            log_every_steps=2, val_every_steps=3, val_data_path="v", eval_decode={"every_steps": 5, "data_path": "p"}
        )
    )
    due = [due_after_step(cfg, s, epoch_done=s == 6, last=s == 10, has_val=True) for s in range(1, 11)]
    assert [s for s, d in enumerate(due, 1) if d.log] == [2, 4, 6, 8, 10]
    assert [s for s, d in enumerate(due, 1) if d.validate] == [3, 6, 9]
    assert [s for s, d in enumerate(due, 1) if d.end_epoch] == [6]
    assert [s for s, d in enumerate(due, 1) if d.decode] == [5, 10]
    assert [s for s, d in enumerate(due, 1) if d.checkpoint] == [4, 8, 10]
    quiet = parse_config({**_config(log_every_steps=100), "checkpoint": {"enabled": False}})
    assert not any(vars(due_after_step(quiet, 7, epoch_done=False, last=False, has_val=False)).values())
    d = due_after_step(quiet, 7, epoch_done=True, last=True, has_val=False)
    assert d.log and d.end_epoch and not (d.validate or d.decode or d.checkpoint)


def test_console_lines_of_training_validation_and_decoding_records():
    from nemo_automodel_dspark.recipe.metrics import console_line

    train = {"step": 4, "epoch": 0, "loss": 3.13751, "tau": 1.2291, "lr": 0.0020667, "mem": 1.5}
    assert console_line(train) == "step 4 | epoch 0 | loss 3.138 | tau 1.229 | lr 0.002067"
    val = {"step": 4, "epoch": 0, "val/loss": 2.2761, "val/tau": 1.5551}
    assert console_line(val) == "step 4 | epoch 0 | val/loss 2.276 | val/tau 1.555"
    decode = {"step": 2, "epoch": 0, "decode/tau": 1.0769230769230769, "decode/speedup": None, "decode/rounds": 13}
    assert console_line(decode) == "step 2 | epoch 0 | decode/tau 1.077 | decode/rounds 13"
