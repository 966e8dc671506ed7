"""executor/gguf_quant.py against the `gguf` package (llama.cpp's own Python reader): a GGUF tensor
turned into a QuantizedWeight dequantizes to exactly what `gguf.quants.dequantize` gives.

The legacy types are quantized by `gguf.quants.quantize` itself. It cannot quantize the K types
(NotImplementedError in gguf 0.19), so their blocks are random bytes with finite f16 super-scales:
every bit pattern of the codes and 6-bit scales is a valid block, which covers more of the layout
than a quantizer's output would. Then the checkpoint (gguf_loader.py): which tensors it yields
quantized, and that they hold exactly the values of the same file loaded dense.
"""

from __future__ import annotations

from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

from pagedserve.executor.gguf_loader import GGUFCheckpoint
from pagedserve.executor.gguf_quant import CONVERTERS, common_form, gguf_quantized, widen
from pagedserve.kernels.quantized import QuantizedWeight
from tests.conftest import model_dir
from tests.gguf.hf_to_gguf import convert

QUANTIZABLE = (QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1)
K_TYPES = {QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,)}  # the byte offsets of each block's f16 scales
EXPECTED = {QType.Q8_0: (8, 32, False), QType.Q4_0: (4, 32, True), QType.Q4_1: (4, 32, True),
            QType.Q5_0: (8, 32, False), QType.Q5_1: (8, 32, True), QType.Q4_K: (4, 32, True),
            QType.Q5_K: (8, 32, True), QType.Q6_K: (8, 16, False)}  # bits, group, has an offset


def _random_k_blocks(qtype: QType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in K_TYPES[qtype]:  # finite scales, normal and subnormal, both signs
        d = (rng.standard_normal((rows, cols // block)) * 10.0 ** rng.integers(-7, 1)).astype(
            np.float16)
        raw[..., at:at + 2] = d[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def _raw(qtype: QType, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype in K_TYPES:
        return _random_k_blocks(qtype, rows, cols, rng)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[0, :32] = 0.0  # an all-zero block: d = 0
    w[1, :32] = 1.0  # a constant block: max == min
    return gguf.quants.quantize(w, qtype)


@pytest.mark.parametrize("qtype", list(CONVERTERS), ids=lambda t: t.name)
@pytest.mark.parametrize("rows, cols", [(8, 256), (48, 768)])
def test_dequantizes_exactly_as_gguf(qtype: QType, rows: int, cols: int) -> None:
    raw = _raw(qtype, rows, cols, seed=rows + cols)
    qw = gguf_quantized(raw, qtype, rows, cols)
    expected = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    assert np.isfinite(expected).all()
    got = qw.dequantize(torch.float32).numpy()
    assert np.array_equal(got, expected)  # bit for bit, see gguf_quant.py's docstring
    qw.check_codes()


@pytest.mark.parametrize("qtype", list(CONVERTERS), ids=lambda t: t.name)
def test_the_form_of_each_type(qtype: QType) -> None:
    bits, group, has_offset = EXPECTED[qtype]
    qw = gguf_quantized(_raw(qtype, 4, 512, seed=1), qtype, 4, 512)
    assert (qw.bits, qw.group, qw.offset is not None) == (bits, group, has_offset)
    assert qw.shape == (4, 512) and qw.scale.shape == (4, 512 // group)


def test_gguf_cannot_quantize_the_k_types() -> None:
    """Why the K types are tested on random blocks: a gguf that learns to quantize them should
    be used here instead."""
    for qtype in K_TYPES:
        with pytest.raises(NotImplementedError):
            gguf.quants.quantize(np.zeros((1, 256), np.float32), qtype)


def test_codes_of_known_blocks() -> None:
    """One hand-made Q4_0 and Q8_0 block each: the nibble order (low nibbles first) and sign."""
    d = np.float16(0.5).tobytes()
    q4 = np.frombuffer(d + bytes((j | (15 - j) << 4) for j in range(16)), np.uint8)
    qw = gguf_quantized(q4, QType.Q4_0, 1, 32)
    assert qw.q[0].tolist() == list(range(16)) + list(range(15, -1, -1))
    assert qw.dequantize()[0, :3].tolist() == [-4.0, -3.5, -3.0]
    q8 = np.frombuffer(d + bytes(np.arange(-16, 16, dtype=np.int8).view(np.uint8)), np.uint8)
    assert gguf_quantized(q8, QType.Q8_0, 1, 32).q[0].tolist() == list(range(-16, 16))


def test_refuses_what_it_cannot_convert() -> None:
    with pytest.raises(ValueError, match="Q2_K is not run quantized"):
        gguf_quantized(np.zeros(84, np.uint8), QType.Q2_K, 1, 256)
    with pytest.raises(ValueError, match="do not hold"):
        gguf_quantized(np.zeros(33, np.uint8), QType.Q8_0, 1, 32)


@pytest.mark.parametrize("qtype", list(CONVERTERS), ids=lambda t: t.name)
def test_widen_keeps_every_value(qtype: QType) -> None:
    qw = gguf_quantized(_raw(qtype, 4, 256, seed=2), qtype, 4, 256)
    wide = widen(qw, 8, 16)
    assert (wide.bits, wide.group, wide.q.dtype) == (8, 16, torch.int8)
    assert torch.equal(wide.dequantize(), qw.dequantize())


def test_common_form_of_fused_projections() -> None:
    assert common_form([QType.Q4_1, QType.Q4_0]) == (4, 32)
    assert common_form([QType.Q4_K, QType.Q4_K, QType.Q6_K]) == (8, 16)  # Q4_K_M's q, k, v
    assert common_form([QType.Q8_0]) == (8, 32)


# The checkpoint: which tensors load quantized, and that they hold the dense load's values.

def _fake_checkpoint(types: dict[str, QType], quantized: bool = True) -> GGUFCheckpoint:
    """A GGUFCheckpoint over tensor names and types only (quantized_forms reads no data)."""
    ckpt = GGUFCheckpoint.__new__(GGUFCheckpoint)
    ckpt.quantized = quantized
    ckpt.reader = SimpleNamespace(tensors=[
        SimpleNamespace(name=n, tensor_type=t, shape=[64] if "norm" in n else [64, 64])
        for n, t in types.items()])
    return ckpt


def test_which_tensors_load_quantized() -> None:
    types = {"token_embd.weight": QType.Q8_0, "output_norm.weight": QType.F32,
             "blk.0.attn_norm.weight": QType.F32, "blk.0.attn_q.weight": QType.Q4_K,
             "blk.0.attn_k.weight": QType.Q4_K, "blk.0.attn_v.weight": QType.Q6_K,
             "blk.0.attn_output.weight": QType.F16, "blk.0.ffn_gate.weight": QType.Q2_K,
             "blk.0.ffn_up.weight": QType.Q4_K, "blk.0.ffn_down.weight": QType.Q6_K}
    forms = _fake_checkpoint(types).quantized_forms()
    assert forms == {"token_embd.weight": (8, 32), "blk.0.attn_q.weight": (8, 16),
                     "blk.0.attn_k.weight": (8, 16), "blk.0.attn_v.weight": (8, 16),
                     "blk.0.ffn_down.weight": (8, 16)}  # gate and up: dense (Q2_K is not run)
    assert _fake_checkpoint(types, quantized=False).quantized_forms() == {}


@pytest.mark.parametrize(("arch", "qtype"), [("llama", QType.Q4_1), ("qwen3", QType.Q8_0)])
def test_quantized_load_holds_the_dense_values(arch: str, qtype: QType, tmp_path) -> None:
    """Every tensor of a quantized file, un-permuted Q/K rows included: the QuantizedWeight the
    checkpoint yields dequantizes to the dense tensor the same file gives with quantized=False."""
    path = convert(model_dir(arch), tmp_path / "m.gguf", qtype=qtype)
    dense = dict(GGUFCheckpoint(path, quantized=False))
    mine = dict(GGUFCheckpoint(path))
    assert mine.keys() == dense.keys()
    quantized = {n for n, w in mine.items() if isinstance(w, QuantizedWeight)}
    assert {n for n, w in dense.items() if w.dim() == 2} == quantized
    for name, w in mine.items():
        got = w.dequantize() if name in quantized else w
        assert torch.equal(got, dense[name]), name


MIXED = {"attn_q": QType.Q4_0, "attn_k": QType.Q4_0, "attn_v": QType.Q8_0,
         "attn_output": QType.Q5_1, "ffn_gate": QType.Q4_1, "ffn_up": QType.Q5_0,
         "ffn_down": QType.Q8_0, "token_embd": QType.Q4_1, "output": QType.Q8_0}


def _mixed_gguf(hf_dir, out, monkeypatch) -> None:
    """hf_dir as a GGUF whose projections have the types of MIXED (as llama.cpp's _M mixes
    differ within a layer)."""
    from tests.gguf import hf_to_gguf

    dense = hf_to_gguf._tensors

    def mixed(*args):
        for name, data, kind in dense(*args):
            kind = MIXED.get(name.removesuffix(".weight").rpartition(".")[2], kind)
            yield name, (data if kind == QType.F32 else gguf.quants.quantize(data, kind)), kind

    monkeypatch.setattr(hf_to_gguf, "_tensors", mixed)
    convert(hf_dir, out)


def test_mixed_types_generate_as_the_dense_load(tmp_path, monkeypatch) -> None:
    """A whole model from a file of mixed types (q, k Q4_0 and v Q8_0 in one fused layer; gate
    Q4_1 and up Q5_0) generates what the same file loaded dense does, in float32."""
    from pagedserve import LLM, SamplingParams

    _mixed_gguf(model_dir("llama"), tmp_path / "mixed.gguf", monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16, logprobs=2)
    prompts = [{"prompt_token_ids": p} for p in ([1, 50, 60, 70], [1, 300], [1, 9, 8, 7, 6, 5])]
    outs = {}
    for quantized in (True, False):
        llm = LLM(tmp_path / "mixed.gguf", dtype="float32", num_kv_blocks=32,
                  quantization="auto" if quantized else "dequantize")
        quant = [getattr(m, "quant", None) for m in llm.executor.model.modules()]
        layers = llm.executor.model_config.num_layers
        assert sum(q is not None for q in quant) == (4 * layers + 1 if quantized else 0)
        outs[quantized] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    for q, d in zip(outs[True], outs[False]):
        assert q.token_ids == d.token_ids
        for top_q, top_d in zip(q.logprobs, d.logprobs):
            assert all(abs(top_q[t] - top_d[t]) < 1e-3 for t in top_d)


def test_the_decode_bench_runs(tmp_path) -> None:
    """bench.gguf_decode on a tiny Q8_0 file: a rate per engine and batch size, the quantized
    engine first and the dequantized one last (the reference of the ratios)."""
    import json

    from pagedserve.bench import gguf_decode

    path = convert(model_dir("llama"), tmp_path / "m.gguf", qtype=QType.Q8_0)
    out = tmp_path / "r.json"
    assert gguf_decode.main(["--model", str(path), "--batch-sizes", "1,2", "--tokens", "4",
                             "--rounds", "1", "--dtype", "float32", "--out", str(out)]) == 0
    rates = json.loads(out.read_text())["rates"]
    assert list(rates) == ["m.gguf quantized", "m.gguf dequantized at load"]
    assert all(r[b] > 0 for r in rates.values() for b in ("1", "2"))
