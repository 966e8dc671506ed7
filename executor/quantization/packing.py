"""Small integers packed into int32 words, as AWQ, GPTQ and compressed-tensors store them.

A word holds 32 / bits values; value j of a word sits at bits [bits * slot[j], bits * slot[j] +
bits). GPTQ and compressed-tensors fill slots in order (slot[j] = j, the lowest bits first); AWQ
interleaves its 8 nibbles (AWQ_SLOTS). Packing runs along one dimension of the unpacked tensor:

    unpacked [..., n * per_word]  <->  packed [..., n]      (along `dim`; per_word = 32 / bits)
"""

from __future__ import annotations

import torch

SEQUENTIAL = None  # slot[j] = j
# AutoAWQ packs output channels (8j + ORDER[i]) into nibble i, ORDER = [0, 2, 4, 6, 1, 3, 5, 7]:
# so channel 8j + c sits in nibble AWQ_SLOTS[c] (ORDER's inverse).
AWQ_SLOTS = (0, 4, 1, 5, 2, 6, 3, 7)


def _shifts(bits: int, slots: tuple[int, ...] | None, device: torch.device,
            dtype: torch.dtype = torch.int64) -> torch.Tensor:
    per = 32 // bits
    order = range(per) if slots is None else slots
    if len(order) != per:
        raise ValueError(f"{len(order)} slots for {per} values per word")
    return torch.tensor([bits * s for s in order], dtype=dtype, device=device)


def unpack_int32(words: torch.Tensor, bits: int, dim: int,
                 slots: tuple[int, ...] | None = SEQUENTIAL) -> torch.Tensor:
    """int32 words -> their values (0 .. 2^bits - 1) as int32, 32 / bits times longer on dim."""
    if words.dtype != torch.int32:
        raise ValueError(f"expected int32 packed words, got {words.dtype}")
    if bits not in (2, 4, 8):
        raise ValueError(f"bits: {bits} values do not pack evenly into int32 words")
    w = words.movedim(dim, -1)  # int32: the shift sign-extends, and the mask drops it again
    values = (w[..., None] >> _shifts(bits, slots, w.device, torch.int32)) & ((1 << bits) - 1)
    return values.flatten(-2).movedim(-1, dim).to(torch.int32)


def pack_int32(values: torch.Tensor, bits: int, dim: int,
               slots: tuple[int, ...] | None = SEQUENTIAL) -> torch.Tensor:
    """unpack_int32's inverse: values in 0 .. 2^bits - 1, their count on dim a multiple of 32 / bits."""
    per = 32 // bits
    v = values.movedim(dim, -1).to(torch.int64)
    if v.shape[-1] % per:
        raise ValueError(f"{v.shape[-1]} values along dim {dim} do not fill whole words of {per}")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values outside 0..{(1 << bits) - 1}")
    v = v.unflatten(-1, (-1, per)) << _shifts(bits, slots, v.device)
    word = v.sum(dim=-1)
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)  # as a signed int32
    return word.to(torch.int32).movedim(-1, dim).contiguous()
