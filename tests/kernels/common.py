"""Devices, dtypes, tolerances and paged-batch builders shared by the kernel tests."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# bf16 tl.dot is wrong under the interpreter, so bf16 runs only on a GPU.
DTYPES = [torch.float32, torch.float16, *([torch.bfloat16] if ON_GPU else [])]
# ||out - ref|| / ||ref|| bounds: output rounding plus, for attention, P rounded to the dtype.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "output has NaN: an element was not written"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def poisoned(shape, dtype, device=DEVICE) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@contextlib.contextmanager
def nan_allocations() -> Iterator[None]:
    """Floating-point tensors from torch.empty start as NaN, so a kernel that allocates its
    output and skips an element is caught like one writing into a poisoned buffer."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with mock.patch.object(torch, "empty", poisoned_empty):
        yield


@dataclass
class PagedBatch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.seq_lens,
                self.block_tables)

    def bounds(self) -> dict:
        return {"max_seqlen_q": self.max_seqlen_q, "max_seqlen_k": self.max_seqlen_k}


def block_tables_for(seq_lens: list[int], block_size: int, num_blocks: int,
                     shared_blocks: int = 0, first_block: int = 0) -> torch.Tensor:
    """Physical blocks in shuffled (non-contiguous) order; the first `shared_blocks` pages of
    sequence 1 are sequence 0's (a shared prefix). Unused entries are -1."""
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    ids = (torch.randperm(num_blocks - first_block) + first_block).tolist()
    table = torch.full((len(seq_lens), max([*need, 1])), -1, dtype=torch.int32)
    for i, n in enumerate(need):
        shared = shared_blocks if i == 1 else 0
        if shared:
            assert min(seq_lens[0], seq_lens[1]) >= shared * block_size
            table[1, :shared] = table[0, :shared]
        for j in range(shared, n):
            table[i, j] = ids.pop()
    return table


def fill_context(cache: torch.Tensor, table: torch.Tensor, seq_lens: list[int]) -> None:
    """Random values in every slot a sequence's context occupies; other slots keep their poison."""
    block_size = cache.shape[1]
    for i, n in enumerate(seq_lens):
        pos = torch.arange(n)
        blocks = table[i, pos // block_size].long().to(cache.device)
        rows = (pos % block_size).to(cache.device)
        cache[blocks, rows] = torch.randn(n, *cache.shape[2:], device=cache.device).to(cache.dtype)


def make_batch(q_lens: list[int], seq_lens: list[int], *, num_q_heads: int, num_kv_heads: int,
               head_dim: int, block_size: int, dtype: torch.dtype, shared_blocks: int = 0,
               spare_blocks: int = 3) -> PagedBatch:
    """A ragged batch over a NaN-poisoned cache: only slots inside some context hold numbers."""
    assert all(0 <= ql <= sl for ql, sl in zip(q_lens, seq_lens))
    num_blocks = sum((n + block_size - 1) // block_size for n in seq_lens) + spare_blocks
    table = block_tables_for(seq_lens, block_size, num_blocks, shared_blocks)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = poisoned(shape, dtype), poisoned(shape, dtype)
    fill_context(k_cache, table, seq_lens)
    fill_context(v_cache, table, seq_lens)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, device=DEVICE).to(dtype)
    return PagedBatch(q, k_cache, v_cache, cu.to(DEVICE),
                      torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                      table.to(DEVICE), max(q_lens), max(seq_lens))


def dense_attention(batch, scale: float, sliding_window: int, softcap: float) -> torch.Tensor:
    """Each sequence's context gathered token by token from its block table, then attention in
    float64 with an explicit mask: SDPA, or the written-out formula when there is a softcap."""
    out = []
    cu, lens = batch.cu_seqlens_q.tolist(), batch.seq_lens.tolist()
    block_size = batch.k_cache.shape[1]
    group = batch.q.shape[1] // batch.k_cache.shape[2]
    for i, seq_len in enumerate(lens):
        q = batch.q[cu[i]:cu[i + 1]].double().transpose(0, 1)  # [H, Q, D]
        if q.shape[1] == 0:
            continue
        slots = [(int(batch.block_tables[i, p // block_size]), p % block_size)
                 for p in range(seq_len)]
        k = torch.stack([batch.k_cache[b, r] for b, r in slots]).double()  # [K, Hkv, D]
        v = torch.stack([batch.v_cache[b, r] for b, r in slots]).double()
        k = k.repeat_interleave(group, 1).transpose(0, 1)
        v = v.repeat_interleave(group, 1).transpose(0, 1)
        q_pos = torch.arange(seq_len - q.shape[1], seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        mask = k_pos <= q_pos
        if sliding_window:
            mask &= k_pos > q_pos - sliding_window
        if softcap:
            s = softcap * torch.tanh(q @ k.transpose(1, 2) * scale / softcap)
            o = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def require_cpu_kernel(name: str) -> None:
    """Skip where no C compiler exists (the CPU backend then runs the reference); where one does,
    kernels/cpu/<name>.c must build."""
    from pagedserve.kernels.cpu.build import load

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the CPU backend falls back to the reference kernels")
    lib, why = load(name)
    assert lib is not None, why


def broken_packings(packed):
    """Two wrong versions of a packed asymmetric int4 weight (kernels/cpu/quant_linear.py): its
    nibbles swapped, and its offsets lost; a check of the C GEMM must reject both."""
    swapped = (packed.codes >> 4) | ((packed.codes & 15) << 4)
    return (packed.__class__(**{**vars(packed), "codes": swapped}),
            packed.__class__(**{**vars(packed), "offsets": torch.zeros_like(packed.offsets)}))
