"""`nemo_automodel_dspark.io`: writes are all-or-nothing, fsynced (file, then folder) and leave no temp behind."""

from __future__ import annotations

import json
import os

import pytest

from nemo_automodel_dspark import io


@pytest.fixture
def fsyncs(monkeypatch):
    """Records, in order, whether each fsync was of a folder ('dir') or a file ('file')."""
    calls: list[str] = []
    real = os.fsync

    def spy(fd):
        calls.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_write_replaces_and_fsyncs_file_then_folder(tmp_path, fsyncs):
    path = tmp_path / "sub" / "report.json"
    io.atomic_write_json(path, {"tau": 4.5, "name": "é"})
    io.atomic_write_json(path, {"tau": 5.0})
    assert json.loads(path.read_text()) == {"tau": 5.0}
    assert fsyncs == ["file", "dir", "file", "dir"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]  # no temp left


def test_files_get_the_permissions_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        io.atomic_write_bytes(tmp_path / "config.json", b"{}")
        (tmp_path / "plain").write_bytes(b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "rows.jsonl"
    io.atomic_write_jsonl(path, [{"a": 1}])

    def records():
        yield {"a": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.atomic_write_jsonl(path, records())
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_atomic_path_hands_a_sibling_temp_name_to_third_party_writers(tmp_path, fsyncs):
    path = tmp_path / "model.safetensors"
    with io.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.safetensors.")
        tmp.write_bytes(b"weights")
        assert not path.exists()  # nothing visible under the final name before the rename
    assert path.read_bytes() == b"weights"
    assert fsyncs == ["file", "dir"]


def test_append_line_durably_appends_one_fsynced_line(tmp_path, fsyncs):
    path = tmp_path / "metrics.jsonl"
    io.append_line_durably(path, '{"step": 1}')
    io.append_line_durably(path, '{"step": 2}\n')
    assert path.read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    assert fsyncs == ["file", "file"]


def test_commit_dir_and_fsync_tree(tmp_path, fsyncs):
    tmp = tmp_path / ".ckpt.tmp"
    (tmp / "inner").mkdir(parents=True)
    (tmp / "a.json").write_text("{}")
    (tmp / "inner" / "b.bin").write_bytes(b"x")
    io.fsync_tree(tmp)
    assert fsyncs.count("file") == 2 and fsyncs.count("dir") == 2
    io.commit_dir(tmp, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "inner" / "b.bin").read_bytes() == b"x" and not tmp.exists()


def test_leftover_temps_are_exactly_the_names_the_writers_use(tmp_path):
    (tmp_path / ".model.safetensors.0123456789ab").write_bytes(b"half")  # atomic_path's temp
    (tmp_path / ".config.json.a1b2c3d4e5f6").write_bytes(b"half")
    io.temp_dir_for(tmp_path / "epoch_0_step_3").mkdir()  # commit_dir's temp folder
    (tmp_path / ".epoch_0_step_3.tmp" / "model.safetensors").write_bytes(b"half")
    kept = [".gitignore", ".notes.tmp", "model.safetensors", ".x.0123456789", "run.tmp", ".a.0123456789AB"]
    for name in kept:  # user files and near-misses: a file named .NAME.tmp, 11 hex digits, upper case
        (tmp_path / name).write_text("keep")
    assert [p.name for p in io.leftover_temps(tmp_path, ["config.json"])] == [".config.json.a1b2c3d4e5f6"]
    removed = io.remove_leftover_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [".model.safetensors.0123456789ab", ".config.json.a1b2c3d4e5f6", ".epoch_0_step_3.tmp"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert io.remove_leftover_temps(tmp_path / "missing") == []


def test_a_killed_writer_leaves_only_a_name_leftover_temps_recognises(tmp_path):
    path = tmp_path / "rows.jsonl"
    with pytest.raises(KeyboardInterrupt), io.atomic_path(path) as tmp:
        tmp.write_text("half")
        leftover = io.leftover_temps(tmp_path)
        raise KeyboardInterrupt  # while the temp exists: what a SIGKILL at this moment would leave
    assert leftover == [tmp]
