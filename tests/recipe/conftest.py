"""Fixtures for recipe tests: a tiny local target and chat data (builders live in tests/_helpers)."""

import pytest
from _helpers.recipe_assets import build_target_dir, write_rows


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    target = build_target_dir(root / "target")
    return {
        "target": target,
        "train": write_rows(root / "train.jsonl", 24),
        "val": write_rows(root / "val.jsonl", 6, 1),
    }
