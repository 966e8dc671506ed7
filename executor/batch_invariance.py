"""Batch-invariant execution (`--batch-invariant`): a token's logits come out bit for bit the same
whatever else shares its step and however its prompt was split into chunks.

Why: a request recomputed after an executor or scheduler restart (or a preemption) has its prompt
and its outputs so far computed in one prompt pass, where the undisturbed run computed the outputs
one decode step at a time. When those two ways of computing a row round differently, a greedy or
seeded request can take another token at a near tie and go on differently from there: in bf16,
SmolLM2's logprobs moved by up to 0.04 and the text changed within a few tokens. In this mode the
recomputed request ends with exactly the undisturbed run's tokens.

What varies with the batch on the CPU, and what this mode does about it:
  - attention: the CPU backend attends every query row in C as a decode row of its causal
    context (kernels/cpu/attention.py), the same whatever chunk or batch it comes in; torch's
    fused attention, which the reference runs, tiles by the chunk's query and key counts. This
    mode checks at load that the C kernel is built and takes the model's dtype (float32, bf16),
    so the reference never runs.
  - GEMMs: oneDNN multiplies a single row with another kernel than two or more (K = 1536, bf16:
    23 of 147k outputs differ), while 2 to 4096 rows agree row for row; the AVX2 int4/int8 tiles
    differ below their tile height. Each layer's product is probed at load (`min_rows`), and a
    layer whose rows change below some count pads its input up to that count.
  - the per-row kernels (norms, rotary, activations, KV writes, the sampler) compute each row on
    its own already.

The CPU backend only: the Triton kernels have not been shown invariant, so other devices refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

RowProduct = Callable[[torch.Tensor], torch.Tensor]  # [rows, in] -> [rows, out]
# The probe multiplies PROBE_BATCH random rows at once, then each row alone and slices of
# PROBE_ROWS rows (starting at row 0 and 3, so a row's place varies too), and compares row for row.
# Every row alone, because in bf16 a different sum order shows in few outputs once rounded (oneDNN
# at one row, K = 1536: 23 of 147k), so a handful of rows would miss it.
PROBE_BATCH = 256
PROBE_ROWS = (2, 3, 5, 8, 17, 64)
ROW_FLOORS = (1, 2, 4, 8)  # padding tried, fewest first


def at_least_rows(product: RowProduct, rows: torch.Tensor, floor: int) -> torch.Tensor:
    """product(rows), with rows padded by zeros to `floor` rows first when there are fewer."""
    n = rows.shape[0]
    if n >= floor:
        return product(rows)
    return product(torch.cat([rows, rows.new_zeros(floor - n, rows.shape[1])]))[:n]


def probe_min_rows(product: RowProduct, in_features: int, dtype: torch.dtype) -> int | None:
    """The fewest rows `product` must be given for each row's result not to depend on how many
    rows share the call or where the row sits among them (None: no floor in ROW_FLOORS does)."""
    x = torch.randn(PROBE_BATCH, in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(dtype)
    whole = product(x)
    for floor in ROW_FLOORS:
        alone = torch.cat([at_least_rows(product, x[i:i + 1], floor) for i in range(len(x))])
        if torch.equal(alone, whole) and all(
                torch.equal(at_least_rows(product, x[start:start + m], floor),
                            whole[start:start + m])
                for m in PROBE_ROWS for start in (0, 3)):
            return floor
    return None


def make_batch_invariant(model: nn.Module, backend: ModuleType | None, dtype: torch.dtype) -> None:
    """Switch every layer of a loaded model to its batch-invariant form, or raise ValueError
    naming `batch_invariant` and what cannot be."""
    name = getattr(backend, "__name__", "none")
    ok, why = backend.available() if backend is not None else (False, "")
    if name != "pagedserve.kernels.cpu" or not ok:
        raise ValueError("batch_invariant: needs a native model on the CPU backend with its C "
                         f"kernels built (backend {name}{': ' + why if why else ''})")
    if dtype not in (torch.float32, torch.bfloat16):  # what the C attention kernel takes
        raise ValueError(f"batch_invariant: needs float32 or bfloat16, not {dtype}")
    floors: dict[tuple, int] = {}  # the probe's answer per kind of product and shape
    for name, module in model.named_modules():
        if hasattr(module, "row_product"):
            module.min_rows = _floor(name, module, dtype, floors)
        elif isinstance(module, nn.Linear) or type(module).__name__ in ("FusedMoE", "PackedLinear"):
            raise ValueError(f"batch_invariant: {type(module).__name__} layers ({name}) are not "
                             "supported; run without it")


def _floor(name: str, module: nn.Module, dtype: torch.dtype, floors: dict[tuple, int]) -> int:
    key = (*module.product_key(), dtype)  # (kind, in_features, out_features, dtype)
    if key not in floors:
        floor = probe_min_rows(module.row_product, key[1], dtype)
        if floor is None:
            raise ValueError(f"batch_invariant: the {key[0]} product of {name} gives rows that "
                             "depend on the batch on this CPU; run without it")
        floors[key] = floor
    return floors[key]
