"""Pre-packed CPU weights: the same bits as F.linear, and every linear layer of a loaded bf16 model
takes the packed form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from executor.layers.cpu_gemm import pack_weight, packed_linear
from executor.layers.embedding import ParallelLMHead
from executor.layers.linear import LinearBase
from executor.loader import load_model
from tests.conftest import model_dir


def test_packed_linear_equals_f_linear_bit_for_bit() -> None:
    weight, bias = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    packed = pack_weight(weight, bias)
    if packed is None:
        pytest.skip("this torch build has no oneDNN weight packing")
    for rows in (1, 3, 17, 64, 300):
        x = torch.randn(rows, 64).bfloat16()
        assert torch.equal(packed_linear(x, packed, bias), F.linear(x, weight, bias))
    x = torch.randn(8, 128).bfloat16()[:, ::2]  # a strided input is made contiguous first
    assert torch.equal(packed_linear(x, packed, bias), F.linear(x, weight, bias))


def test_float32_weights_are_not_packed() -> None:
    assert pack_weight(torch.randn(8, 8)) is None


def test_loaded_bf16_model_packs_every_linear_layer() -> None:
    model, config = load_model(model_dir("llama"), dtype="bfloat16")
    layers = [m for m in model.modules() if isinstance(m, (LinearBase, ParallelLMHead))]
    if pack_weight(torch.randn(4, 4).bfloat16()) is None:
        pytest.skip("this torch build has no oneDNN weight packing")
    assert len(layers) == 4 * config.num_layers + 1
    assert all(m.packed is not None for m in layers)
    fp32, _ = load_model(model_dir("llama"), dtype="float32")
    assert all(m.packed is None for m in fp32.modules() if isinstance(m, LinearBase))
