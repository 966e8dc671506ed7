"""DESIGN.md's import arrows, on the source and at run time, under the one `pagedserve` namespace.

router -> protos; scheduler -> protos; executor -> protos, kernels; kernels -> nothing of ours.
A part is named either bare (a PyPI package: torch, triton, transformers) or as pagedserve.<part>;
a bare import of one of our parts is itself a failure, since no such top-level name exists.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("router", "scheduler", "executor", "kernels", "protos", "bench")
FORBIDDEN = {
    "router": {"torch", "triton", "transformers", "scheduler", "executor", "kernels"},
    "scheduler": {"torch", "triton", "executor", "router", "kernels"},
    "executor": {"router", "scheduler"},
    "kernels": {"router", "scheduler", "executor"},
}


def part_of(module: str) -> str:
    """'pagedserve.kernels.cpu' -> 'kernels'; 'torch.nn' -> 'torch'; 'kernels' -> 'bare:kernels'."""
    head, _, rest = module.partition(".")
    if head == "pagedserve":
        return rest.partition(".")[0] or "pagedserve"
    return f"bare:{head}" if head in PARTS else head


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_part_of_names_the_part() -> None:
    assert part_of("pagedserve.kernels.cpu.build") == "kernels"
    assert part_of("torch.nn") == "torch"
    assert part_of("kernels") == "bare:kernels"


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_no_forbidden_import_statements(part: str) -> None:
    bad = []
    for path in sorted((ROOT / part).rglob("*.py")):
        for line, module in imported_modules(path):
            name = part_of(module)
            if name in FORBIDDEN[part] or name.startswith("bare:"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, bad


@pytest.mark.parametrize("part", ["router", "scheduler"])
def test_importing_a_part_loads_no_forbidden_module(part: str) -> None:
    modules = sorted(f"pagedserve.{part}.{p.stem}" for p in (ROOT / part).glob("*.py"))
    assert len(modules) > 5
    code = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from test_import_rules import part_of\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = [m for m in sys.modules if part_of(m) in {sorted(FORBIDDEN[part])!r}]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
