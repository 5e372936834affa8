"""The import-linter contracts in pyproject.toml bite: a copy of pyproxy with one forbidden
import added fails `lint-imports`, naming the contract, while the tree as it is passes.

Runs the real lint-imports (a few seconds) over a copy in a temporary directory, so the
checked-in tree is never touched."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import pyproxy

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "pyproxy", tmp_path / "pyproxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(module: Path, line: str) -> None:
    text = module.read_text()
    marker = "from __future__ import annotations\n"
    module.write_text(text.replace(marker, marker + "\n" + line + "\n", 1))


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # The pure core imports the shell.
        ("policy.py", "import subprocess", "The pure core never imports the shell"),
        # A lower layer imports a higher one (the model knows the controller).
        ("model.py", "import pyproxy.controller", "Layers"),
        # One mode reaches into another's renderer.
        ("nftables/render.py", "import pyproxy.iptables.render", "Modes are independent"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tree: Path, module: str, line: str, contract: str
) -> None:
    add_import(tree / "pyproxy" / module, line)
    result = lint(tree)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout


def pure_core_in(text: str) -> set[str]:
    """The backticked module names after "Pure core:" up to the full stop that ends the list."""
    match = re.search(r"Pure core:((?:\s*`[\w.]+`,?)+)\.", text)
    assert match is not None, "no 'Pure core: `a`, `b`.' list"
    return set(re.findall(r"`([\w.]+)`", match.group(1)))


def test_the_pure_core_list_is_the_same_in_readme_docstring_and_contract() -> None:
    """README.md, pyproxy's docstring and the import-linter contract name one set of modules,
    so the list a reader trusts is the one that is enforced."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [
        c
        for c in config["tool"]["importlinter"]["contracts"]
        if c["name"] == "The pure core never imports the shell"
    ]
    enforced = {m.removeprefix("pyproxy.") for m in contract["source_modules"]}
    assert all(m.startswith("pyproxy.") for m in contract["source_modules"])
    assert pure_core_in((ROOT / "README.md").read_text()) == enforced
    assert pure_core_in(pyproxy.__doc__ or "") == enforced
    assert "changes" in enforced  # pure: it imports only convert, errors and model


def test_long_pure_core_functions_say_why_in_their_docstring() -> None:
    """A pure-core function over 80 lines states why it is one piece ("Long on purpose: ...");
    the rest are short enough to read at once. PLR0912/PLR0915 have no global ignore either."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [
        c
        for c in config["tool"]["importlinter"]["contracts"]
        if c["name"] == "The pure core never imports the shell"
    ]
    unexplained = []
    for module in contract["source_modules"]:
        path = ROOT / (module.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assert node.end_lineno is not None
            if node.end_lineno - node.lineno + 1 > 80 and "Long on purpose:" not in (
                ast.get_docstring(node) or ""
            ):
                unexplained.append(f"{module}.{node.name}")
    assert unexplained == []
    assert not {"PLR0912", "PLR0915"} & set(config["tool"]["ruff"]["lint"]["ignore"])


def test_test_files_have_unique_basenames() -> None:
    """pytest's default import mode imports test files by basename: two tiers with a
    `test_x.py` each break collection of the whole suite (it happened twice)."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
