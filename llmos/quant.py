"""Carry GGUF weights into onnxruntime's MatMulNBits layout exactly: every common type, nothing re-rounded.

Every common GGUF weight type is, block by block, an integer times a scale plus an offset:

    w[n, b*B + j] = s[n, b] * q[n, b, j] + o[n, b]      (B = 16 or 32 weights per block)

| type | B | q | s | o |
|---|---|---|---|---|
| Q4_0 | 32 | nibble - 8 | d | 0 |
| Q4_1 | 32 | nibble | d | m |
| Q5_0 | 32 | 5 bits - 16 | d | 0 |
| Q5_1 | 32 | 5 bits | d | m |
| Q8_0 | 32 | int8 | d | 0 |
| Q2_K | 16 | 2 bits | d * sc (4-bit) | -dmin * m (4-bit) |
| Q3_K | 16 | 3 bits - 4 | d * (sc - 32) (6-bit) | 0 |
| Q4_K | 32 | nibble | d * sc (6-bit) | -dmin * m (6-bit) |
| Q5_K | 32 | 5 bits | d * sc | -dmin * m |
| Q6_K | 16 | 6 bits - 32 | d * sc (int8) | 0 |
| IQ4_NL | 32 | codebook[nibble] (int8 values) | d | 0 |
| IQ4_XS | 32 | codebook[nibble] | d * (sc - 32) (6-bit) | 0 |

The scales are an fp16 times an integer of at most 8 bits, so they are exact in float32. MatMulNBits
computes `s * (u - z)` per block with the default zero point z = 2**(bits-1); storing u = q + off in a
container of `bits` (4 when q spans at most 16 values, else 8) gives

    s*q + o = s*(u - z) + (o + s*(z - off))

When o = 0 and off = z, the last term vanishes and the weights are carried bit for bit. Otherwise (Q4_1,
Q5_1 and the K-quants with mins: o/s is not an integer, so no integer zero point can hold it) it stays as
a per-block correction C[n, b]; the graph adds `blocksum(x) @ C^T` to the MatMulNBits output. Nothing is
re-rounded: re-rounding Q4_K to plain int4 added more error (0.097 relative RMSE) than Q4_K's own (0.071).

Float types (F32, F16, BF16) have no integer form: they are quantized with round-to-nearest only when an
integer precision is asked for, which is lossy and reported as such (`exact` False). Other types (IQ1,
IQ2, IQ3, TQ, MXFP4, ...) are refused by name at integer precisions; fp32 dequantizes them with `gguf`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as Q

from llmos.errors import UnsupportedModelError
from llmos.gguf_file import TensorInfo

QK_K = 256
# Weights decoded at a time: decoding holds a few int16/uint8 copies of what it decodes, so a 100M-weight
# embedding table is done in slices instead of needing ~1 GB of scratch at once.
CHUNK_WEIGHTS = 8 << 20
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int16)


@dataclass
class IntBlocks:
    """W[n, b*B + j] = s[n, b] * q[n, b, j] + o[n, b] with integer q in [qmin, qmax] (the type's range)."""

    s: np.ndarray  # float32 [N, nb]
    q: np.ndarray  # int16 [N, nb, B]
    o: np.ndarray | None  # float32 [N, nb]; None when the type has no offset
    qmin: int
    qmax: int

    @property
    def block(self) -> int:
        return int(self.q.shape[-1])

    @property
    def bits(self) -> int:
        """The smallest MatMulNBits container that holds every q of this type."""
        return 4 if self.qmax - self.qmin < 16 else 8


@dataclass
class PackedMatrix:
    """W [N, K] in MatMulNBits form: W[n, k] = scales[n, b] * (u[n, k] - z) + correction[n, b]."""

    n: int
    k: int
    bits: int
    block: int  # weights per block (16 or 32)
    packed: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # float32 [N, K/block]
    correction: np.ndarray | None  # float32 [N, K/block], or None when the form is exact without it
    exact: bool  # False when the source had to be re-rounded (RTN from float)


def _f16(raw: np.ndarray) -> np.ndarray:
    """float32 of little-endian fp16 bytes [..., 2]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: element j < 16 is the low nibble of byte j, j >= 16 the high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)


def _bits_le(raw: np.ndarray, n: int) -> np.ndarray:
    """[..., n/8] bytes -> [..., n] bits, least significant bit of byte 0 first."""
    return np.unpackbits(raw, axis=-1, bitorder="little")[..., :n].astype(np.int16)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> two [..., 8] integer arrays."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _per_sub(x: np.ndarray, subs: int) -> np.ndarray:
    """A per-super-block value [N, nsb] repeated for each of its `subs` sub-blocks: [N, nsb*subs]."""
    return np.repeat(x, subs, axis=-1)


def int_blocks(t: TensorInfo) -> IntBlocks | None:
    """Decode a matrix into its integer block form; None for types that have none (floats, IQ2, ...)."""
    n, k = t.shape
    raw = np.asarray(t.data, dtype=np.uint8)
    qt = t.qtype
    if qt in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL):
        r = raw.reshape(n, k // 32, -1)
        d = _f16(r[..., 0:2])
        if qt == Q.Q8_0:
            return IntBlocks(d, r[..., 2:34].view(np.int8).astype(np.int16), None, -128, 127)
        if qt == Q.Q4_0:
            return IntBlocks(d, _nibbles(r[..., 2:18]) - 8, None, -8, 7)
        if qt == Q.IQ4_NL:
            return IntBlocks(d, IQ4_VALUES[_nibbles(r[..., 2:18])], None, -127, 113)
        if qt == Q.Q4_1:
            return IntBlocks(d, _nibbles(r[..., 4:20]), _f16(r[..., 2:4]), 0, 15)
        start = 2 if qt == Q.Q5_0 else 4
        q = _nibbles(r[..., start + 4 : start + 20]) | (_bits_le(r[..., start : start + 4], 32) << 4)
        if qt == Q.Q5_0:
            return IntBlocks(d, q - 16, None, -16, 15)
        return IntBlocks(d, q, _f16(r[..., 2:4]), 0, 31)
    if qt not in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS):
        return None
    r = raw.reshape(n, k // QK_K, -1)  # super-blocks of 256
    nsb = k // QK_K
    if qt in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(r[..., 0:2]), _f16(r[..., 2:4])
        sc, mn = _k_scale_min(r[..., 4:16])
        s = (d[..., None] * sc).reshape(n, nsb * 8)
        o = (-(dmin[..., None] * mn)).reshape(n, nsb * 8)
        if qt == Q.Q4_K:  # 4 groups of 32 bytes: low nibbles are sub-block 2g, high ones 2g+1
            qs = r[..., 16:144].reshape(n, nsb, 4, 32)
            q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nsb * 8, 32).astype(np.int16)
            return IntBlocks(s, q, o, 0, 15)
        qh = r[..., 16:48]  # bit i of byte j: the 5th bit of element j of sub-block i
        qs = r[..., 48:176].reshape(n, nsb, 4, 32)
        low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nsb, 8, 32).astype(np.int16)
        high = ((qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1).astype(np.int16)
        return IntBlocks(s, (low | (high << 4)).reshape(n, nsb * 8, 32), o, 0, 31)
    if qt == Q.Q6_K:
        ql, qh = r[..., 0:128], r[..., 128:192]
        sc = r[..., 192:208].view(np.int8).astype(np.float32)
        d = _f16(r[..., 208:210])
        # two halves of 128 elements; in each, ql's 64 bytes hold elements l (low nibble) and l+64 (high),
        # and qh's 32 bytes hold bits 4-5 of elements l, l+32, l+64, l+96
        ql = ql.reshape(n, nsb, 2, 64)
        qh = qh.reshape(n, nsb, 2, 32)
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1).astype(np.int16)  # [.., 2, 128]
        high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1).astype(np.int16)
        q = (low | (high << 4)) - 32
        return IntBlocks((d[..., None] * sc).reshape(n, nsb * 16), q.reshape(n, nsb * 16, 16), None, -32, 31)
    if qt == Q.Q3_K:
        hmask, qs, scales = r[..., 0:32], r[..., 32:96], r[..., 96:108]
        d = _f16(r[..., 108:110])
        lo, hi = scales[..., 0:8], scales[..., 8:12]
        lsc = np.concatenate([lo & 0x0F, lo >> 4], axis=-1)  # [.., 16]
        hsc = np.concatenate([(hi >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
        sc = ((lsc | (hsc << 4)).astype(np.int16) - 32).astype(np.float32)
        # two halves of 128: qs's 32 bytes per half give 2 bits of elements l, l+32, l+64, l+96 (shift 0,
        # 2, 4, 6); hmask bit (4*half + shift/2) of byte l (l < 32) is the element's high bit, subtracting
        # 4 when it is 0
        qs = qs.reshape(n, nsb, 2, 32)
        low = np.stack([(qs >> s) & 3 for s in (0, 2, 4, 6)], axis=3).reshape(n, nsb, 256).astype(np.int16)
        hbits = (hmask[..., None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1
        high = hbits.reshape(n, nsb, 256).astype(np.int16)
        q = low - 4 * (1 - high)
        return IntBlocks((d[..., None] * sc).reshape(n, nsb * 16), q.reshape(n, nsb * 16, 16), None, -4, 3)
    if qt == Q.Q2_K:
        scales, qs = r[..., 0:16], r[..., 16:80]
        d, dmin = _f16(r[..., 80:82]), _f16(r[..., 82:84])
        s = (d[..., None] * (scales & 0x0F).astype(np.float32)).reshape(n, nsb * 16)
        o = (-(dmin[..., None] * (scales >> 4).astype(np.float32))).reshape(n, nsb * 16)
        qs = qs.reshape(n, nsb, 2, 32)  # per half of 128: 2 bits of elements l, l+32, l+64, l+96
        q = np.stack([(qs >> s) & 3 for s in (0, 2, 4, 6)], axis=3).reshape(n, nsb * 16, 16).astype(np.int16)
        return IntBlocks(s, q, o, 0, 3)
    # IQ4_XS: d, 2 bytes of high scale bits, 4 bytes of low scale nibbles, 128 bytes of codebook nibbles
    d = _f16(r[..., 0:2])
    sh = r[..., 2:4].copy().view(np.uint16)[..., 0]
    sl = r[..., 4:8]
    low = np.stack([sl & 0x0F, sl >> 4], axis=-1).reshape(n, nsb, 8).astype(np.int16)
    high = ((sh[..., None] >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.int16)
    sc = ((low | (high << 4)) - 32).astype(np.float32)
    q = IQ4_VALUES[_nibbles(r[..., 8:136].reshape(n, nsb, 8, 16))]
    return IntBlocks((d[..., None] * sc).reshape(n, nsb * 8), q.reshape(n, nsb * 8, 32), None, -127, 113)


def dequantize(t: TensorInfo) -> np.ndarray:
    """The tensor as float32 in numpy order, for the fp32 graph and for float sources."""
    try:
        w = quants.dequantize(np.asarray(t.data), t.qtype)
    except NotImplementedError as e:
        raise UnsupportedModelError(f"tensor {t.name}: type {t.qtype.name} cannot be dequantized") from e
    return np.ascontiguousarray(w.reshape(t.shape), dtype=np.float32)


def dequantize_rows(qtype: Q, raw: np.ndarray) -> np.ndarray:
    """float32 [n, K] of n GGUF rows of type `qtype`, their bytes `raw` [n, row_bytes] (embedding lookups
    of a few rows from a table kept in its GGUF bytes). Integer types go through the same block form as
    import, s * q + o, which equals what `gguf` dequantizes value for value; other types through `gguf`."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n, row_bytes = raw.shape
    block, size = GGML_QUANT_SIZES[qtype]
    if row_bytes % size:
        raise ValueError(f"{qtype.name} rows of {row_bytes} bytes are not whole blocks of {size}")
    t = TensorInfo("rows", qtype, (n, row_bytes // size * block), raw)
    b = int_blocks(t) if qtype not in FLOAT_TYPES else None
    if b is None:
        return dequantize(t)
    w = b.s[..., None] * b.q.astype(np.float32)
    if b.o is not None:
        w += b.o[..., None]
    return w.reshape(t.shape)


def source_bits(t: TensorInfo) -> int:
    """The container a tensor needs to be carried exactly: 4 or 8 (float sources: 4, re-rounded)."""
    if t.qtype in FLOAT_TYPES:
        return 4
    blocks = _block_form_or_refuse(t)
    return blocks.bits


def _block_form_or_refuse(t: TensorInfo) -> IntBlocks:
    k = t.shape[1]
    if k % 32 or (t.qtype not in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL) and k % QK_K):
        raise UnsupportedModelError(
            f"tensor {t.name}: inner dimension {k} does not fit {t.qtype.name}'s blocks"
        )
    blocks = int_blocks(t)
    if blocks is None:
        raise UnsupportedModelError(
            f"tensor {t.name}: weight type {t.qtype.name} has no exact integer form in llmos "
            "(supported: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, IQ4_NL, IQ4_XS, F16, BF16, F32); "
            "import with --precision fp32 to dequantize it"
        )
    return blocks


def pack_matrix(t: TensorInfo, bits: int, block: int | None = None) -> PackedMatrix:
    """Pack a GGUF matrix for MatMulNBits in a container of at least `bits` (4 or 8), exactly when the
    source is integer. `block` (16) splits 32-weight blocks so matrices of two types can share a form."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    rows = max(1, CHUNK_WEIGHTS // max(1, t.shape[1]))
    if t.shape[0] > rows:  # a big matrix (the embedding table) in slices of rows: bounded scratch memory
        return _stack_rows(
            [pack_matrix(_row_slice(t, i, i + rows), bits, block) for i in range(0, t.shape[0], rows)]
        )
    if t.qtype in FLOAT_TYPES:
        if t.shape[1] % 32:
            raise UnsupportedModelError(
                f"tensor {t.name}: inner dimension {t.shape[1]} is not a multiple of 32"
            )
        return _pack_rtn(dequantize(t), bits, block or 32)
    b = _block_form_or_refuse(t)
    if block is not None and block < b.block:
        b = _split(b, block)
    return _pack_int(b, t.shape[0], t.shape[1], max(bits, b.bits))


def _row_slice(t: TensorInfo, start: int, stop: int) -> TensorInfo:
    data = np.asarray(t.data)
    stop = min(stop, t.shape[0])
    return TensorInfo(t.name, t.qtype, (stop - start, t.shape[1]), data.reshape(t.shape[0], -1)[start:stop])


def _stack_rows(parts: list[PackedMatrix]) -> PackedMatrix:
    first = parts[0]
    return PackedMatrix(
        n=sum(p.n for p in parts),
        k=first.k,
        bits=first.bits,
        block=first.block,
        packed=np.concatenate([p.packed for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        correction=None if first.correction is None else np.concatenate([p.correction for p in parts]),  # type: ignore[misc]
        exact=all(p.exact for p in parts),
    )


def _split(b: IntBlocks, block: int) -> IntBlocks:
    """The same weights in smaller blocks (each sub-block keeps its block's scale and offset)."""
    r = b.block // block
    n, nb, _ = b.q.shape
    return IntBlocks(
        np.repeat(b.s, r, axis=-1),
        b.q.reshape(n, nb * r, block),
        None if b.o is None else np.repeat(b.o, r, axis=-1),
        b.qmin,
        b.qmax,
    )


def _pack_int(b: IntBlocks, n: int, k: int, bits: int) -> PackedMatrix:
    z = 1 << (bits - 1)
    # No offset and a range the container holds around z: u - z = q, the weights carried bit for bit, no
    # correction. Otherwise centre the type's range on z, so the correction stays as small as it can be
    # (parking 4-bit values at the bottom of an 8-bit range would make it ~128 s, cancelling against the
    # int8-rounded activations of accuracy level 4).
    plain = b.o is None and b.qmin >= -z and b.qmax < z
    off = z if plain else z - (b.qmin + b.qmax + 1) // 2
    u = (b.q + off).astype(np.uint8)
    o = b.o if b.o is not None else np.zeros_like(b.s)
    correction = None if plain else (o + b.s * float(z - off)).astype(np.float32)
    return PackedMatrix(
        n=n,
        k=k,
        bits=bits,
        block=b.block,
        packed=_pack_bits(u, bits),
        scales=np.ascontiguousarray(b.s, dtype=np.float32),
        correction=correction,
        exact=True,
    )


def _pack_rtn(w: np.ndarray, bits: int, block: int) -> PackedMatrix:
    """Round-to-nearest symmetric block quantization of float weights (lossy; only for float sources)."""
    n, k = w.shape
    blocks = w.reshape(n, k // block, block)
    z = 1 << (bits - 1)
    amax = np.abs(blocks).max(axis=-1)
    d = (amax / (z - 1)).astype(np.float32)
    safe = np.where(d == 0, 1.0, d)
    u = np.clip(np.rint(blocks / safe[..., None]) + z, 0, (1 << bits) - 1).astype(np.uint8)
    return PackedMatrix(
        n=n, k=k, bits=bits, block=block, packed=_pack_bits(u, bits), scales=d, correction=None, exact=False
    )


def _pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """[N, nb, B] values -> MatMulNBits bytes: for 4 bits, even k in the low nibble."""
    if bits == 8:
        return np.ascontiguousarray(u, dtype=np.uint8)
    return np.ascontiguousarray((u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8))


def unpack(p: PackedMatrix) -> np.ndarray:
    """Float32 W [N, K] from a packed matrix: the inverse used by tests and the fp32 check."""
    if p.bits == 4:
        u = np.empty((*p.packed.shape[:-1], p.block), dtype=np.float32)
        u[..., 0::2] = p.packed & 0x0F
        u[..., 1::2] = p.packed >> 4
    else:
        u = p.packed.astype(np.float32)
    w = p.scales[..., None] * (u - (1 << (p.bits - 1)))
    if p.correction is not None:
        w = w + p.correction[..., None]
    return w.reshape(p.n, p.k)
