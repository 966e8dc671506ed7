"""Each format's reader against an independent reference: AWQ and GPTQ tensors packed here from
the published layouts (numpy, written from the layout description, not from the loaders),
compressed-tensors tensors written by the `compressed-tensors` package itself, FP8 by torch's
float8 casts. The loaded weight must dequantize to the values the checkpoint means."""

from __future__ import annotations

import json
from types import MappingProxyType

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pagedserve.executor.layers.linear import ReplicatedLinear
from pagedserve.executor.layers.quant_weights import finish_quantized
from pagedserve.executor.quantization import quantized_reader
from pagedserve.executor.quantization.config import QuantSpec
from pagedserve.kernels import reference
from pagedserve.kernels.quantized import QuantizedWeight

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column 8j + ORDER[i]


def _words(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint32).view(np.int32))


def awq_pack(t: np.ndarray) -> torch.Tensor:
    """[rows, cols] of 0..15 -> int32 [rows, cols / 8], AutoAWQ's interleaved nibbles."""
    out = np.zeros((t.shape[0], t.shape[1] // 8), np.uint64)
    for j in range(t.shape[1] // 8):
        for i in range(8):
            out[:, j] |= t[:, 8 * j + AWQ_ORDER[i]].astype(np.uint64) << np.uint64(4 * i)
    return _words(out)


def gptq_pack(t: np.ndarray, bits: int, axis: int) -> torch.Tensor:
    """Values packed 32 / bits to a word along `axis`, value k of a word at bits [bits*k, ...)."""
    per = 32 // bits
    t = np.moveaxis(t, axis, 0).astype(np.uint64)
    out = np.zeros((t.shape[0] // per, *t.shape[1:]), np.uint64)
    for k in range(per):
        out |= t[k::per] << np.uint64(bits * k)
    return _words(np.ascontiguousarray(np.moveaxis(out, 0, axis)))


def _read(spec: dict, tensors: dict[str, torch.Tensor]) -> dict:
    spec = QuantSpec(spec["quant_method"], MappingProxyType(spec))
    return dict(quantized_reader(spec, iter(tensors.items())))


def _random_parts(out: int, inp: int, group: int, bits: int, zero_lo: int = 0):
    g = np.random.default_rng(out * inp + bits)
    q = g.integers(0, 1 << bits, (out, inp))
    z = g.integers(zero_lo, 1 << bits, (out, inp // group))
    s = torch.rand(out, inp // group, dtype=torch.float16) / 10 + 0.01
    return q, z, s


def _dense(q, z, s, group: int) -> torch.Tensor:
    """w = (q - z) * s, the groups consecutive."""
    zs = torch.from_numpy(z).repeat_interleave(group, 1).float()
    return (torch.from_numpy(q).float() - zs) * s.float().repeat_interleave(group, 1)


def test_awq_gemm_layout() -> None:
    q, z, s = _random_parts(48, 64, 16, 4)
    tensors = {"l.qweight": awq_pack(q.T), "l.qzeros": awq_pack(z.T), "l.scales": s.T.clone(),
               "norm.weight": torch.ones(3)}
    out = _read({"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm",
                 "zero_point": True}, tensors)
    assert set(out) == {"l.weight", "norm.weight"}
    qw = out["l.weight"]
    assert torch.equal(qw.q, torch.from_numpy(q).to(torch.uint8))
    torch.testing.assert_close(qw.dequantize(), _dense(q, z, s, 16), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_layout_zero_conventions(bits, fmt) -> None:
    q, z, s = _random_parts(32, 64, 16, bits, zero_lo=1)
    stored = z - 1 if fmt == "gptq" else z  # v1 stores z - 1
    tensors = {"l.qweight": gptq_pack(q.T, bits, 0), "l.qzeros": gptq_pack(stored.T, bits, 1),
               "l.scales": s.T.clone(), "l.g_idx": torch.arange(64, dtype=torch.int32) // 16}
    qw = _read({"quant_method": "gptq", "bits": bits, "group_size": 16, "desc_act": False,
                "sym": False, "checkpoint_format": fmt}, tensors)["l.weight"]
    assert type(qw) is QuantizedWeight and qw.bits == bits
    torch.testing.assert_close(qw.dequantize(), _dense(q, z, s, 16), rtol=1e-6, atol=1e-6)


def test_gptq_symmetric_8bit_has_no_offset() -> None:
    q, _, s = _random_parts(32, 64, 32, 8)
    z = np.full((32, 2), 128)
    tensors = {"l.qweight": gptq_pack(q.T, 8, 0), "l.qzeros": gptq_pack(z.T - 1, 8, 1),
               "l.scales": s.T.clone()}
    qw = _read({"quant_method": "gptq", "bits": 8, "group_size": 32, "sym": True}, tensors)
    assert qw["l.weight"].offset is None
    torch.testing.assert_close(qw["l.weight"].dequantize(), _dense(q, z, s, 32))


def test_gptq_act_order_reorders_inputs_and_the_layer_permutes_x() -> None:
    out_f, in_f, group = 24, 64, 16
    q, z, s = _random_parts(out_f, in_f, group, 4, zero_lo=1)
    order = np.random.default_rng(5).permutation(in_f)  # inputs in activation order
    g_idx = np.empty(in_f, np.int64)
    g_idx[order] = np.arange(in_f) // group
    zs = torch.from_numpy(z[:, g_idx]).float()
    dense = (torch.from_numpy(q).float() - zs) * s.float()[:, torch.from_numpy(g_idx)]
    tensors = {"l.qweight": gptq_pack(q.T, 4, 0), "l.qzeros": gptq_pack(z.T - 1, 4, 1),
               "l.scales": s.T.clone(), "l.g_idx": torch.from_numpy(g_idx).int()}
    qw = _read({"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True},
               tensors)["l.weight"]
    torch.testing.assert_close(qw.dequantize(), dense[:, qw.input_perm])
    layer = ReplicatedLinear(in_f, out_f, bias=False)
    layer.weight_loader(layer.weight, qw)
    finish_quantized(layer, reference)
    x = torch.randn(3, in_f)
    torch.testing.assert_close(layer(x), F.linear(x, dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config,error", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 16}, "bits: 3 is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemv"}, "version"),
    ({"quant_method": "awq", "bits": 8, "group_size": 16}, "bits: 8"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 24}, "does not divide the 64 inputs"),
])
def test_unsupported_configs_are_refused(config, error) -> None:
    q, z, s = _random_parts(32, 64, 16, 4)
    tensors = {"m.layers.0.q_proj.qweight": gptq_pack(q.T, 4, 0),
               "m.layers.0.q_proj.qzeros": gptq_pack(z.T, 4, 1),
               "m.layers.0.q_proj.scales": s.T.clone()}
    with pytest.raises(ValueError, match=error) as e:
        _read(config, tensors)
    if "divide" in error:
        assert "m.layers.0.q_proj" in str(e.value)  # names the layer


def test_missing_parts_name_the_layer() -> None:
    q, z, _ = _random_parts(32, 64, 16, 4)
    with pytest.raises(ValueError, match=r"layer 'l': missing \['scales'\]"):
        _read({"quant_method": "awq", "group_size": 16}, {"l.qweight": awq_pack(q.T),
                                                          "l.qzeros": awq_pack(z.T)})


def _fp8(shape, seed: int = 0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3).to(
        torch.float8_e4m3fn)


@pytest.mark.parametrize("scale_shape,block", [((), None), ((40, 1), None), ((1, 2), [128, 128])])
def test_fp8_scales_per_tensor_channel_and_block(scale_shape, block) -> None:
    w8, scale = _fp8((40, 256)), torch.rand(scale_shape) + 0.5
    full = scale.reshape(-1, 1).expand(40, 256) if block is None else scale.repeat_interleave(
        128, 0).repeat_interleave(128, 1)[:40]
    name = "l.weight_scale_inv" if block else "l.weight_scale"
    out = _read({"quant_method": "fp8", "weight_block_size": block, "activation_scheme": "dynamic"},
                {"l.weight": w8, name: scale, "l.input_scale": torch.tensor(1.0)})
    assert set(out) == {"l.weight"}
    w = out["l.weight"]
    got = w.dequantize() if isinstance(w, QuantizedWeight) else w
    assert torch.equal(got, w8.float() * full)


def test_fp8_goes_int8_only_where_exact() -> None:
    # values m * 2^-6 with m in 8..15: one octave, so each group is int8 codes times 2^-6 exactly
    m = torch.randint(8, 16, (16, 128)) * torch.where(torch.rand(16, 128) < 0.5, -1, 1)
    w8 = (m.float() * 2.0**-6).to(torch.float8_e4m3fn)
    scale = torch.rand(16, 1) + 0.5
    out = _read({"quant_method": "fp8"}, {"l.weight": w8, "l.weight_scale": scale})["l.weight"]
    assert isinstance(out, QuantizedWeight) and out.bits == 8
    assert torch.equal(out.dequantize(), w8.float() * scale)
    spread = _read({"quant_method": "fp8"}, {"l.weight": _fp8((16, 128)), "l.weight_scale": scale})
    assert not isinstance(spread["l.weight"], QuantizedWeight)  # many octaves: dense


# compressed-tensors: the package quantizes and packs, we read.

def _ct_checkpoint(tmp_path, weight: torch.Tensor, args: dict, fmt: str,
                   inputs: dict | None = None) -> tuple[dict, dict, torch.Tensor]:
    """(quantization_config, tensors under `model.layers.0.mlp.down_proj.`, the package's own
    dequantized weight)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    qargs = QuantizationArgs(**args)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    model = torch.nn.Sequential(linear)
    scheme = QuantizationScheme(targets=["Linear"], weights=qargs,
                                input_activations=QuantizationArgs(**inputs) if inputs else None)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": scheme}, quantization_status=QuantizationStatus.FROZEN))
    per = {"group": qargs.group_size, "channel": weight.shape[1]}.get(qargs.strategy,
                                                                     weight.numel())
    g = weight.reshape(-1, per) if qargs.strategy != "tensor" else weight.reshape(1, -1)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), qargs)
    linear.weight_scale.data.copy_(scale.reshape(linear.weight_scale.shape))
    if hasattr(linear, "weight_zero_point"):
        linear.weight_zero_point.data.copy_(zp.reshape(linear.weight_zero_point.shape))
    if hasattr(linear, "input_scale"):
        linear.input_scale.data.fill_(0.5)
    want = fake_quantize(weight, linear.weight_scale, getattr(linear, "weight_zero_point", None),
                         qargs)
    compressor = ModelCompressor.from_pretrained_model(model, fmt)
    compressor.compress_model(model)
    (tmp_path / "config.json").write_text("{}")
    compressor.update_config(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    tensors = {f"model.layers.0.mlp.down_proj.{k.split('.', 1)[1]}": v
               for k, v in model.state_dict().items()}
    return config, tensors, want


@pytest.mark.parametrize("args", [
    {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
    {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16},
    {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
], ids=["w4a16-sym", "w4a16-asym", "w8a16-channel", "w8a16-asym"])
def test_compressed_tensors_pack_quantized(tmp_path, args) -> None:
    weight = torch.randn(40, 64)
    config, tensors, want = _ct_checkpoint(tmp_path, weight, args, "pack-quantized")
    assert config["format"] == "pack-quantized"
    qw = _read(config, tensors)["model.layers.0.mlp.down_proj.weight"]
    assert qw.bits == args["num_bits"]
    torch.testing.assert_close(qw.dequantize(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_fp8_w8a8(tmp_path, strategy) -> None:
    weight = torch.randn(32, 64)
    config, tensors, want = _ct_checkpoint(
        tmp_path, weight, {"num_bits": 8, "type": "float", "symmetric": True,
                           "strategy": strategy}, "float-quantized",
        inputs={"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                "dynamic": False})
    assert any(k.endswith("input_scale") for k in tensors)
    out = _read(config, tensors)
    assert set(out) == {"model.layers.0.mlp.down_proj.weight"}
    w = out["model.layers.0.mlp.down_proj.weight"]
    got = w.dequantize() if isinstance(w, QuantizedWeight) else w
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
