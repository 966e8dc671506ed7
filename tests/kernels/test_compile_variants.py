"""No Triton compile lands in a served step: per-step integers never pick a variant, and the
start-up warm-up covers every attention variant a step can launch.

Triton caches one binary per launch key (kernels/triton/variants.py computes it with triton's
own rule), so these run on the CPU: the launches are recorded, not executed."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.common import DEVICE, ON_GPU

pytestmark = pytest.mark.triton

FLOATS = {"scale", "softcap", "eps", "k_scale", "v_scale"}  # floats never specialise
# Slices of the step's metadata buffers: their offsets may change per step (packed uploads).
STEP_POINTERS = {"cu_seqlens_q_ptr", "seq_lens_ptr", "block_tables_ptr", "slot_mapping_ptr",
                 "positions_ptr"}
# Strides that follow the step's shape (the block table's width follows the longest context);
# every other stride is fixed by the model and the cache layout, and may stay specialised.
STEP_STRIDES = {"stride_bt"}


def test_per_step_ints_are_not_specialised(tk) -> None:
    from pagedserve.kernels.triton.variants import all_kernels, constexpr_args, jit_option

    kernels = all_kernels()
    assert len(kernels) == 10, [k.fn.__name__ for k in kernels]
    missing = []
    for kernel in kernels:
        no_value = jit_option(kernel, "do_not_specialize")
        no_align = jit_option(kernel, "do_not_specialize_on_alignment") | no_value
        for name in sorted(set(kernel.arg_names) - constexpr_args(kernel) - FLOATS):
            if name.endswith("_ptr"):
                bad = name in STEP_POINTERS and name not in no_align
            elif name.startswith("stride_"):
                bad = name in STEP_STRIDES and name not in no_value
            else:  # counts, lengths, windows: no int argument is a model constant worth a variant
                bad = name not in no_value
            missing += [f"{kernel.fn.__name__}.{name}"] * bad
    assert not missing, f"specialised per-step arguments: {missing}"


class Step:
    """Buffers laid out as the executor lays them: persistent metadata sliced per step (or
    packed into one buffer at shifting offsets), q/k/v as views of one fused QKV output."""

    HEADS, KV_HEADS, HEAD_DIM, BLOCK, HIDDEN, INTER = 8, 2, 32, 16, 64, 96

    def __init__(self, max_seqs: int = 16, max_blocks: int = 12,
                 cache_dtype: torch.dtype = torch.float16) -> None:
        shape = (max_seqs * max_blocks, self.BLOCK, self.KV_HEADS, self.HEAD_DIM)
        self.k_cache = torch.zeros(shape, dtype=cache_dtype, device=DEVICE)
        self.v_cache = torch.zeros(shape, dtype=cache_dtype, device=DEVICE)
        self.meta = torch.zeros(4096, dtype=torch.int32, device=DEVICE)
        self.slots = torch.zeros(512, dtype=torch.int64, device=DEVICE)
        self.cos_sin = torch.zeros(512, self.HEAD_DIM, device=DEVICE)
        self.norm_w = torch.ones(self.HIDDEN, dtype=torch.float16, device=DEVICE)

    def _metadata(self, q_lens, seq_lens, packed: bool):
        n, width = len(q_lens), -(-max(seq_lens) // self.BLOCK)
        start = 3 if packed else 0  # packed: 12-byte offsets, never 16-aligned
        cu = self.meta[start: start + n + 1]
        cu[:] = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
        lens_at = start + n + 1 if packed else 1024
        lens = self.meta[lens_at: lens_at + n]
        lens[:] = torch.tensor(seq_lens)
        tables_at = lens_at + n if packed else 2048
        tables = self.meta[tables_at: tables_at + n * width].view(n, width)
        return cu, lens, tables

    def run(self, tk, q_lens: list[int], seq_lens: list[int], packed: bool = False) -> None:
        cu, lens, tables = self._metadata(q_lens, seq_lens, packed)
        t = sum(q_lens)
        q_size, kv_size = self.HEADS * self.HEAD_DIM, self.KV_HEADS * self.HEAD_DIM
        qkv = torch.zeros(t, q_size + 2 * kv_size, dtype=torch.float16, device=DEVICE)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, self.HEADS, self.HEAD_DIM)
        k, v = (x.view(t, self.KV_HEADS, self.HEAD_DIM) for x in (k, v))
        hidden = torch.zeros(t, self.HIDDEN, dtype=torch.float16, device=DEVICE)
        tk.fused_add_rms_norm(hidden, hidden.clone(), self.norm_w, 1e-6)
        tk.rms_norm(hidden, self.norm_w, 1e-6)
        at = 7 if packed else 0  # packed: 56-byte offsets, never 16-aligned
        tk.rotary_embedding(self.slots[at: at + t], q, k, self.cos_sin)
        tk.write_kv(k, v, self.k_cache, self.v_cache, self.slots[at: at + t])
        tk.paged_attention(q, self.k_cache, self.v_cache, cu, lens, tables, torch.empty_like(q),
                           scale=0.1, max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens))
        tk.silu_and_mul(torch.zeros(t, 2 * self.INTER, dtype=torch.float16, device=DEVICE))


# Decode batches of every size up to max_num_seqs, mixed prefill chunks over cached prefixes,
# a one-token step, contexts that end on and off page and tile boundaries.
STEPS = [([1] * n, [5 + 13 * i for i in range(n)]) for n in range(1, 13)] + [
    ([1], [1]), ([40], [40]), ([17, 1, 1], [50, 90, 3]), ([3, 1], [3, 160]), ([64, 5], [64, 80]),
    ([2] * 4, [20, 33, 16, 2]), ([9, 9, 9], [30, 9, 100]),
]


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.float8_e4m3fn])  # --kv-cache-dtype
def test_served_steps_launch_only_warmed_variants(tk, cache_dtype) -> None:
    from pagedserve.kernels.triton.variants import record_launch_keys

    step = Step(cache_dtype=cache_dtype)
    with record_launch_keys(execute=False) as warmed:
        tk.warmup(step.k_cache, step.v_cache, num_q_heads=Step.HEADS, max_num_seqs=12,
                  dtype=torch.float16)
    assert {key[0] for key in warmed} == {"_paged_attention_kernel", "_reduce_splits_kernel"}
    with record_launch_keys(execute=False) as seen:
        for i, (q_lens, seq_lens) in enumerate(STEPS):
            step.run(tk, q_lens, seq_lens, packed=i % 2 == 1)
    attention = {key for key in seen if key[0] in ("_paged_attention_kernel",
                                                   "_reduce_splits_kernel")}
    assert attention - warmed == set(), "steps launched attention variants the warm-up missed"
    assert len(attention) >= 4, "the steps should reach decode, prefill and split variants"
    for name in ("_write_kv_kernel", "_rotary_kernel", "_rms_norm_kernel",
                 "_fused_add_rms_norm_kernel", "_silu_and_mul_kernel"):
        assert len({key for key in seen if key[0] == name}) == 1, f"{name}: a variant per step"


def test_warmup_covers_windows_and_reserves_split_workspaces(tk) -> None:
    from pagedserve.kernels.triton import attention
    from pagedserve.kernels.triton.variants import record_launch_keys

    step = Step()
    with record_launch_keys(execute=False) as warmed:
        n = tk.warmup(step.k_cache, step.v_cache, num_q_heads=Step.HEADS, max_num_seqs=12,
                      sliding_windows=[0, 24, 0, 24])
    launched = {key for key in warmed if key[0] == "_paged_attention_kernel"}
    assert n == len(launched)
    use_window = attention._paged_attention_kernel.arg_names.index("USE_WINDOW")
    assert {key[1][use_window] for key in launched} == {("constexpr", True), ("constexpr", False)}
    before = {name: buf.data_ptr() for name, buf in attention._WORKSPACES.items()}
    with record_launch_keys(execute=False):
        for q_lens, seq_lens in STEPS[:12]:
            step.run(tk, q_lens, seq_lens)
    assert {name: buf.data_ptr() for name, buf in attention._WORKSPACES.items()} == before


def test_variant_counter_counts_new_launch_keys(tk) -> None:
    """Under the interpreter the counter counts launch keys from when it is entered; on a GPU,
    binaries compiled so far in the process (earlier tests' included), so only deltas hold."""
    from pagedserve.kernels.triton.variants import VariantCounter

    step = Step()
    with VariantCounter() as counter:
        start = counter.count()
        step.run(tk, [1, 1], [20, 30])
        after_one = counter.count()
        step.run(tk, [1, 1], [21, 31])  # same bucket: nothing new
        same_bucket = counter.count()
        step.run(tk, [1, 1, 1], [7, 20, 30])  # bucket 4: another split count and its merge
    assert same_bucket == after_one
    if not ON_GPU:
        assert after_one - start == 7  # 5 elementwise kernels, split attention and its merge
        assert counter.count() - after_one == 2
