"""Every benchmark `pagedserve bench` names exists and its main returns an exit status: the CLI
passes main's value to sys.exit, where anything but an int (a results dict) exits 1."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from pagedserve.cli import BENCHES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_main_returns_an_exit_status(name: str) -> None:
    module = BENCHES[name]
    assert importlib.util.find_spec(module) is not None, module
    source = ROOT / "bench" / f"{module.rsplit('.', 1)[1]}.py"
    tree = ast.parse(source.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert ast.unparse(main.returns) == "int", f"{module}.main returns {ast.unparse(main.returns)}"
    assert [a.arg for a in main.args.args] == ["argv"], f"{module}.main must take argv"
