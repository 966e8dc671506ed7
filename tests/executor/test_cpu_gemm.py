"""Pre-packed CPU weights: bf16 gives F.linear's bits, float32 agrees with a float64 product as
closely as F.linear does (through oneDNN, or panel_gemm's panels where that kernel runs), and every
linear layer of a loaded model takes the packed form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.executor.layers.cpu_gemm import pack_weight, packed_linear
from pagedserve.executor.layers.embedding import ParallelLMHead
from pagedserve.executor.layers.linear import LinearBase
from pagedserve.executor.loader import load_model
from pagedserve.kernels.cpu import panel_gemm
from tests.conftest import model_dir

NO_PACKING = ("oneDNN packs no weights of this dtype here (bf16 on a CPU without native bf16, "
              "or a torch build without the packing ops)")


def test_packed_linear_equals_f_linear_bit_for_bit(onednn_bf16_path) -> None:
    weight, bias = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    packed = pack_weight(weight, bias)
    if packed is None:
        pytest.skip(NO_PACKING)
    for rows in (1, 3, 17, 64, 300):
        x = torch.randn(rows, 64).bfloat16()
        assert torch.equal(packed_linear(x, packed, bias), F.linear(x, weight, bias))
    x = torch.randn(8, 128).bfloat16()[:, ::2]  # a strided input is made contiguous first
    assert torch.equal(packed_linear(x, packed, bias), F.linear(x, weight, bias))


def test_paired_bf16_panels_round_the_float32_sum_once(paired_bf16_path) -> None:
    """panel_gemm512's path through pack_weight: every output within half a bf16 ulp of the
    float32 sum (the reordering bound), and F.linear within a whole one of it."""
    weight, bias = torch.randn(200, 768).bfloat16(), torch.randn(200).bfloat16()
    packed = pack_weight(weight, bias)
    assert packed.pairs is not None and packed.onednn is None
    for rows in (1, 12, 13, 100):
        x = torch.randn(rows, 768).bfloat16()
        exact = F.linear(x.double(), weight.double(), bias.double())
        size = F.linear(x.abs().double(), weight.abs().double(), bias.abs().double())
        got = packed_linear(x, packed, bias).double()
        assert ((got - exact).abs() <= 768 * 2.0**-23 * size + 2.0**-8 * exact.abs() * 1.01).all()
        assert ((got - F.linear(x, weight, bias).double()).abs()
                <= 768 * 2.0**-22 * size + 2.0**-7 * exact.abs() * 1.01).all()


def test_packed_float32_linear_is_as_close_to_float64_as_f_linear() -> None:
    """float32 may sum in another order than F.linear: both must sit within float32 rounding of
    the exact (float64) product, at decode and prompt sizes, with and without a bias."""
    weight, bias = torch.randn(300, 2048), torch.randn(300)
    for b in (None, bias):
        packed = pack_weight(weight, b)
        if packed is None:
            pytest.skip(NO_PACKING)
        # 1030 rows: panel_gemm takes x in blocks of 8 MiB (1024 rows of 2048), so two blocks
        for rows in (1, 7, 192, 257, 1030):
            x = torch.randn(rows, 2048)
            exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
            size = F.linear(x.abs().double(), weight.abs().double())
            for got in (packed_linear(x, packed, b), F.linear(x, weight, b)):
                assert ((got.double() - exact).abs() <= 2048 * 2.0**-24 * size).all()


def test_other_dtypes_and_devices_are_not_packed() -> None:
    assert pack_weight(torch.randn(8, 8).half()) is None
    assert pack_weight(torch.randn(8, 8, device="meta")) is None


@pytest.mark.parametrize("panels", [False, True], ids=["default", "panel_gemm"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_loaded_model_packs_every_linear_layer(dtype, panels, request) -> None:
    if panels:
        request.getfixturevalue("panel_gemm_path")
    model, config = load_model(model_dir("llama"), dtype=dtype)
    layers = [m for m in model.modules() if isinstance(m, (LinearBase, ParallelLMHead))]
    if pack_weight(torch.randn(4, 4).to(getattr(torch, dtype))) is None:
        pytest.skip(NO_PACKING)
    assert len(layers) == 4 * config.num_layers + 1
    assert all(m.packed is not None for m in layers)
    if dtype == "float32" and panel_gemm.available():
        assert all(m.packed.panels is not None for m in layers)
    assert all(m.weight.is_meta for m in layers if isinstance(m, LinearBase))
    # the LM head drops its copy too, unless it is the embedding's (tied)
    assert model.lm_head.weight.is_meta == (not config.tie_word_embeddings)
    assert not model.model.embed_tokens.weight.is_meta
    assert not config.tie_word_embeddings  # the llama test model: its head is its own
    with pytest.raises(ValueError, match="already packed"):
        head = model.lm_head
        head.weight_loader(head.weight, torch.zeros(config.vocab_size, config.hidden_size))


def test_a_packed_layer_keeps_no_second_copy_and_takes_any_leading_shape() -> None:
    """After packing, the layer's weight is a shape only (no memory); inputs of any leading shape
    go through the packed copy, and loading into it again is refused by name."""
    layer = LinearBase(64, 40, bias=True)
    weight, bias = torch.randn(40, 64), torch.randn(40)
    layer.weight_loader(layer.weight, weight)
    layer.weight_loader(layer.bias, bias)
    if not layer.pack_for_cpu():
        pytest.skip(NO_PACKING)
    assert layer.weight.is_meta and layer.weight.shape == (40, 64)
    x = torch.randn(2, 3, 64)
    exact = F.linear(x.double(), weight.double(), bias.double())
    size = F.linear(x.abs().double(), weight.abs().double(), bias.abs().double())
    got = layer(x)
    assert got.shape == (2, 3, 40) and ((got.double() - exact).abs() <= 65 * 2.0**-24 * size).all()
    with pytest.raises(ValueError, match="already packed"):
        layer.weight_loader(layer.weight, weight)


def test_a_tied_lm_head_keeps_the_embedding_weight() -> None:
    model, config = load_model(model_dir("qwen2"), dtype="float32")
    assert config.tie_word_embeddings
    if model.lm_head.packed is None:
        pytest.skip(NO_PACKING)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.lm_head.weight.is_meta
