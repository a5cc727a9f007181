"""The layer contract in pyproject.toml ([tool.importlinter]) holds, and it has teeth: an upward
import hidden inside a function breaks it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))



def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache", "--no-logo", str(cwd / "pyproject.toml")], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(cwd)})


def _config_layers() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in cfg["contracts"] if c["type"] == "layers"]
    return contract["layers"]


def test_the_layer_contract_is_kept():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_every_subpackage_and_module_has_a_layer():
    """A new top-level module must be placed in the contract, or nothing checks it."""
    named = {name.strip() for layer in _config_layers() for name in layer.split("|")}
    present = {p.stem for p in (ROOT / "fewstep").glob("*.py") if p.stem not in ("__init__", "__main__")}
    present |= {p.parent.name for p in (ROOT / "fewstep").glob("*/__init__.py")}
    assert present - named == set(), f"not in the layer contract: {sorted(present - named)}"
    assert named - present == set(), f"in the contract but not in the package: {sorted(named - present)}"


def test_a_function_level_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "fewstep", tmp_path / "fewstep", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "fewstep" / "schedules.py", "a") as f:
        f.write("\n\ndef _upward():\n    from .recipes import RECIPES\n    return RECIPES\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert "fewstep.schedules -> fewstep.recipes" in r.stdout, r.stdout
