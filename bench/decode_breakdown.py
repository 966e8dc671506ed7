"""Where a batch-1 decode step goes: the pieces of one offline engine wrapped with timers.

    python -m pagedserve.bench.decode_breakdown [MODEL]   (default: SmolLM2-135M-Instruct)

One greedy request of 128 tokens in bf16, after a warm-up one; each piece's time per step and
share of the wall time. The timers cost about a microsecond per wrapped call (some 300 a step on
SmolLM2 on the module path), so the shares of small pieces are a little high. A model the C layer
loop takes (executor/models/layer_loop.py: a quantized one, as the default GGUF runs, or a dense
one whose GEMMs are in panels or pairs) shows its layers as one piece; PAGEDSERVE_DISABLE_LAYER_LOOP=1 shows them module by module.
"""

from __future__ import annotations

import collections
import functools
import sys
import time

from pagedserve import LLM, SamplingParams
from pagedserve.executor.layers import linear as lin
from pagedserve.executor.layers.attention import PagedAttention
from pagedserve.executor.layers.norm import RMSNorm
from pagedserve.executor.layers.rotary import RotaryEmbedding
from pagedserve.kernels.cpu.layer_loop import LayerLoop

T: collections.Counter = collections.Counter()
N: collections.Counter = collections.Counter()


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            T[name] += time.perf_counter() - start
            N[name] += 1
    return wrapper


def instrument(llm: LLM) -> None:
    for cls, name in ((PagedAttention, "attention (KV write + paged decode)"),
                      (RMSNorm, "RMSNorm (+ residual add)"), (RotaryEmbedding, "rotary")):
        cls.forward = timed(name, cls.forward)
    LayerLoop.run = timed("layer loop (every layer, one C call)", LayerLoop.run)
    for cname in ("QKVParallelLinear", "MergedColumnParallelLinear", "RowParallelLinear"):
        layer = getattr(lin, cname)
        layer.forward = timed("linear GEMMs (qkv, gate-up, o, down)", layer.forward)
    ex, sch = llm.executor, llm.scheduler
    m = ex.model
    m.backend.silu_and_mul = timed("SiLU-and-mul", m.backend.silu_and_mul)
    m.compute_logits = timed("LM head (logits)", m.compute_logits)
    ex.sampler.__class__.__call__ = timed("sampler", ex.sampler.__class__.__call__)
    ex.batch.prepare = timed("input prep (InputBatch.prepare)", ex.batch.prepare)
    sch.schedule = timed("scheduler.schedule", sch.schedule)
    sch.apply_result = timed("scheduler.apply_result", sch.apply_result)
    m.forward = timed("model forward (all layers)", m.forward)
    ex.execute = timed("executor.execute (whole step)", ex.execute)


def main(argv: list[str] | None = None) -> int:
    from pagedserve.real_model import real_model_path

    args = sys.argv[1:] if argv is None else argv
    model = args[0] if args else str(real_model_path())
    llm = LLM(model, dtype="bfloat16")
    instrument(llm)
    sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate(["Hello there, how are you?"], sp)
    T.clear()
    N.clear()
    start = time.perf_counter()
    llm.generate(["Hello there, how are you?"], sp)
    wall = time.perf_counter() - start
    steps = N["executor.execute (whole step)"]
    loop = getattr(llm.executor.model, "layer_loop", None)
    print(f"{model}: {steps} steps, {128 / wall:.1f} tok/s, {1e3 * wall / steps:.2f} ms/step; "
          f"layer loop: {'in use' if loop is not None and not loop.reason else loop and loop.reason}")
    for name, seconds in sorted(T.items(), key=lambda kv: -kv[1]):
        print(f"  {name:42s} {1e3 * seconds / steps:7.3f} ms/step  {100 * seconds / wall:5.1f}%  "
              f"({N[name] // steps} calls/step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
