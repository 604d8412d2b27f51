"""A kill or a failure in the middle of `save_draft` (or an export) never loses the draft saved there before, and
what it leaves behind is removed by the next writer of that folder, so nothing blocks or pollutes a later save."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _helpers.drafts import make_draft

from nemo_automodel_dspark.io import leftover_temps
from nemo_automodel_dspark.model import serving
from nemo_automodel_dspark.model.drafter import DSparkDrafter

# Writes the first half of the weights file, then SIGKILLs its own process: no `except`, no `finally` runs.
KILL_INSIDE_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from nemo_automodel_dspark.model import serving

    def half_then_kill(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    serving.save_file = half_then_kill
    serving.save_draft(None, sys.argv[1], state_dict={"w": torch.zeros(4)})
    """
)


def saved_names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def saved(qwen3_target, tmp_path):
    """A complete draft saved in `tmp_path / "draft"`, and its weights, to compare with after an interruption."""
    draft = make_draft(qwen3_target)
    folder = serving.save_draft(draft, tmp_path / "draft")
    return draft, folder, {k: v.clone() for k, v in draft.state_dict().items()}


def test_a_kill_inside_save_draft_loses_nothing_and_the_next_save_removes_its_temp(saved):
    draft, folder, before = saved
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", KILL_INSIDE_SAVE, str(folder)], env=env, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    temps = leftover_temps(folder)
    assert [p.name.startswith(".model.safetensors.") for p in temps] == [True]  # the killed write's temp, only
    # the draft saved before is whole and loads as it was
    loaded = serving.load_draft(DSparkDrafter, folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())
    # a later save into the folder removes the temp and leaves exactly the draft's two files
    with torch.no_grad():
        next(p for p in draft.parameters() if p.requires_grad).add_(1.0)
    serving.save_draft(draft, folder)
    assert saved_names(folder) == ["config.json", "model.safetensors"]
    again = serving.load_draft(DSparkDrafter, folder)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in draft.state_dict().items())


def test_a_failure_inside_save_draft_keeps_the_earlier_draft_and_leaves_no_temp(saved, monkeypatch):
    draft, folder, before = saved

    def half_then_full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serving, "save_file", half_then_full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        serving.save_draft(draft, folder)
    assert saved_names(folder) == ["config.json", "model.safetensors"]
    loaded = serving.load_draft(DSparkDrafter, folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())


def test_export_removes_the_temps_of_a_killed_export_into_the_same_folder(saved, tmp_path):
    from nemo_automodel_dspark.export.dialects import export_draft

    _, folder, _ = saved
    out = tmp_path / "export"
    out.mkdir()
    killed = [out / ".model.safetensors.0123456789ab", out / ".config.json.a1b2c3d4e5f6"]
    for path in killed:
        path.write_bytes(b"half")
    (out / ".keep.notes").write_text("not ours")  # a hidden file of the user's: never touched
    export_draft(folder, "nemo", out)
    assert saved_names(out) == [".keep.notes", "config.json", "model.safetensors"]
