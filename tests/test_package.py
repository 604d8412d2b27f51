"""Package boundaries: the library stays light, and only one module touches torch.distributed."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "nemo_automodel_dspark"


def test_library_import_does_not_pull_the_framework():
    code = (
        "import sys, nemo_automodel_dspark as d; d.DSparkDrafter, d.dspark_loss, d.capture_target_features; "
        "import nemo_automodel_dspark.data, nemo_automodel_dspark.inference.speculative; "
        "bad = [m for m in sys.modules if m.startswith('nemo_automodel.') or m == 'nemo_automodel' "
        "or m.startswith('nemo_automodel_dspark.train_dspark')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _imports_torch_distributed(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            return True
    return False


def test_only_the_distributed_module_imports_torch_distributed():
    offenders = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if _imports_torch_distributed(p)]
    assert offenders == ["distributed.py"]


def test_lazy_exports_stay_lazy_resolve_each_name_and_refuse_others():
    """Importing the packages imports no torch; then each exported name is its module's own object."""
    code = """
import importlib, sys
packages = [importlib.import_module(f"nemo_automodel_dspark{s}") for s in ("", ".loss", ".tools")]
assert "torch" not in sys.modules
for p in packages:
    for name, module in p._EXPORTS.items():
        assert getattr(p, name) is getattr(importlib.import_module(module), name), name
    try:
        p.no_such_name
    except AttributeError as err:
        assert str(err) == f"module '{p.__name__}' has no attribute 'no_such_name'", err
    else:
        raise AssertionError(p.__name__)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
