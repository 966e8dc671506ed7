"""End to end: a make-model model quantized by `pagedserve quantize` (each method) loads through
`pagedserve.LLM` and greedy-generates what transformers generates on the dequantized weights
(a dense HF checkpoint written from them), top logprobs included; and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve import LLM, SamplingParams
from pagedserve.cli import main
from pagedserve.executor.layers.linear import LinearBase
from pagedserve.executor.loader import load_model
from pagedserve.executor.quantization.quantize import (
    METHODS,
    awq_group,
    is_quantized_linear,
    quantize_weight,
)
from pagedserve.kernels.quantized import QuantizedWeight
from tests.conftest import model_dir
from tests.hf_reference import TOP, assert_greedy_matches, hf_greedy, stdlib_prompts

N = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=N, logprobs=TOP)


def _dequantized_twin(src: Path, dst: Path, method: str) -> Path:
    """src with every weight `quantize` quantizes replaced by the values it stands for."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    linear = [n for n, t in weights.items() if is_quantized_linear(n, t)]
    group = awq_group([tuple(weights[n].shape) for n in linear])
    for name in linear:
        w = quantize_weight(weights[name], method, torch.float32, group)
        weights[name] = w.dequantize() if isinstance(w, QuantizedWeight) else w
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("method", METHODS)
def test_quantized_model_matches_transformers_on_dequantized_weights(method, tmp_path) -> None:
    from transformers import AutoTokenizer

    src = model_dir("llama")
    out = tmp_path / method
    assert main(["quantize", str(src), str(out), "--method", method]) == 0
    assert (out / "tokenizer.json").is_file()
    prompts = stdlib_prompts(AutoTokenizer.from_pretrained(src), [4, 17, 40])
    refs = hf_greedy(_dequantized_twin(src, tmp_path / "dense", method), prompts, N)
    llm = LLM(out, dtype="float32", num_kv_blocks=64)
    outs = llm.generate([{"prompt_token_ids": r.prompt} for r in refs], GREEDY, use_tqdm=False)
    for o, ref in zip(outs, refs):
        assert_greedy_matches(o.outputs[0].token_ids, o.outputs[0].logprobs, ref)
    layers = [m for m in llm.executor.model.modules() if isinstance(m, LinearBase)]
    quantized = [m.quant is not None for m in layers]
    assert all(quantized) if method != "fp8" else not any(quantized)  # fp8: dense on the CPU


def test_int8_checkpoint_reads_back_with_compressed_tensors(tmp_path) -> None:
    """Our writer's packing, unpacked by the compressed-tensors package itself."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    src = model_dir("llama")
    out = tmp_path / "int8"
    main(["quantize", str(src), str(out), "--method", "int8"])
    stored = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    w = load_file(src / "model.safetensors")[name + ".weight"]
    q = unpack_from_int32(stored[name + ".weight_packed"], 8, stored[name + ".weight_shape"])
    want = quantize_weight(w, "int8")
    assert torch.equal(q, want.q)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and "lm_head" in config["ignore"]


def _rewrite_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_refusals(tmp_path) -> None:
    src = model_dir("llama")
    awq = tmp_path / "awq"
    main(["quantize", str(src), str(awq), "--method", "int4-awq-format"])
    with pytest.raises(ValueError, match="'gptq' was asked for, but the checkpoint is 'awq'"):
        load_model(awq, dtype="float32", quantization="gptq")
    with pytest.raises(ValueError, match="has no quantization_config"):
        load_model(src, dtype="float32", quantization="awq")
    _rewrite_config(awq, group_size=96)
    with pytest.raises(ValueError,
                       match=r"layer 'model\.layers\.0\.[\w.]+': group_size 96 does not divide"):
        load_model(awq, dtype="float32")
    _rewrite_config(awq, group_size=128, bits=3)
    with pytest.raises(ValueError, match=r"quantization_config\.bits: 3 is not supported"):
        load_model(awq, dtype="float32")
    with pytest.raises(ValueError, match="already quantized"):
        main(["quantize", str(awq), str(tmp_path / "again"), "--method", "int8"])


def _calibrate(model: torch.nn.Module, args) -> None:
    """Each quantized Linear's scale and zero point from its weight's min and max per group (what
    llm-compressor's RTN observer does), with the package's own calculate_qparams."""
    from compressed_tensors.quantization.utils import calculate_qparams

    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.detach().reshape(-1, args.group_size)
            scale, zp = calculate_qparams(w.amin(-1), w.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.data.copy_(zp.reshape(module.weight_zero_point.shape))


def test_compressed_tensors_model_written_by_the_package(tmp_path) -> None:
    """A whole model quantized (W4A16, asymmetric, group 32) and packed by compressed-tensors:
    our greedy tokens against transformers on the package's own dequantized weights."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                            group_size=32)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"], quantization_status=QuantizationStatus.FROZEN))
    _calibrate(model, args)
    dense = _dense_copy(src, tmp_path / "dense", {
        f"{n}.weight": fake_quantize(m.weight, m.weight_scale, m.weight_zero_point, args)
        for n, m in model.named_modules() if hasattr(m, "weight_scale")})
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    out = _dense_copy(src, tmp_path / "ct", None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              out / "model.safetensors", metadata={"format": "pt"})
    compressor.update_config(str(out))
    prompts = stdlib_prompts(AutoTokenizer.from_pretrained(src), [4, 17, 40])
    refs = hf_greedy(dense, prompts, N)
    llm = LLM(out, dtype="float32", num_kv_blocks=64)
    outs = llm.generate([{"prompt_token_ids": r.prompt} for r in refs], GREEDY, use_tqdm=False)
    for o, ref in zip(outs, refs):
        assert_greedy_matches(o.outputs[0].token_ids, o.outputs[0].logprobs, ref)
    assert llm.executor.model.model.layers[0].mlp.down_proj.quant is not None


def _dense_copy(src: Path, dst: Path, replace: dict[str, torch.Tensor] | None) -> Path:
    """src copied; with `replace`, those weights overwritten (None: the weights file left out)."""
    shutil.copytree(src, dst, ignore=None if replace else shutil.ignore_patterns("*.safetensors"))
    if replace:
        weights = load_file(dst / "model.safetensors")
        weights.update({k: v.detach().contiguous() for k, v in replace.items()})
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_transformers_fallback_refuses_quantized_checkpoints(tmp_path) -> None:
    from pagedserve.executor.models.transformers_probe import UnsupportedModel

    out = _dense_copy(model_dir("phi", "micro"), tmp_path / "phi", None)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match=r"quantized checkpoint \(awq\) runs on the native"):
        load_model(out, dtype="float32")


def _gptq_act_order(w: torch.Tensor, order: torch.Tensor, group: int,
                    g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One weight as a GPTQ v1 act-order checkpoint would hold it (4 bits, groups of `group`
    inputs taken in `order`), and the dense values it stands for. Packed by the test's own
    packer (test_formats.gptq_pack)."""
    from tests.quantization.test_formats import gptq_pack

    out_f, in_f = w.shape
    wp = w[:, order].reshape(out_f, in_f // group, group)
    lo, hi = wp.amin(-1), wp.amax(-1)
    s = ((hi - lo) / 15).clamp_min(1e-6).half().float()
    z = (-lo / s).round().clamp(1, 15)  # v1 cannot store a zero point of 0
    qp = ((wp / s[..., None]).round() + z[..., None]).clamp(0, 15).reshape(out_f, in_f)
    q = qp[:, torch.argsort(order)]  # codes back in the checkpoint's input order
    g_idx = torch.empty(in_f, dtype=torch.int64)
    g_idx[order] = torch.arange(in_f) // group
    dense = (q - z[:, g_idx]) * s[:, g_idx]
    parts = {"qweight": gptq_pack(q.long().numpy().T, 4, 0),
             "qzeros": gptq_pack((z.long().numpy() - 1).T, 4, 1),
             "scales": s.t().half().contiguous(), "g_idx": g_idx.int()}
    return parts, dense


def test_gptq_act_order_model_matches_transformers(tmp_path) -> None:
    """Every decoder linear of the tiny llama as GPTQ act-order (q/k/v and gate/up share their
    input's order, as GPTQ's Hessian order is the input's)."""
    from transformers import AutoTokenizer

    src = model_dir("llama")
    weights, g = load_file(src / "model.safetensors"), torch.Generator().manual_seed(0)
    quantized, dense, orders = {}, {}, {}
    for name in [n for n, t in weights.items() if is_quantized_linear(n, t)]:
        w, prefix = weights[name], name.removesuffix(".weight")
        key = (prefix.rsplit(".", 1)[0], prefix.endswith(("o_proj", "down_proj")))
        order = orders.setdefault(key, torch.randperm(w.shape[1], generator=g))
        parts, dense[name] = _gptq_act_order(w, order, 32, g)
        quantized.update({f"{prefix}.{k}": v for k, v in parts.items()})
    ref_dir = _dense_copy(src, tmp_path / "dense", dense)
    out = _dense_copy(src, tmp_path / "gptq", None)
    rest = {n: t for n, t in weights.items() if n not in dense}
    save_file({**rest, **quantized}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                     "desc_act": True, "sym": False}
    (out / "config.json").write_text(json.dumps(config))
    refs = hf_greedy(ref_dir, stdlib_prompts(AutoTokenizer.from_pretrained(src), [4, 17, 40]), N)
    llm = LLM(out, dtype="float32", num_kv_blocks=64)
    outs = llm.generate([{"prompt_token_ids": r.prompt} for r in refs], GREEDY, use_tqdm=False)
    for o, ref in zip(outs, refs):
        assert_greedy_matches(o.outputs[0].token_ids, o.outputs[0].logprobs, ref)
    assert llm.executor.model.model.layers[0].self_attn.qkv_proj.input_perm is not None


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_log_says_which_activation_path_quantized_layers_take(tmp_path, dtype) -> None:
    """The path depends on the CPU (quant_linear.default_act), so the load names it: the one
    that the layers' calls then take."""
    import importlib

    from structlog.testing import capture_logs

    ql = importlib.import_module("pagedserve.kernels.cpu.quant_linear")
    out = tmp_path / "int4"
    main(["quantize", str(model_dir("llama")), str(out), "--method", "int4-awq-format"])
    with capture_logs() as logs:
        load_model(out, dtype=dtype, device=torch.device("cpu"))
    said = [e for e in logs if e["event"] == "quantized layers on the CPU"]
    assert len(said) == 1, logs
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert said[0]["activations"] == ql.act(want) and said[0]["tiles"] == ql.path(want)
    assert said[0]["layers"] > 0
    with capture_logs() as logs:  # a dense model says nothing of it
        load_model(model_dir("llama"), dtype=dtype, device=torch.device("cpu"))
    assert not [e for e in logs if e["event"] == "quantized layers on the CPU"]
