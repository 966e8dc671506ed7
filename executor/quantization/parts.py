"""Gathering a quantized layer's parts from the checkpoint stream.

A quantized checkpoint stores one linear weight as several tensors (AWQ: qweight, qzeros,
scales; compressed-tensors: weight_packed, weight_scale, ...), possibly split over shard files.
PartsReader wraps the plain reader: tensors a format claims are held per layer prefix until the
layer's required parts are all in, then converted once and yielded as `prefix + ".weight"`;
every other tensor passes through untouched. A part of a layer already yielded (an optional one
arriving late) is dropped; a layer missing parts at the end is refused, naming them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from pagedserve.kernels.quantized import QuantizedWeight


@dataclass(frozen=True)
class Format:
    """What one checkpoint format contributes to PartsReader."""

    name: str
    # (checkpoint name, tensor) -> (layer prefix, part role), or None for a tensor passed through
    claim: Callable[[str, torch.Tensor], tuple[str, str] | None]
    # layer prefix -> the roles that must be present before converting
    required: Callable[[str], frozenset[str]]
    # (layer prefix, {role: tensor}) -> the layer's weight, quantized or dense
    convert: Callable[[str, dict[str, torch.Tensor]], QuantizedWeight | torch.Tensor]


class PartsReader:
    """Yields (name, tensor or QuantizedWeight); `current` is the wrapped reader's current file,
    so the loader's error messages still name the file."""

    def __init__(self, inner: Iterable[tuple[str, torch.Tensor]], fmt: Format):
        self.inner, self.fmt = inner, fmt

    @property
    def current(self):
        return getattr(self.inner, "current", None)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        held: dict[str, dict[str, torch.Tensor]] = {}
        done: set[str] = set()
        for name, tensor in self.inner:
            claimed = self.fmt.claim(name, tensor)
            if claimed is None:
                yield name, tensor
                continue
            prefix, role = claimed
            if prefix in done:
                continue
            parts = held.setdefault(prefix, {})
            parts[role] = tensor
            if self.fmt.required(prefix) <= parts.keys():
                done.add(prefix)
                yield prefix + ".weight", self._convert(prefix, held.pop(prefix))
        if held:
            prefix, parts = next(iter(held.items()))
            missing = sorted(self.fmt.required(prefix) - parts.keys())
            raise ValueError(f"{self.fmt.name} layer {prefix!r}: missing {missing} "
                             f"({len(held)} layer(s) incomplete)")

    def _convert(self, prefix: str, parts: dict[str, torch.Tensor]):
        try:
            return self.fmt.convert(prefix, parts)
        except ValueError as e:
            raise ValueError(f"{self.fmt.name} layer {prefix!r}: {e}") from None


def suffix_claim(suffixes: dict[str, str]) -> Callable[[str, torch.Tensor], tuple[str, str] | None]:
    """A claim by name: checkpoint suffix (".qweight") -> role."""

    def claim(name: str, tensor: torch.Tensor) -> tuple[str, str] | None:
        for suffix, role in suffixes.items():
            if name.endswith(suffix):
                return name[: -len(suffix)], role
        return None

    return claim
