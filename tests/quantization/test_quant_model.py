"""A whole model loaded from QuantizedWeights (a reader yielding them under the HF names, as the
format adapters and the GGUF loader do) generates what the same model does from the dequantized
dense weights; MoE experts given quantized are refused, naming the tensor."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve import LLM, SamplingParams
from pagedserve.executor import loader
from pagedserve.executor.layers.linear import LinearBase
from pagedserve.kernels.quantized import quantize_rtn
from tests.conftest import model_dir

QUANTIZED = ("_proj.weight", "lm_head.weight", "embed_tokens.weight", ".w1.weight")
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8)
PROMPTS = [{"prompt_token_ids": p} for p in ([1, 50, 60, 70], [1, 300], [1, 9, 8, 7, 6, 5, 4])]


def _quantized(name: str, tensor: torch.Tensor):
    if name.endswith(QUANTIZED) and tensor.dim() == 2:
        bits = 8 if "o_proj" in name or "embed" in name else 4
        return quantize_rtn(tensor, bits, 32, symmetric=bits == 8)
    return tensor


def _quantizing_reader(monkeypatch) -> None:
    plain = loader._CheckpointReader.__iter__
    monkeypatch.setattr(loader._CheckpointReader, "__iter__",
                        lambda self: ((n, _quantized(n, t)) for n, t in plain(self)))


def _dequantized_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    dense = {}
    for n, t in weights.items():
        q = _quantized(n, t)
        dense[n] = q if isinstance(q, torch.Tensor) else q.dequantize()
    save_file(dense, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _generate(path: Path) -> list[list[int]]:
    llm = LLM(path, dtype="float32", num_kv_blocks=64)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)], llm


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2's tiny model ties its LM head
def test_quantized_model_generates_as_its_dequantized_twin(arch, tmp_path, monkeypatch) -> None:
    src = model_dir(arch)
    want, _ = _generate(_dequantized_copy(src, tmp_path / "dense"))
    _quantizing_reader(monkeypatch)
    got, llm = _generate(src)
    assert got == want
    model = llm.executor.model
    layers = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert layers and all(m.quant is not None and m.weight.is_meta for m in layers)
    assert model.lm_head.quant is not None


def test_quantized_moe_experts_are_refused(monkeypatch) -> None:
    _quantizing_reader(monkeypatch)
    with pytest.raises(ValueError, match=r"experts\.0\.w1\.weight'.*MoE expert weights"):
        loader.load_model(model_dir("mixtral", "micro"), dtype="float32")


def test_quantization_option_is_checked_once() -> None:
    from pagedserve.cli import build_parser
    from pagedserve.executor.config import ExecutorConfig

    with pytest.raises(ValueError, match="quantization: must be one of"):
        ExecutorConfig(model="m", quantization="int3")
    assert ExecutorConfig(model="m", quantization="compressed_tensors").quantization == \
        "compressed-tensors"
    assert build_parser().parse_args(["executor", "m", "--quantization", "awq"]).quantization \
        == "awq"
