"""Where benchmark results go: one JSON file per run (results/ by default, ignored by git)."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: str | Path, results: dict) -> Path:
    """Write results as indented JSON, creating the directory; says where on stdout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return path
