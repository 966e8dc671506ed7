"""Which binaries the Triton kernels compile, and how many a GPU has built so far.

Triton compiles one binary per launch key: each constexpr's value, each other argument's type
and specialisation (an int equal to 1 becomes a constant, an int or a pointer divisible by 16 is
marked so, except where the kernel lists the argument in do_not_specialize or
do_not_specialize_on_alignment), and the options (num_warps, num_stages). `launch_key` computes
that key with triton's own rule, so the CPU (where the interpreter compiles nothing) can still
tell which launches would compile on a GPU; `compiled_variants` counts the binaries a GPU built.

Launched kernels are the `@triton.jit` objects whose names end in `_kernel` (device helpers
such as `_dot` are inlined into them and never compile alone).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable, Iterator

import triton
from pagedserve.kernels.triton.runtime import INTERPRETING
from triton.backends.compiler import BaseBackend

try:
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # triton before 3.3 specialised in Python
    native_specialize_impl = None

MODULES = ("activation", "attention", "attention_reduce", "kv_write", "moe", "norm", "rotary")


def all_kernels() -> list:
    """Every launched kernel of kernels.triton, in a fixed order."""
    found = {}  # by identity: a kernel one module imports from another counts once
    for name in MODULES:
        module = importlib.import_module(f"pagedserve.kernels.triton.{name}")
        found |= {id(obj): obj for attr, obj in sorted(vars(module).items())
                  if attr.endswith("_kernel") and isinstance(obj, triton.runtime.KernelInterface)}
    return list(found.values())


def kernel_name(kernel) -> str:
    return kernel.fn.__name__


def jit_option(kernel, option: str) -> set[str]:
    """do_not_specialize or do_not_specialize_on_alignment as argument names, whether the
    kernel is compiled (JITFunction attribute) or interpreted (kept in its kwargs)."""
    value = getattr(kernel, option, None)
    if value is None:
        value = getattr(kernel, "kwargs", {}).get(option)
    return {kernel.arg_names[v] if isinstance(v, int) else v for v in value or ()}


def constexpr_args(kernel) -> set[str]:
    params = inspect.signature(kernel.fn).parameters
    return {name for name, p in params.items() if "constexpr" in str(p.annotation)}


def _specialize(value, specialize: bool, align: bool):
    """(type, attribute) of one runtime argument, as triton's binder computes it."""
    if native_specialize_impl is not None:
        return native_specialize_impl(BaseBackend, value, False, specialize, align)
    if hasattr(value, "data_ptr"):  # a triton without the native binder: its rule, written out
        return (str(value.dtype), "D" if align and value.data_ptr() % 16 == 0 else None)
    if isinstance(value, int) and not isinstance(value, bool) and specialize:
        return ("constexpr", 1) if value == 1 else ("int", "D" if align and value % 16 == 0 else "")
    return (type(value).__name__, None)


def launch_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """What triton caches this launch's binary under (less the device and triton's version)."""
    names = kernel.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    constexprs = constexpr_args(kernel)
    no_value = jit_option(kernel, "do_not_specialize")
    no_align = jit_option(kernel, "do_not_specialize_on_alignment")
    spec = tuple(("constexpr", bound[n]) if n in constexprs
                 else _specialize(bound[n], n not in no_value, n not in no_align)
                 for n in names)
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
    return kernel_name(kernel), spec, options


@contextlib.contextmanager
def intercept(on_launch: Callable | None = None, mode: str = "run") -> Iterator[None]:
    """Route every launch of the package's kernels through on_launch(kernel, args, kwargs).

    mode "run" launches as usual, "compile" only compiles (triton's warmup path: nothing runs
    on the device; the interpreter does nothing), "skip" neither. Patches nest: the instance
    attribute `run` (which `kernel[grid](...)` calls) is wrapped and restored on exit.
    """
    assert mode in ("run", "compile", "skip")
    saved = []
    for kernel in all_kernels():
        had = "run" in vars(kernel)
        saved.append((kernel, had, vars(kernel).get("run")))
        kernel.run = _wrapped(kernel, kernel.run, on_launch, mode)
    try:
        yield
    finally:
        for kernel, had, run in saved:
            if had:
                kernel.run = run
            else:
                del kernel.run


def _wrapped(kernel, run, on_launch, mode: str):
    def launch(*args, grid, warmup, **kwargs):
        if on_launch is not None:
            on_launch(kernel, args, kwargs)
        if mode == "skip":
            return None
        return run(*args, grid=grid, warmup=warmup or mode == "compile", **kwargs)

    return launch


@contextlib.contextmanager
def record_launch_keys(execute: bool = True) -> Iterator[set]:
    """The set of launch keys seen while active; execute=False skips the launches themselves
    (the launchers' host code still runs), which makes shape sweeps on the CPU quick."""
    keys: set = set()
    with intercept(lambda k, a, kw: keys.add(launch_key(k, a, kw)),
                   mode="run" if execute else "skip"):
        yield keys


def compiled_variants() -> int | None:
    """Binaries the compiled kernels hold in memory, all devices (compiled, or loaded from
    triton's disk cache); None under the interpreter, which compiles nothing."""
    if INTERPRETING:
        return None
    return sum(len(entry[0]) for kernel in all_kernels()
               for entry in getattr(kernel, "device_caches", {}).values())


class VariantCounter:
    """Variants known so far, the same question on both paths: on a GPU, binaries built; under
    the interpreter, distinct launch keys seen while the counter is entered (what a GPU would
    have had to compile)."""

    def __enter__(self) -> VariantCounter:
        self._recording = None
        if INTERPRETING:
            self._recording = record_launch_keys()
            self._keys = self._recording.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._recording is not None:
            self._recording.__exit__(*exc)

    def count(self) -> int:
        return len(self._keys) if INTERPRETING else compiled_variants()
