"""A damaged or unsupported GGUF gets one ValueError naming the file and the problem, from the
executor's loader and from the router's tokenizer alike; the command line prints it as one line
(no traceback), and `serve` gives up at once instead of restarting the children."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from gguf import GGMLQuantizationType as QType

from pagedserve.executor.loader import load_model
from pagedserve.router.tokenizer import Tokenizer
from tests.conftest import ROOT, model_dir
from tests.gguf.hf_to_gguf import convert


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(model_dir("llama"), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _tensor_type_offset(path: Path) -> int:
    """Byte offset of the first tensor's type id in the tensor-info table."""
    field = gguf.GGUFReader(path).tensors[0].field
    return field.offset + sum(part.nbytes for part in field.parts[:4])


def _damaged(good: Path, out: Path, how: str) -> Path:
    data = bytearray(good.read_bytes())
    if how == "truncated-header":
        data = data[:16]
    elif how == "truncated-metadata":
        data = data[:len(data) // 20]
    elif how == "truncated-tensors":
        data = data[:-100]
    elif how == "wrong-magic":
        data[:4] = b"GGML"
    elif how == "wrong-version":
        data[4:8] = (99).to_bytes(4, "little")
    elif how == "unknown-tensor-type":
        at = _tensor_type_offset(good)
        data[at:at + 4] = (250).to_bytes(4, "little")
    elif how == "missing-key":
        at = data.find(b"llama.block_count")
        data[at:at + 5] = b"xxxxx"
    out.write_bytes(bytes(data))
    return out


CASES = {  # how -> words the message must hold (after the file's path)
    "truncated-header": "truncated",
    "truncated-metadata": "truncated",
    "truncated-tensors": "truncated",
    "wrong-magic": "not a GGUF file",
    "wrong-version": "unsupported GGUF version 99",
    "unknown-tensor-type": "unknown tensor type",
    "missing-key": "'llama.block_count' is missing",
}
ROUTER_SEES = {"truncated-header", "truncated-metadata", "wrong-magic", "wrong-version",
               "unknown-tensor-type"}  # the tokenizer reads no tensor data and no llama.* keys


@pytest.mark.parametrize("how", CASES)
def test_damaged_file_gets_one_clear_error(good: Path, tmp_path: Path, how: str) -> None:
    bad = _damaged(good, tmp_path / f"{how}.gguf", how)
    with pytest.raises(ValueError) as err:
        load_model(bad, dtype="float32")
    assert str(err.value).startswith(f"{bad}: "), err.value
    assert CASES[how] in str(err.value), err.value
    if how in ROUTER_SEES:
        with pytest.raises(ValueError) as err:
            Tokenizer.from_dir(bad)
        assert str(err.value).startswith(f"{bad}: ") and CASES[how] in str(err.value), err.value


def test_unsupported_weight_type_is_named(tmp_path: Path) -> None:
    path = convert(model_dir("llama"), tmp_path / "mxfp4.gguf", qtype=QType.MXFP4)
    with pytest.raises(ValueError, match=r"mxfp4\.gguf: tensor '.*' has type MXFP4, which is "
                                         r"not loaded; supported: F32, F16, BF16, Q8_0"):
        load_model(path, dtype="float32")


def test_directory_with_two_gguf_files_is_refused(good: Path, tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match="holds 2 GGUF files"):
        load_model(tmp_path)


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pagedserve.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_prints_one_line_and_serve_does_not_retry(good: Path, tmp_path: Path) -> None:
    bad = _damaged(good, tmp_path / "cut.gguf", "truncated-tensors")
    done = _cli("executor", str(bad), "--listen", f"unix://{tmp_path}/e.sock")
    assert done.returncode == 2
    assert f"pagedserve executor: error: {bad}: truncated" in done.stderr
    assert "Traceback" not in done.stderr
    done = _cli("serve", str(bad), "--port", "0", "--grpc-port", "-1")
    assert done.returncode == 1
    out = done.stdout + done.stderr
    # whichever child reads the file first (router: tokenizer, executor: weights) says why
    assert re.search(rf"pagedserve (executor|router): error: {re.escape(str(bad))}: truncated",
                     out), out
    assert "Traceback" not in out
    assert "child exited; restarting" not in out  # a file that cannot load is not retried
    assert "not restarting" in out
