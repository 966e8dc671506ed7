"""Quantized checkpoint formats: each wraps the checkpoint reader (executor/loader.py) so that a
quantized layer's parts come out as one `(prefix + ".weight", QuantizedWeight)` (or a dense
tensor, where a format has no kernel yet), which the layers take through their weight loaders
(layers/quant_weights.py). config.py says which format a checkpoint is in."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pagedserve.executor.quantization.config import QuantSpec, read_quantization

if TYPE_CHECKING:
    from pagedserve.executor.quantization.parts import PartsReader

__all__ = ["QuantSpec", "quantized_reader", "read_quantization"]


def quantized_reader(spec: QuantSpec, reader: Iterable) -> PartsReader:
    """The checkpoint reader seen through spec's format (its config fields checked here). The
    formats are imported here, not above: executor/config.py imports this package's config
    without torch."""
    from pagedserve.executor.quantization.awq import awq_format
    from pagedserve.executor.quantization.compressed_tensors import compressed_tensors_format
    from pagedserve.executor.quantization.fp8 import fp8_format
    from pagedserve.executor.quantization.gptq import gptq_format
    from pagedserve.executor.quantization.parts import PartsReader

    formats = {"awq": awq_format, "gptq": gptq_format,
               "compressed-tensors": compressed_tensors_format, "fp8": fp8_format}
    return PartsReader(reader, formats[spec.method](spec))
