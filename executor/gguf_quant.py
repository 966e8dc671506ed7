"""GGUF's quantized blocks as kernels/quantized.py's QuantizedWeight, value for value.

A GGUF tensor of a Q type is, per row, a run of fixed-size blocks (ggml's layouts, little-endian):

    type  elems bytes  layout                                      w =
    Q8_0   32    34    d:f16  qs:i8[32]                             d * qs
    Q4_0   32    18    d:f16  qs:u8[16] (low nibbles 0..15, high 16..31)   d * q - 8d
    Q4_1   32    20    d:f16  m:f16  qs:u8[16]                      d * q + m
    Q5_0   32    22    d:f16  qh:u32 (bit j: 5th bit of elem j)  qs  d * (q - 16)
    Q5_1   32    24    d:f16  m:f16  qh:u32  qs                     d * q + m
    Q4_K  256   144    d dmin:f16  scales:u8[12] (8 six-bit sc, m)  qs:u8[128]
                       (per 64 elems: 32 bytes, low nibbles sub-block 2c, high 2c+1)
                                                                    d*sc_j * q - dmin*m_j
    Q5_K  256   176    as Q4_K, with qh:u8[32] before qs (bit j of qh[l]: 5th bit of elem 32j+l)
    Q6_K  256   210    ql:u8[128] qh:u8[64] sc:i8[16] d:f16         d*sc_j * (q - 32)

Each becomes codes q, one per element, with the scale and offset of its group (32 elements, 16
for Q6_K's sub-blocks), so `dequantize()` gives exactly what `gguf.quants.dequantize` gives: every
f16 scale times a small integer is exact in float32, and the one rounding (of scale * q + offset)
happens in the same order on both sides. All work is vectorised over blocks (an LM head has
millions of them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType

from pagedserve.kernels.quantized import QuantizedWeight


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] little-endian f16 bytes -> [...] float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n]: the n low nibbles, then the n high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes of a little-endian u32 -> [..., 32] bits, bit j of the u32 at j."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _weight(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, group: int,
            bits: int) -> QuantizedWeight:
    """Per-block arrays [rows, blocks, ...] -> the [rows, in] form."""
    rows = codes.shape[0]
    # A copy where it is still a view of the file (read-only, mapped): the weight owns its data.
    flat = [None if a is None else torch.from_numpy(np.require(a.reshape(rows, -1), None, "CW"))
            for a in (codes, scale, offset)]
    return QuantizedWeight(*flat, group, bits)


def _q8_0(b: np.ndarray) -> QuantizedWeight:
    d, qs = _f16(b[..., :2]), b[..., 2:].view(np.int8)
    return _weight(qs, d, None, 32, 8)


def _q4_0(b: np.ndarray) -> QuantizedWeight:
    d = _f16(b[..., :2])
    return _weight(_nibbles(b[..., 2:]), d, -8 * d, 32, 4)


def _q4_1(b: np.ndarray) -> QuantizedWeight:
    return _weight(_nibbles(b[..., 4:]), _f16(b[..., :2]), _f16(b[..., 2:4]), 32, 4)


def _q5_0(b: np.ndarray) -> QuantizedWeight:
    q = _nibbles(b[..., 6:]) | (_fifth_bits(b[..., 2:6]) << 4)
    return _weight(q.astype(np.int8) - 16, _f16(b[..., :2]), None, 32, 8)


def _q5_1(b: np.ndarray) -> QuantizedWeight:
    q = _nibbles(b[..., 8:]) | (_fifth_bits(b[..., 4:8]) << 4)
    return _weight(q.astype(np.int8), _f16(b[..., :2]), _f16(b[..., 2:4]), 32, 8)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins. Bytes 0-3 hold scales 0-3 and
    bytes 4-7 mins 0-3 in their low 6 bits; bytes 8-11 hold the low 4 bits of scale (low nibble)
    and min (high nibble) 4-7, whose top 2 bits are the spare top bits of bytes 0-3 and 4-7."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b: np.ndarray) -> QuantizedWeight:
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales_mins(b[..., 4:16])
    q = _nibbles(b[..., 16:].reshape(*b.shape[:-1], 4, 32))  # [.., 4 chunks, 64]
    return _weight(q, d[..., None] * sc, -(dmin[..., None] * mn), 32, 4)


def _q5_k(b: np.ndarray) -> QuantizedWeight:
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales_mins(b[..., 4:16])
    low = _nibbles(b[..., 48:].reshape(*b.shape[:-1], 4, 32)).reshape(*b.shape[:-1], 8, 32)
    fifth = (b[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [.., 8, 32]
    q = (low | (fifth << 4)).astype(np.int8)
    return _weight(q, d[..., None] * sc, -(dmin[..., None] * mn), 32, 8)


def _q6_k(b: np.ndarray) -> QuantizedWeight:
    """Per 128-element half h: elements l, l+32 take the low nibbles of ql[h][l], ql[h][l+32],
    l+64, l+96 their high nibbles; their top 2 bits are qh[h][l]'s bit pairs 0, 1, 2, 3."""
    lead = b.shape[:-1]
    ql = b[..., :128].reshape(*lead, 2, 64)
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
    low = _nibbles(ql)  # [.., 2, 128]
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [.., 2, 4, 32]
    q = (low | (high.reshape(*lead, 2, 128) << 4)).astype(np.int8) - 32
    scale = _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
    return _weight(q, scale, None, 16, 8)


CONVERTERS: dict[QType, Callable[[np.ndarray], QuantizedWeight]] = {
    QType.Q8_0: _q8_0, QType.Q4_0: _q4_0, QType.Q4_1: _q4_1, QType.Q5_0: _q5_0,
    QType.Q5_1: _q5_1, QType.Q4_K: _q4_k, QType.Q5_K: _q5_k, QType.Q6_K: _q6_k,
}
# (bits, group) of each type's QuantizedWeight
FORMS = {QType.Q8_0: (8, 32), QType.Q4_0: (4, 32), QType.Q4_1: (4, 32), QType.Q5_0: (8, 32),
         QType.Q5_1: (8, 32), QType.Q4_K: (4, 32), QType.Q5_K: (8, 32), QType.Q6_K: (8, 16)}


def common_form(qtypes: Iterable[QType]) -> tuple[int, int]:
    """The (bits, group) that holds every one of these types exactly: the widest codes, the
    finest groups. Projections fused into one layer (q, k, v; gate, up) pack as one weight, and
    llama.cpp's mixes (Q4_K_M: Q6_K for some v and down projections) differ within a layer."""
    forms = [FORMS[t] for t in qtypes]
    return max(b for b, _ in forms), math.gcd(*(g for _, g in forms))


def widen(qw: QuantizedWeight, bits: int, group: int) -> QuantizedWeight:
    """The same values in a form with as many or more bits and a group dividing qw's: 4-bit codes
    0..15 are also int8 codes, and a group's scale repeats over its finer groups."""
    if bits < qw.bits or qw.group % group:
        raise ValueError(f"cannot widen {qw.bits} bits, group {qw.group} to {bits}, {group}")
    if (bits, group) == (qw.bits, qw.group):
        return qw
    repeat = qw.group // group
    offset = None if qw.offset is None else qw.offset.repeat_interleave(repeat, dim=1)
    return replace(qw, q=qw.q.to(torch.int8) if bits != qw.bits else qw.q,
                   scale=qw.scale.repeat_interleave(repeat, dim=1), offset=offset, group=group,
                   bits=bits)


def gguf_quantized(raw: np.ndarray, qtype: QType, rows: int, cols: int) -> QuantizedWeight:
    """A GGUF tensor's raw bytes (any shape holding rows x blocks-of-a-row, as GGUFReader gives a
    quantized tensor's `data`) for a [rows, cols] weight of type qtype, as a QuantizedWeight."""
    if qtype not in CONVERTERS:
        raise ValueError(f"{qtype.name} is not run quantized; types that are: "
                         f"{', '.join(t.name for t in CONVERTERS)}")
    block, size = GGML_QUANT_SIZES[qtype]
    if cols % block or raw.size != rows * cols // block * size:
        raise ValueError(f"{qtype.name}: {raw.size} bytes do not hold a [{rows}, {cols}] weight")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // block, size)
    return CONVERTERS[qtype](blocks)
