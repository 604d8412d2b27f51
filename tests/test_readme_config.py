"""README's `recipe_args` table against the declared options: every key listed, every literal default the code's."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from nemo_automodel_dspark.loss.config import LossConfig
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.recipe import config as recipe_config
from nemo_automodel_dspark.recipe.config import CheckpointConfig, RecipeArgs

README = Path(__file__).resolve().parents[1] / "README.md"
RECIPE_ARGS_CLASSES = (RecipeArgs, DSparkConfig, LossConfig)


def table_rows() -> list[tuple[list[str], list[str]]]:
    """(keys, default cells) of each row of the table under "`recipe_args` (default):"."""
    text = README.read_text()
    start = text.index("`recipe_args` (default):")
    rows = []
    for line in text[start:].splitlines()[3:]:
        if not line.startswith("|"):
            break
        key_cell, default_cell = (cell.strip() for cell in line.split("|")[1:3])
        keys = re.findall(r"`([a-z_0-9]+)`", key_cell)
        defaults = [d.strip() for d in re.split(r",\s|\s/\s", default_cell)]
        rows.append((keys, defaults if len(defaults) == len(keys) else [default_cell] * len(keys)))
    return rows


def declared() -> dict[str, object]:
    """recipe_args key -> declared default (MISSING when required)."""
    return {
        f.name: f.default for cls in RECIPE_ARGS_CLASSES for f in dataclasses.fields(cls) if f.name in cls.yaml_keys()
    }


def same_default(cell: str, default: object) -> bool:
    if cell == "required":
        return default is dataclasses.MISSING
    if cell == "null":
        return default is None
    if cell in ("true", "false"):
        return default is (cell == "true")
    if re.fullmatch(r"-?[0-9.]+(e-?[0-9]+)?", cell):
        return isinstance(default, int | float) and not isinstance(default, bool) and float(cell) == default
    if re.fullmatch(r"[a-z_0-9]+", cell):
        return default == cell
    return default is None  # a described default (`target_layer_ids`: an even spread) is resolved at run time


def test_every_recipe_args_key_is_in_the_readme_table():
    listed = {key for keys, _ in table_rows() for key in keys}
    assert sorted(set(declared()) - listed) == []
    upstream = set(recipe_config._UPSTREAM_NOOPS["recipe_args"])  # accepted for upstream YAMLs
    also_checkpoint = {f.name for f in dataclasses.fields(CheckpointConfig)}  # upstream spelling of checkpoint keys
    assert sorted(listed - set(declared()) - upstream - also_checkpoint) == []


@pytest.mark.parametrize(
    ("key", "cell"), [(k, d) for keys, cells in table_rows() for k, d in zip(keys, cells, strict=True)]
)
def test_readme_default_is_the_declared_one(key, cell):
    options = declared()
    if key not in options:  # upstream no-op or a checkpoint key spelled upstream's way: default null / 0
        return
    assert same_default(cell, options[key]), f"README says {key} defaults to {cell!r}, the code {options[key]!r}"
