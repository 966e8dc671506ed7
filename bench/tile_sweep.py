"""Tile-setting sweep for paged attention: which decode BLOCK_N / warps / stages and prefill
BLOCK_M / BLOCK_N / warps / stages run fastest, per head size, on this GPU.

Each candidate goes through the real launcher (kernels.triton.attention_tiles.set_tile_settings,
then paged_attention, split counts and all) on one decode and one prefill workload of a
Llama-like GQA-4 model in bf16. All candidates of a head size compile first, in parallel, in
triton's compile-only mode; then each is timed and its output compared with the default
settings' (a candidate that differs is reported and never chosen). Results are written after
every head size, so a run cut short keeps what it measured.

    python -m pagedserve.bench.kernels --sweep [--sweep-heads 64,128] [--sweep-budget-s 240]
"""

from __future__ import annotations

import time
from functools import partial
from itertools import product

# Compiled for sm_90 offline, every candidate fits shared memory, and num_stages 3 takes barely
# more of it than 2 (the paged K/V gathers seem not multi-buffered): one stage-3 probe for decode,
# stages 2 and 3 for prefill's defaults only. About 20 compiles per head size.
GPU = {"heads": (32, 8), "block_size": 16, "dtype": "bfloat16", "decode": (32, 4096),
       "prefill": (1, 4096), "head_sizes": (64, 128),
       "decode_candidates": [*product((32, 64, 128), (2, 4, 8), (2,)), (64, 4, 3)],
       "prefill_candidates": [*product((64, 128), (32, 64), (4, 8), (3,)), (64, 64, 4, 2),
                              (128, 64, 8, 2)]}
CPU = {"heads": (4, 2), "block_size": 16, "dtype": "float16", "decode": (2, 100),
       "prefill": (1, 40), "head_sizes": (32,),
       "decode_candidates": [(16, 4, 1), (32, 4, 1)],
       "prefill_candidates": [(32, 16, 4, 1), (16, 32, 4, 1)]}
MAX_REL_DIFF = 2e-2  # vs the default settings' output: accumulation order only


def _workload(torch, cfg: dict, head_dim: int, batch: int, seq: int, decode: bool, device):
    """(args, kwargs) of paged_attention: `batch` sequences of `seq` keys in shuffled pages,
    one query each (decode) or their whole prompt (prefill)."""
    q_heads, kv_heads = cfg["heads"]
    dtype, bs = getattr(torch, cfg["dtype"]), cfg["block_size"]
    per_seq = -(-seq // bs)
    shape = (batch * per_seq, bs, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    tables = torch.randperm(batch * per_seq, device=device).view(batch, per_seq).int()
    q_len = 1 if decode else seq
    q = torch.randn(batch * q_len, q_heads, head_dim, dtype=dtype, device=device)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * q_len
    lens = torch.full((batch,), seq, dtype=torch.int32, device=device)
    kw = {"scale": head_dim**-0.5, "max_seqlen_q": q_len, "max_seqlen_k": seq}
    return (q, k_cache, v_cache, cu, lens, tables, torch.empty_like(q)), kw


def _settings(kind: str, cand: tuple, base):
    """base with this kind's fields replaced by the candidate."""
    import dataclasses

    if kind == "decode":
        n, w, s = cand
        return dataclasses.replace(base, decode_block_n=n, decode_num_warps=w,
                                   decode_num_stages=s)
    m, n, w, s = cand
    return dataclasses.replace(base, prefill_block_m=m, prefill_block_n=n, prefill_num_warps=w,
                               prefill_num_stages=s)


def _as_candidate(kind: str, tiles) -> tuple:
    if kind == "decode":
        return tiles.decode_block_n, tiles.decode_num_warps, tiles.decode_num_stages
    return (tiles.prefill_block_m, tiles.prefill_block_n, tiles.prefill_num_warps,
            tiles.prefill_num_stages)


def _time_kind(kind: str, cands: list, base, head_dim: int, work, measure,
               deadline: float) -> list[dict]:
    """Compile every candidate (in parallel), then time each; the default settings first, as
    the baseline every output is compared with."""
    from pagedserve.kernels.triton.attention import paged_attention
    from pagedserve.kernels.triton.attention_tiles import set_tile_settings
    from pagedserve.kernels.triton.precompile import compile_launches

    args, kw = work

    def run(tiles):
        set_tile_settings(head_dim, args[0].dtype, tiles)
        return paged_attention(*args, **kw)

    default = _as_candidate(kind, base)
    cands = [default, *(c for c in cands if tuple(c) != default)]
    try:
        compile_launches([partial(run, _settings(kind, c, base)) for c in cands],
                         retry_serially=False)
    except Exception as e:  # one bad candidate fails the batch
        print(f"  parallel compile failed ({type(e).__name__}): compiling at first use")
    expected = run(base).float().clone()
    rows = []
    for cand in cands:
        tiles, row = _settings(kind, cand, base), {"candidate": list(cand)}
        if time.monotonic() > deadline:
            rows.append({**row, "error": "skipped: sweep budget spent"})
            continue
        try:
            out = run(tiles).float()  # also sets the candidate for the timed calls
            row["rel_diff"] = ((out - expected).norm() / expected.norm()).item()
            row["us"] = measure(partial(paged_attention, *args, **kw)) * 1e6
        except Exception as e:  # e.g. out of shared memory: record it, keep sweeping
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        shown = f"{row['us']:9.1f} us  diff {row['rel_diff']:.1e}" if "us" in row else row["error"]
        print(f"  {kind:7s} {cand!s:18s} {shown}", flush=True)
    return rows


def _best(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if "us" in r and r["rel_diff"] <= MAX_REL_DIFF]
    return min(ok, key=lambda r: r["us"]) if ok else None


def sweep_head(torch, cfg: dict, head_dim: int, device, measure, deadline: float) -> dict:
    """Decode and prefill candidates for one head size -> their rows, the default and the
    best settings, and the best's speed-up over the default."""
    from pagedserve.kernels.triton.attention_tiles import default_tiles, set_tile_settings
    from pagedserve.kernels.triton.runtime import next_pow2

    dtype = getattr(torch, cfg["dtype"])
    base = default_tiles(next_pow2(max(head_dim, 16)), dtype)
    result, best = {"default": base.as_dict()}, base
    try:
        for kind in ("decode", "prefill"):
            batch, seq = cfg[kind]
            work = _workload(torch, cfg, head_dim, batch, seq, kind == "decode", device)
            rows = _time_kind(kind, cfg[f"{kind}_candidates"], base, head_dim, work, measure,
                              deadline)
            top = _best(rows)
            result[kind] = {"workload": [batch, seq], "rows": rows, "best": top,
                            "speedup": rows[0]["us"] / top["us"] if top and "us" in rows[0]
                            else None}
            if top is not None:
                best = _settings(kind, tuple(top["candidate"]), best)
            del work
    finally:
        set_tile_settings(head_dim, dtype, None)
    result["best"] = best.as_dict()
    return result


def print_sweep(result: dict) -> None:
    print(f"tile sweep on {result['device']} ({result['dtype']}, heads q/kv "
          f"{result['heads'][0]}/{result['heads'][1]}): best per head size")
    print(f"{'head':>5} {'kind':>8} {'best (M) N warps stages':>26} {'us':>9} {'default us':>11} "
          f"{'speedup':>8}")
    for head, r in result["head_sizes"].items():
        for kind in ("decode", "prefill"):
            k = r.get(kind)
            if not k or not k["best"]:
                print(f"{head:>5} {kind:>8} {'(none)':>26}")
                continue
            default_us = k["rows"][0].get("us", float("nan"))
            print(f"{head:>5} {kind:>8} {k['best']['candidate']!s:>26} {k['best']['us']:>9.1f} "
                  f"{default_us:>11.1f} {k['speedup'] or float('nan'):>7.2f}x")
    for head, r in result["head_sizes"].items():
        fields = ", ".join(f"{k}={v}" for k, v in r["best"].items())
        print(f"set_tile_settings({head}, torch.{result['dtype']}, TileSettings({fields}))")


def run_sweep(torch, cuda: bool, device, measure, heads: list[int] | None,
              budget_s: float | None, out_path) -> dict:
    """The sweep over head sizes; JSON written after each, tables printed at the end."""
    from pagedserve.bench.results import write_results

    cfg = GPU if cuda else CPU
    deadline = time.monotonic() + (budget_s if budget_s else float("inf"))
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu (interpreter)",
              "dtype": cfg["dtype"], "heads": list(cfg["heads"]),
              "block_size": cfg["block_size"], "max_rel_diff": MAX_REL_DIFF, "head_sizes": {}}
    for head_dim in heads or cfg["head_sizes"]:
        if time.monotonic() > deadline:  # a head size starts with its compiles: skip it whole
            print(f"head size {head_dim}: skipped, sweep budget spent", flush=True)
            continue
        print(f"head size {head_dim}", flush=True)
        result["head_sizes"][head_dim] = sweep_head(torch, cfg, head_dim, device, measure,
                                                    deadline)
        write_results(out_path, result)
    print_sweep(result)
    return result
