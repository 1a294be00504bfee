"""Int8 compression of a parked session's KV cache, so a swapped-out session costs ~1/3.6 of its fp32 size.

Swapping a cold session to disk and reading it back must be much cheaper than re-running its prefill, and
the attention it feeds must barely change. Keys and values are quantised differently (as in KIVI): keys
have a few outlier channels that would swamp a per-token scale, so they get one scale per channel per
16-token chunk; values have no such channels and get one scale per token per head, over head_dim. Both
are symmetric absmax int8. Everything is whole-array numpy (no Python loop over layers or tokens).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

CHUNK = 16  # tokens per key scale group
PARALLEL_BYTES = 8 << 20  # decompress on several threads from this output size up
_QMAX = 127.0  # symmetric: -128 is never used, so q and -q are always both representable
_F16 = np.finfo(np.float16)
_F32_TINY = np.finfo(np.float32).tiny
_SCALE_DTYPES = ("float16", "float32")
_DTYPES = {"k_q": ("int8",), "k_scale": _SCALE_DTYPES, "v_q": ("int8",), "v_scale": _SCALE_DTYPES}


def array_shapes(length: int, n_layer: int, n_kv: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the CompressedKV arrays, in serialisation order (what a swap file must contain)."""
    lead = (n_layer, n_kv)
    return {
        "k_q": (*lead, length, head_dim),
        "k_scale": (*lead, -(-length // CHUNK), head_dim),
        "v_q": (*lead, length, head_dim),
        "v_scale": (*lead, length),
    }


@dataclass
class CompressedKV:
    """One session's KV as int8 plus scales. The key padding to a whole chunk is implied, never stored."""

    length: int  # L, valid token positions
    n_layer: int
    n_kv: int
    head_dim: int
    k_q: np.ndarray  # int8 [n_layer, n_kv, L, head_dim]
    k_scale: np.ndarray  # float16 or float32 [n_layer, n_kv, n_chunks, head_dim]
    v_q: np.ndarray  # int8 [n_layer, n_kv, L, head_dim]
    v_scale: np.ndarray  # float16 or float32 [n_layer, n_kv, L]

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays in their fixed serialisation order."""
        return {"k_q": self.k_q, "k_scale": self.k_scale, "v_q": self.v_q, "v_scale": self.v_scale}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return array_shapes(self.length, self.n_layer, self.n_kv, self.head_dim)

    def check(self) -> None:
        """Raise ValueError if the arrays do not match the declared sizes (e.g. a tampered swap header)."""
        if min(self.length, self.n_layer, self.n_kv, self.head_dim) < 1:
            raise ValueError("compressed KV sizes must all be positive")
        for name, shape in self.expected_shapes().items():
            arr = self.arrays()[name]
            if arr.shape != shape or arr.dtype.name not in _DTYPES[name]:
                raise ValueError(
                    f"{name} is {arr.dtype}{list(arr.shape)}, expected {_DTYPES[name]}{list(shape)}"
                )

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


def _chunked(a: np.ndarray) -> list[np.ndarray]:
    """Views of [..., L, hd] as [..., n, CHUNK, hd] (whole chunks) and [..., 1, rest, hd] (the tail).

    Handling the tail as its own short chunk is the same as zero padding (zeros never raise an absmax)
    without copying the keys into a padded buffer. Splitting an axis is always a view, so writes land.
    """
    n_pos, hd = a.shape[-2:]
    full = n_pos // CHUNK * CHUNK
    parts = []
    if full:
        parts.append(a[..., :full, :].reshape(*a.shape[:-2], full // CHUNK, CHUNK, hd))
    if n_pos > full:
        parts.append(a[..., full:, :][..., None, :, :])
    return parts


def _absmax(x: np.ndarray, axis: int) -> np.ndarray:
    """max(|x|) over a short axis (16 tokens or head_dim), by folding halves with np.maximum.

    numpy's max over a short axis runs one tiny inner loop per group (~5x slower here); folding halves is
    a few whole-array elementwise passes. NaN propagates through np.maximum, so it is still found later.
    """
    m = np.moveaxis(np.abs(x), axis, 0)  # np.abs makes a scratch copy we may overwrite
    width = m.shape[0]
    while width > 1:
        half = width // 2
        np.maximum(m[:half], m[width - half : width], out=m[:half])  # an odd middle row stays for later
        width -= half
    return m[0].copy()


def _scales(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stored scale, float32 reciprocal used to quantise). Zero groups get scale 0 and reciprocal 0."""
    scale = absmax / np.float32(_QMAX)
    nonzero = scale[scale > 0]
    # float16 halves the scale bytes, but only when every scale is a normal float16 (no underflow/inf).
    if nonzero.size == 0 or (nonzero.min() >= _F16.tiny and nonzero.max() <= _F16.max):
        scale = scale.astype(np.float16)
    # Quantise with the scale exactly as stored, so rounding it to float16 cannot push |q| past 127.
    used = scale.astype(np.float32)
    inv = np.zeros_like(used)
    # A subnormal scale's reciprocal overflows to inf; such groups (|x| < 1e-35) just quantise to 0.
    np.divide(np.float32(1.0), used, out=inv, where=used >= _F32_TINY)
    return scale, inv


def _quantize(x: np.ndarray, inv: np.ndarray, out: np.ndarray) -> None:
    tmp = x * inv
    np.rint(tmp, out=tmp)
    np.clip(tmp, -_QMAX, _QMAX, out=tmp)  # cheap insurance against int8 wrap-around
    out[...] = tmp


def compress(kv: np.ndarray) -> CompressedKV:
    """Compress float32 KV [n_layer, 2, n_kv, L, head_dim] (axis 1: 0 = keys, 1 = values)."""
    if not isinstance(kv, np.ndarray) or kv.ndim != 5 or kv.shape[1] != 2:
        raise ValueError(
            f"KV must be an array [n_layer, 2, n_kv, L, head_dim], got {getattr(kv, 'shape', type(kv))}"
        )
    if kv.dtype != np.float32:
        raise ValueError(f"KV must be float32, got {kv.dtype}")
    if kv.size == 0:
        raise ValueError(f"KV of shape {kv.shape} holds no positions")
    n_layer, _, n_kv, length, head_dim = kv.shape
    keys, values = kv[:, 0], kv[:, 1]

    k_parts = _chunked(keys)
    k_absmax = np.concatenate([_absmax(p, axis=-2) for p in k_parts], axis=-2)  # [nl, nkv, n_chunks, hd]
    v_absmax = _absmax(values, axis=-1)  # [nl, nkv, L]
    # Every element is under some absmax, so checking the (small) absmax arrays finds any NaN or inf.
    if not (np.isfinite(k_absmax).all() and np.isfinite(v_absmax).all()):
        raise ValueError("KV contains NaN or infinite values")

    k_scale, k_inv = _scales(k_absmax)
    k_q = np.empty(keys.shape, np.int8)
    first = 0
    for part, q in zip(k_parts, _chunked(k_q), strict=True):
        n = part.shape[-3]
        _quantize(part, k_inv[..., first : first + n, None, :], q)
        first += n

    v_scale, v_inv = _scales(v_absmax)
    v_q = np.empty(values.shape, np.int8)
    _quantize(values, v_inv[..., None], v_q)
    return CompressedKV(length, n_layer, n_kv, head_dim, k_q, k_scale, v_q, v_scale)


def decompress(c: CompressedKV, out: np.ndarray | None = None) -> np.ndarray:
    """Float32 KV [n_layer, 2, n_kv, L, head_dim] from a CompressedKV: a fresh array, or written into
    `out` (any float32 view of that shape, e.g. a KV slot in the engine's pool: no extra copy)."""
    c.check()
    shape = (c.n_layer, 2, c.n_kv, c.length, c.head_dim)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"cannot decompress KV of shape {shape} into a {out.dtype} array of {out.shape}")
    k_scale = c.k_scale.astype(np.float32, copy=False)
    v_scale = c.v_scale.astype(np.float32, copy=False)

    def layers(lo: int, hi: int) -> None:
        first = 0
        for q, dst in zip(_chunked(c.k_q[lo:hi]), _chunked(out[lo:hi, 0]), strict=True):
            n = q.shape[-3]
            np.multiply(q, k_scale[lo:hi, :, first : first + n, None, :], out=dst)
            first += n
        np.multiply(c.v_q[lo:hi], v_scale[lo:hi, ..., None], out=out[lo:hi, 1])

    # numpy releases the GIL in these loops: on a restore the engine's threads are idle, so split the
    # layers over the cores (about 2x on two cores for a 1k-token context)
    workers = min(len(os.sched_getaffinity(0)), c.n_layer, 4) if out.nbytes >= PARALLEL_BYTES else 1
    if workers == 1:
        layers(0, c.n_layer)
        return out
    bounds = [c.n_layer * i // workers for i in range(workers + 1)]
    list(_pool(workers).map(layers, bounds[:-1], bounds[1:]))
    return out


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="llmos-kv")
