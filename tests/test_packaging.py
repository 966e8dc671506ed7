"""One import name: the wheel holds `pagedserve` alone, and nothing of ours shadows a PyPI package.

The parts sit at the repository root (router/, kernels/, ...) and install as pagedserve.<part>.
A bare `kernels` of ours once broke transformers (>= 5.25 imports Hugging Face's `kernels` package
whenever it loads a model), so these tests run what a user runs, from the repository root.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("router", "scheduler", "executor", "kernels", "protos", "bench")
SOURCE_SUFFIXES = {".py", ".pyi", ".c", ".h", ".proto"}


def source_files() -> list[str]:
    """Every shipped source file, as its path inside the wheel (pagedserve/<part>/...)."""
    out = [f"pagedserve/{p.relative_to(ROOT / 'pagedserve')}"
           for p in (ROOT / "pagedserve").rglob("*.py")]
    for part in PARTS:
        out += [f"pagedserve/{p.relative_to(ROOT)}" for p in (ROOT / part).rglob("*")
                if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts]
    return sorted(out)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy, so no stale build/ folder of the checkout leaks into it.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "pagedserve", *PARTS):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True)
    (found,) = out.glob("pagedserve-*.whl")
    return found


def test_wheel_has_one_top_level_name_and_every_source_file(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pagedserve"}
    missing = set(source_files()) - set(names)
    assert not missing, f"pyproject's packages / package-data leave out {sorted(missing)}"


def test_installed_wheel_imports_from_itself(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    assert {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")} <= {
        "pagedserve", "bin"}
    code = ("import pagedserve.protos.scheduler_pb2_grpc, pagedserve.router.app, "
            "pagedserve.scheduler.scheduler, pagedserve.kernels.cpu.build as b, pagedserve.bench.targets\n"
            "import pathlib\n"
            f"assert pathlib.Path(b.__file__).is_relative_to({str(target)!r}), b.__file__\n"
            "assert list(pathlib.Path(b.__file__).parent.glob('*.c'))\n")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)


def test_repository_root_shadows_no_pypi_package() -> None:
    # sys.path[0] is the working directory for `python -c` and `python -m`, as for pytest's rootdir.
    code = ("import importlib.util, sys\n"
            f"for part in {PARTS!r}:\n"
            "    spec = importlib.util.find_spec(part)\n"
            "    assert spec is None or spec.origin is None or not spec.origin.startswith("
            f"{str(ROOT) + '/'!r} + part), (part, spec.origin)\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_hugging_face_kernels_and_from_pretrained_from_the_root(tiny_llama: Path) -> None:
    transformers = pytest.importorskip("transformers")
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if major_minor < (5, 25):
        pytest.skip("transformers < 5.25 does not depend on Hugging Face's kernels")
    code = ("import kernels, transformers\n"
            f"assert not kernels.__file__.startswith({str(ROOT / 'kernels')!r}), kernels.__file__\n"
            "assert hasattr(kernels, 'get_kernel'), dir(kernels)\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tiny_llama)!r})\n"
            "assert m.config.model_type == 'llama'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_no_bare_import_of_a_part() -> None:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        if {".venv", "build", ".git"} & set(path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                    and node.module else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} {m}" for m in mods
                    if m.split(".")[0] in PARTS]
    assert not bad, f"import these as pagedserve.<part>: {bad}"
