"""router/ stays a thin front door: no torch, transformers, scheduler, executor or kernels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_router_imports_no_engine_code() -> None:
    modules = sorted(p.stem for p in (ROOT / "router").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        f"for m in {modules!r}: __import__('router.' + m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'scheduler', 'executor', 'kernels')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
