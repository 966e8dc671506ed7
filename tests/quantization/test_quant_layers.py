"""Quantized weights through the linear layer family: each layer given QuantizedWeight shards
computes what it computes given their dequantized values (sharded the same way for tensor
parallelism), keeps no dense copy, and refuses mixed, inconsistent or misaligned shards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.executor.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedserve.executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedserve.executor.layers.quant_weights import finish_quantized
from pagedserve.kernels import reference
from pagedserve.kernels.quantized import quantize_rtn


def _qw(out: int, inp: int, bits: int = 4, group: int = 16, symmetric: bool = False):
    return quantize_rtn(torch.randn(out, inp), bits, group, symmetric)


def _load(layer, loads: list[tuple[object, object]]) -> None:
    for shard_id, loaded in loads:
        layer.weight_loader(layer.weight, loaded, shard_id)


def _dense_twin(layer_cls, args, loads, **kw):
    layer = layer_cls(*args, **kw)
    _load(layer, [(s, w.dequantize()) for s, w in loads])
    return layer


@pytest.mark.parametrize("tp_rank,tp_size", [(0, 1), (1, 2)])
def test_qkv_and_merged_assemble_shards_in_the_dense_order(tp_rank, tp_size) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    qkv = [("q", _qw(4 * 16, 64)), ("k", _qw(2 * 16, 64, bits=4)), ("v", _qw(2 * 16, 64))]
    merged = [(0, _qw(48, 64, bits=8, symmetric=True)), (1, _qw(48, 64, bits=8, symmetric=True))]
    cases = [(QKVParallelLinear, (64, 16, 4, 2, False), qkv),
             (MergedColumnParallelLinear, (64, [48, 48], False), merged)]
    for cls, args, loads in cases:
        layer = cls(*args, tp_rank=tp_rank, tp_size=tp_size)
        _load(layer, loads)
        assert finish_quantized(layer, reference) == 1
        assert layer.weight.is_meta and layer.quant is not None
        dense = _dense_twin(cls, args, loads, tp_rank=tp_rank, tp_size=tp_size)
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


def test_row_parallel_slices_inputs_at_group_boundaries() -> None:
    torch.manual_seed(1)
    qw, bias = _qw(24, 64, group=16), torch.randn(24)
    x = torch.randn(3, 64)
    full = F.linear(x, qw.dequantize())
    parts = []
    for rank in (0, 1):
        layer = RowParallelLinear(64, 24, bias=True, tp_rank=rank, tp_size=2)
        _load(layer, [(None, qw)])
        layer.weight_loader(layer.bias, bias)
        finish_quantized(layer, reference)
        parts.append(layer._matmul(x[:, 32 * rank: 32 * rank + 32], None))
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-5, atol=1e-5)
    misaligned = RowParallelLinear(64, 24, bias=False, tp_rank=1, tp_size=2)
    with pytest.raises(ValueError, match="group boundaries"):
        _load(misaligned, [(None, _qw(24, 64, group=64))])


def test_column_parallel_and_leading_shapes() -> None:
    qw = _qw(32, 32, bits=8, group=32)
    layer = ColumnParallelLinear(32, 32, bias=False, tp_rank=1, tp_size=2)
    _load(layer, [(None, qw)])
    finish_quantized(layer, reference)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(layer(x), F.linear(x, qw.dequantize()[16:]), rtol=1e-5, atol=1e-5)
    assert not layer.pack_for_cpu()  # packed once, by the quantized kernels


def test_refusals_name_the_reason() -> None:
    layer = QKVParallelLinear(64, 16, 4, 2, bias=True)
    _load(layer, [("q", _qw(64, 64))])
    with pytest.raises(ValueError, match="shard 'k' is quantized with 8 bits"):
        _load(layer, [("k", _qw(32, 64, bits=8))])
    with pytest.raises(ValueError, match="half quantized"):
        _load(layer, [("v", torch.randn(32, 64))])
    with pytest.raises(ValueError, match="bias cannot be quantized"):
        layer.weight_loader(layer.bias, _qw(64, 64), "q")
    with pytest.raises(ValueError, match="expected shape"):
        _load(layer, [("k", _qw(48, 64))])
    dense_first = MergedColumnParallelLinear(64, [16, 16], bias=False)
    _load(dense_first, [(0, torch.randn(16, 64))])
    with pytest.raises(ValueError, match="half quantized"):
        _load(dense_first, [(1, _qw(16, 64))])


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_dequantizes_and_the_lm_head_runs_quantized(tied) -> None:
    torch.manual_seed(2)
    vocab, dim = 49, 32  # rank 1 holds rows 25..48 and one zero row of padding
    embed = VocabParallelEmbedding(vocab, dim, tp_rank=1, tp_size=2)
    head = ParallelLMHead(vocab, dim, tp_rank=1, tp_size=2)
    qw = _qw(vocab, dim, bits=8, group=16, symmetric=True)
    embed.weight_loader(embed.weight, qw)
    if tied:
        head.weight, head.tied = embed.weight, True
    else:
        head.weight_loader(head.weight, qw)
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    assert finish_quantized(model, reference) == 1
    assert not hasattr(embed.weight, "quantized")  # the codes live on only in the packed head
    rows = torch.cat([qw.dequantize()[25:], torch.zeros(1, dim)])
    torch.testing.assert_close(embed.weight, rows)
    assert head.weight.is_meta == (not tied)
    h = torch.randn(3, dim)
    torch.testing.assert_close(head.quant_backend.quant_linear(h, head.quant, None),
                               F.linear(h, rows), rtol=1e-5, atol=1e-5)
