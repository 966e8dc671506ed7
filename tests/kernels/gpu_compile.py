"""Compile the Triton kernels for a Hopper GPU (sm_90) on a machine that has none.

The interpreted tests check numerics on the CPU but never run Triton's compiler; this catches what
only the compiler rejects (types, layouts, shared memory over the per-block limit) in the bf16
variants a GPU runs. It must run without TRITON_INTERPRET (test_gpu_compile.py starts it so):

    python -m tests.kernels.gpu_compile
"""

from __future__ import annotations

import os
import sys
import time

MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
FLOAT_ARGS = {"scale", "softcap", "eps", "k_scale", "v_scale"}


def _signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Pointers are the *_ptr arguments (bf16 unless named), scale/softcap/eps fp32, else i32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "bf16")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def _attrs(kernel, signature: dict[str, str]) -> dict:
    """What a real launch specialises on: pointers and strides divisible by 16 (elements or
    bytes, as the caches and activations are), which enables vectorised and pipelined loads,
    except the arguments the kernel marks do_not_specialize(_on_alignment)."""
    aligned = [["tt.divisibility", 16]]
    return {(i,): aligned for i, (name, p) in enumerate(zip(kernel.arg_names, kernel.params))
            if (signature[name].startswith("*") or name.startswith("stride_"))
            and not p.do_not_specialize and not p.do_not_specialize_on_alignment}


def _attention_variants() -> list[tuple]:
    import torch

    from pagedserve.kernels.triton import attention, attention_reduce, attention_tiles

    ints = {"cu_seqlens_q_ptr": "i32", "seq_lens_ptr": "i32", "block_tables_ptr": "i32",
            "part_acc_ptr": "fp32", "part_ml_ptr": "fp32"}
    out = []
    fp8 = {**ints, "k_cache_ptr": "u8", "v_cache_ptr": "u8"}  # --kv-cache-dtype fp8: bytes
    for head_dim, max_q, splits, window, cap, kv_fp8 in [
            (64, 1, 1, False, False, False), (64, 1, 8, True, True, False),
            (64, 4096, 1, False, False, False), (128, 4096, 1, True, False, False),
            (256, 1, 1, False, False, False), (128, 1, 8, False, False, True),
            (128, 4096, 1, False, False, True)]:
        cfg = attention_tiles.tile_config(head_dim, 4, max_q, torch.bfloat16)
        const = {"HEAD_DIM": head_dim, "HEAD_DIM_P": head_dim, "BLOCK_SIZE": 16, "GROUP": 4,
                 "BLOCK_M": cfg["BLOCK_M"], "BLOCK_Q": cfg["BLOCK_M"] // 4,
                 "BLOCK_N": cfg["BLOCK_N"], "NUM_SPLITS": splits, "USE_SOFTCAP": cap,
                 "USE_WINDOW": window, "DOT_FP32": False, "KV_FP8": kv_fp8}
        opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        out.append((attention._paged_attention_kernel, fp8 if kv_fp8 else ints, const, opts))
    out.append((attention_reduce._reduce_splits_kernel, {"part_acc_ptr": "fp32",
                "part_ml_ptr": "fp32"}, {"HEAD_DIM": 64, "HEAD_DIM_P": 64, "NUM_SPLITS": 8}, {}))
    return out


def _quant_linear_variants() -> list[tuple]:
    """W8A16 and W4A16 (kernels/triton/quant_linear.py) for a decode-sized and a prompt-sized
    block of rows, with and without offsets."""
    import importlib

    # the module, not the function kernels.triton exports under the same name
    quant_linear = importlib.import_module("pagedserve.kernels.triton.quant_linear")

    out = []
    for bits, group, offset, block_m in ((8, 128, False, 16), (8, 32, False, 64),
                                         (4, 128, True, 16), (4, 32, True, 64)):
        pointers = {"q_ptr": "i8" if bits == 8 else "u8", "s_ptr": "fp32", "o_ptr": "fp32",
                    "b_ptr": "fp32"}
        const = {"N": 2048, "K": 2048, "GROUP": group, "BITS": bits, "HAS_OFFSET": offset,
                 "HAS_BIAS": False, "BLOCK_M": block_m, "BLOCK_N": 64,
                 "BLOCK_K": quant_linear._block_k(group, bits), "DOT_FP32": False}
        out.append((quant_linear._quant_linear_kernel, pointers, const, {}))
    return out


def _elementwise_variants() -> list[tuple]:
    from pagedserve.kernels.triton import activation, kv_write, norm, rotary

    return [
        *[(kv_write._write_kv_kernel,
           {"slot_mapping_ptr": "i64", **({"k_cache_ptr": "u8", "v_cache_ptr": "u8"}
                                          if kv_fp8 else {})},
           {"BLOCK_SIZE": 16, "NUM_HEADS": 8, "HEAD_DIM": 128, "HEADS_P": 8, "HEAD_DIM_P": 128,
            "KV_FP8": kv_fp8}, {}) for kv_fp8 in (False, True)],
        (norm._rms_norm_kernel, {}, {"HIDDEN": 2048, "BLOCK": 2048}, {"num_warps": 8}),
        (norm._fused_add_rms_norm_kernel, {}, {"HIDDEN": 2048, "BLOCK": 2048}, {"num_warps": 8}),
        (rotary._rotary_kernel, {"positions_ptr": "i64", "cos_sin_ptr": "fp32"},
         {"NUM_Q_HEADS": 32, "NUM_K_HEADS": 8, "Q_HEADS_P": 32, "K_HEADS_P": 8, "HALF": 32,
          "HALF_P": 32, "IS_NEOX": True}, {}),
        (activation._silu_and_mul_kernel, {}, {"D": 8192, "BLOCK": 1024}, {"num_warps": 4}),
    ]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for kernel, pointers, const, opts in (_attention_variants() + _elementwise_variants()
                                          + _quant_linear_variants()):
        t0 = time.perf_counter()
        sig = _signature(kernel, pointers, const)
        src = ASTSource(kernel, sig, constexprs=const, attrs=_attrs(kernel, sig))
        compiled = triton.compile(src, target=target, options=opts)
        shared = compiled.metadata.shared
        ok = shared <= MAX_SHARED
        failed += not ok
        print(f"{'ok ' if ok else 'BAD'} {kernel.__name__:28s} shared {shared:>6} B  "
              f"{time.perf_counter() - t0:4.1f} s  {const}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
