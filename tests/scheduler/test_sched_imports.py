"""The scheduler never imports torch, triton, an executor, the router or kernels."""

import ast
import pathlib
import subprocess
import sys

FORBIDDEN = ("torch", "triton", "executor", "router", "kernels")
SCHEDULER = pathlib.Path(__file__).resolve().parents[2] / "scheduler"
CORE = ("scheduler", "scheduler.scheduler", "scheduler.config", "scheduler.interface",
        "scheduler.block_pool", "scheduler.block_hash", "scheduler.prefix_cache",
        "scheduler.kv_cache_manager", "scheduler.request", "scheduler.stop",
        "scheduler.validation", "scheduler.outputs")


def test_no_forbidden_import_statements() -> None:
    for path in SCHEDULER.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_importing_the_core_loads_no_forbidden_module() -> None:
    code = (f"import importlib, sys\nfor m in {CORE!r}: importlib.import_module(m)\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=SCHEDULER.parent)
