"""The built-in demo model: the `tiny` llama preset, built once into a cache directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("PAGEDSERVE_CACHE", Path.home() / ".cache" / "pagedserve"))


def ensure_demo_model(arch: str = "llama", preset: str = "tiny") -> Path:
    """Path of the demo model, building it on first use (atomically, by rename)."""
    from pagedserve.make_model import make_model

    out = cache_dir() / f"demo-{arch}-{preset}"
    if (out / "pagedserve.json").exists():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    make_model(arch, preset, tmp, seed=0)
    try:
        tmp.rename(out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
