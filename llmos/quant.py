"""Carry GGUF weights into onnxruntime's MatMulNBits layout, exactly where the GGUF form allows it.

Every GGUF block type handled natively here stores a block of 32 weights as `d * q + m` with integer q
(Q4_0: m = -8d; Q8_0: m = 0; Q4_1: m free). MatMulNBits computes `scale * (u - z)` per block with the
default zero point z = 2**(bits-1). Writing u = q + off gives

    d*q + m = d*(u - z) + (m + d*(z - off))

so when m/d is an integer (Q4_0, Q8_0) a suitable `off` makes the last term vanish and the weights are
carried over bit for bit. For Q4_1, m/d is not an integer and no integer zero point can hold it (DESIGN
§2b: rounding it is badly wrong), so the last term stays as a per-block correction C[n, b]; the graph adds
`blocksum(x) @ C^T` to the MatMulNBits output. Nothing is re-rounded.

Types without a native path (F32, F16, BF16, K-quants, ...) are dequantized with the `gguf` package; for
int4/int8 precisions they are then quantized with round-to-nearest, which is lossy and reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

from llmos.errors import UnsupportedModelError
from llmos.gguf_file import TensorInfo

BLOCK = 32
NATIVE_BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}


@dataclass
class PackedMatrix:
    """W [N, K] (out, in) in MatMulNBits form: W[n, k] = scales[n, b] * (u[n, k] - z) + corr[n, b]."""

    n: int
    k: int
    bits: int
    packed: np.ndarray  # uint8 [N, K/32, 32*bits/8]
    scales: np.ndarray  # float32 [N, K/32]
    correction: np.ndarray | None  # float32 [N, K/32], or None when the form is exact without it
    exact: bool  # False when the source had to be re-rounded (RTN from float)


@dataclass
class AffineBlocks:
    """W[n, b*32 + j] = d[n, b] * q[n, b, j] + m[n, b], with integer q."""

    d: np.ndarray  # float32 [N, nb]
    m: np.ndarray  # float32 [N, nb]
    q: np.ndarray  # int16 [N, nb, 32]
    m_over_d: int | None  # the integer m/d of Q4_0 (-8) and Q8_0 (0); None when m is free (Q4_1)


def affine_blocks(t: TensorInfo) -> AffineBlocks | None:
    """Decode a Q4_0 / Q4_1 / Q8_0 matrix into its integer block form; None for other types."""
    n, k = t.shape
    nb = k // BLOCK
    raw = np.asarray(t.data, dtype=np.uint8).reshape(n, nb, -1)
    d = raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if t.qtype == Q.Q8_0:
        q = raw[:, :, 2:34].copy().view(np.int8).astype(np.int16)
        return AffineBlocks(d=d, m=np.zeros_like(d), q=q, m_over_d=0)
    if t.qtype in (Q.Q4_0, Q.Q4_1):
        start = 2 if t.qtype == Q.Q4_0 else 4
        qs = raw[:, :, start : start + 16]
        # element j < 16 is the low nibble of byte j; element j >= 16 the high nibble of byte j-16
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)
        if t.qtype == Q.Q4_0:
            return AffineBlocks(d=d, m=-8.0 * d, q=q, m_over_d=-8)
        m = raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        return AffineBlocks(d=d, m=m, q=q, m_over_d=None)
    return None


def dequantize(t: TensorInfo) -> np.ndarray:
    """The tensor as float32 in numpy order, for the fp32 graph and for non-native types."""
    try:
        w = quants.dequantize(np.asarray(t.data), t.qtype)
    except NotImplementedError as e:
        raise UnsupportedModelError(f"tensor {t.name}: type {t.qtype.name} cannot be dequantized") from e
    return np.ascontiguousarray(w.reshape(t.shape), dtype=np.float32)


def pack_matrix(t: TensorInfo, bits: int) -> PackedMatrix:
    """Pack a GGUF matrix for MatMulNBits with `bits` (4 or 8), exactly when the source allows."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    n, k = t.shape
    if k % BLOCK:
        raise UnsupportedModelError(f"tensor {t.name}: inner dimension {k} is not a multiple of {BLOCK}")
    blocks = affine_blocks(t)
    if blocks is not None and (bits >= NATIVE_BITS[t.qtype]):
        return _pack_affine(blocks, n, k, bits)
    return _pack_rtn(dequantize(t), bits)


def _pack_affine(b: AffineBlocks, n: int, k: int, bits: int) -> PackedMatrix:
    z = 1 << (bits - 1)
    qmin = int(b.q.min()) if b.q.size else 0
    integral = b.m_over_d is not None
    # An integer m/d (Q4_0: -8, Q8_0: 0) lets the offset absorb m: no correction term at all.
    qmax = int(b.q.max()) if b.q.size else 0
    # Otherwise centre q on z: the correction then stays as small as it can be. (Parking 4-bit values at
    # the bottom of an 8-bit range would make it ~128d, cancelling against the int8-rounded activations.)
    centred = z - (qmin + qmax + 1) // 2
    off = z + b.m_over_d if b.m_over_d is not None else centred
    u = b.q + off
    if u.size and (u.min() < 0 or u.max() >= (1 << bits)):
        off, integral = centred, False
        u = b.q + off
    u = u.astype(np.uint8)
    correction = None if integral else (b.m + b.d * float(z - off)).astype(np.float32)
    return PackedMatrix(
        n=n,
        k=k,
        bits=bits,
        packed=_pack_bits(u, bits),
        scales=b.d.astype(np.float32),
        correction=correction,
        exact=True,
    )


def _pack_rtn(w: np.ndarray, bits: int) -> PackedMatrix:
    """Round-to-nearest symmetric block quantization of float weights (lossy; only for float sources)."""
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    z = 1 << (bits - 1)
    amax = np.abs(blocks).max(axis=-1)
    d = (amax / (z - 1)).astype(np.float32)
    safe = np.where(d == 0, 1.0, d)
    u = np.clip(np.rint(blocks / safe[..., None]) + z, 0, (1 << bits) - 1).astype(np.uint8)
    return PackedMatrix(
        n=n, k=k, bits=bits, packed=_pack_bits(u, bits), scales=d, correction=None, exact=False
    )


def _pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """[N, nb, 32] values -> MatMulNBits bytes: for 4 bits, even k in the low nibble."""
    if bits == 8:
        return np.ascontiguousarray(u, dtype=np.uint8)
    return np.ascontiguousarray((u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8))


def unpack(p: PackedMatrix) -> np.ndarray:
    """Float32 W [N, K] from a packed matrix: the inverse used by tests and the fp32 check."""
    if p.bits == 4:
        u = np.empty((*p.packed.shape[:-1], BLOCK), dtype=np.float32)
        u[..., 0::2] = p.packed & 0x0F
        u[..., 1::2] = p.packed >> 4
    else:
        u = p.packed.astype(np.float32)
    w = p.scales[..., None] * (u - (1 << (p.bits - 1)))
    if p.correction is not None:
        w = w + p.correction[..., None]
    return w.reshape(p.n, p.k)
