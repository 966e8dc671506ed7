"""kernels/cpu/token_mask.c against its reference twin, masked_fill of the unpacked bits
(executor/structured.py's torch path), bit for bit: extreme logits, a width that is not a
multiple of 32, all-allowed and all-forbidden words, a subset of rows; in the default build and
in one without AVX-512 (the compiler vectorises the selects per build). Rows not listed keep
their logits whatever their mask says."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from pagedserve.executor.structured import unpack_forbidden
from pagedserve.kernels.cpu import build
from pagedserve.kernels.cpu.token_mask import forbid_rows

BUILDS = {"default": (), "no-avx512": ("-mno-avx512f",)}


def _case(width: int, rows: list[int], seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Logits and a mask row for each of their rows (those not listed must stay untouched)."""
    rng = np.random.default_rng(seed)
    num_rows = max(rows) + 2
    words = rng.integers(-(2**31), 2**31, size=(num_rows, (width + 31) // 32),
                         dtype=np.int64).astype(np.int32)
    words[rows[0], 0] = -1  # a run of allowed tokens
    words[rows[-1], -1] = 0  # and of forbidden ones, in the last, partial word
    logits = torch.randn(num_rows, width)
    logits[rows[0], :8] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0,
                                        3.4e38, -3.4e38, 1e-45])
    return logits, words


def _reference(logits: torch.Tensor, rows: list[int], words: np.ndarray) -> torch.Tensor:
    out = logits.clone()
    forbidden = unpack_forbidden(torch.from_numpy(words[rows]), logits.shape[1])
    index = torch.tensor(rows)
    out[index] = out[index].masked_fill(forbidden, float("-inf"))
    return out


@pytest.mark.parametrize("width", [31, 32, 150, 4000])
def test_the_kernel_equals_masked_fill_bit_for_bit(width: int) -> None:
    rows = [0, 2, 3, 7]
    logits, words = _case(width, rows)
    expected = _reference(logits, rows, words)
    assert forbid_rows(logits, rows, words)
    assert torch.equal(logits.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("variant", sorted(BUILDS))
def test_each_build_masks_the_same_bits(variant: str) -> None:
    lib, why = build.load("token_mask", BUILDS[variant])
    if lib is None:
        pytest.skip(why)
    rows = [1, 4]
    logits, words = _case(1000, rows, seed=3)
    expected = _reference(logits, rows, words)
    index = np.array(rows, dtype=np.int64)
    lib.forbid_rows_f32(build.ptr(logits), ctypes.c_int64(logits.stride(0)),
                        ctypes.c_void_p(index.ctypes.data), ctypes.c_int64(len(rows)),
                        ctypes.c_void_p(words.ctypes.data), ctypes.c_int64(words.shape[1]),
                        ctypes.c_int64(logits.shape[1]))
    assert torch.equal(logits.view(torch.int32), expected.view(torch.int32))


def test_what_the_kernel_cannot_take_is_left_to_the_caller() -> None:
    logits, words = _case(64, [0, 1])
    before = logits.clone()
    assert not forbid_rows(logits.to(torch.bfloat16), [0, 1], words)  # another dtype
    assert not forbid_rows(logits, [0, 1], words[:, :1])  # too few words for the width
    assert not forbid_rows(logits, [0], words[:1])  # not a mask row per logits row
    assert torch.equal(logits.view(torch.int32), before.view(torch.int32))
    with pytest.raises(IndexError, match="outside"):
        forbid_rows(logits, [0, 9], words)
