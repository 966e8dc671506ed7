"""Every kernel backend meets kernels/backend.py's contract: the names and the exact signatures of
kernels.reference, the specification (a drifted keyword would fail only on the path that uses it)."""

from __future__ import annotations

import inspect

import pytest

from pagedserve.kernels import reference
from pagedserve.kernels.backend import KERNEL_NAMES, KernelBackend


def _signature(fn) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_backend_has_every_kernel_with_the_reference_signature(name: str, request) -> None:
    if name == "triton":
        module = request.getfixturevalue("tk")  # imported once the interpreter is set up
    else:
        module = {"reference": reference, "cpu": pytest.importorskip("pagedserve.kernels.cpu")}[name]
    assert isinstance(module, KernelBackend)
    ok, why = module.available()
    assert isinstance(ok, bool) and isinstance(why, str) and (ok or why)
    for kernel in KERNEL_NAMES:
        assert _signature(getattr(module, kernel)) == _signature(getattr(reference, kernel)), kernel


def test_the_protocol_lists_the_reference_kernels() -> None:
    protocol = {n for n in dir(KernelBackend) if not n.startswith("_")} - {"available"}
    assert protocol == set(KERNEL_NAMES) == set(reference.__all__) - {"available"}
