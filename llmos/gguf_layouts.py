"""GGUF weight rows regrouped for llmos's native ops (llmos/native/*.cc), one layout per weight type.

The native ops read a GGUF type's own blocks, the same bytes per block, moved so that one vector load
feeds 16 rows at once ("x16": rows 16g..16g+15 form group g, stored block by block). Nothing is
re-rounded, so a matrix on a native op holds exactly the file's values, and the model on disk is the
size of the GGUF's weights. Each layout names its op (domain `llmos.gguf`) and the function that
regroups `[N, K/QK*BLK]` GGUF rows (N a multiple of 16) into `[N, K/QK*BLK]` x16 bytes.

A type without a layout here, or a matrix whose rows do not come in groups of 16, goes to onnxruntime's
MatMulNBits (llmos/quant.py) instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType as T


@dataclass(frozen=True)
class X16Layout:
    op: str  # op name in domain llmos.gguf
    qk: int  # weights per block of one row
    blk: int  # bytes per block of one row (as in the GGUF)
    regroup: Callable[[np.ndarray], np.ndarray]  # GGUF rows [N, K/qk*blk] -> x16 bytes, same shape
    ungroup: Callable[[np.ndarray], np.ndarray]  # its inverse, on whole groups (16k rows)


def _groups(rows: np.ndarray, blk: int, name: str) -> np.ndarray:
    """rows [N, nb*blk] as [N/16, 16, nb, blk], checked."""
    n, row_bytes = rows.shape
    if n % 16 or row_bytes % blk:
        raise ValueError(f"{name} x16 needs N % 16 == 0 and whole blocks, not [{n}, {row_bytes}]")
    return np.asarray(rows, dtype=np.uint8).reshape(n // 16, 16, row_bytes // blk, blk)


def q4_0_x16(rows: np.ndarray) -> np.ndarray:
    """Q4_0 (18 bytes per 32 weights: fp16 d, 16 nibble bytes). Per group and block: the 16 rows' fp16
    scales (32 bytes), then four 64-byte chunks where bytes 4r..4r+3 of chunk c are the quant bytes
    4c..4c+3 of row r."""
    r = _groups(rows, 18, "Q4_0")
    g, _, nb, _ = r.shape
    scales = r[..., :2].transpose(0, 2, 1, 3).reshape(g, nb, 32)
    quants = r[..., 2:].reshape(g, 16, nb, 4, 4).transpose(0, 2, 3, 1, 4).reshape(g, nb, 256)
    return np.ascontiguousarray(np.concatenate([scales, quants], axis=2).reshape(rows.shape))


def q4_0_ungroup(x16: np.ndarray) -> np.ndarray:
    r = _groups(x16, 18, "Q4_0")
    g, _, nb, _ = r.shape
    flat = r.reshape(g, nb, 288)
    scales = flat[..., :32].reshape(g, nb, 16, 2).transpose(0, 2, 1, 3)
    quants = flat[..., 32:].reshape(g, nb, 4, 16, 4).transpose(0, 3, 1, 2, 4).reshape(g, 16, nb, 16)
    return np.ascontiguousarray(np.concatenate([scales, quants], axis=3).reshape(x16.shape))


# -- K-quants: 256 weights per super-block --------------------------------------------------------------
# Both keep each 16-row group's super-block together (16*BLK bytes), its per-row header fields first
# (field by field, 16 rows each), then 64-byte chunks: bytes 4r..4r+3 of a chunk are 4 consecutive quant
# bytes of row r, so one 512-bit load feeds 16 rows x 4 weights to dpbusd (two 256-bit loads, rows 0-7
# and 8-15, on AVX2).


def _k_x16(rows: np.ndarray, blk: int, head: list[int], chunk_order: np.ndarray, name: str) -> np.ndarray:
    """Regroup super-blocks: header fields of `head` widths (bytes, in GGUF order) row-interleaved field
    by field; then the quant bytes [sum(head), blk) in 4-byte chunks, chunks taken in `chunk_order`."""
    r = _groups(rows, blk, name)
    g, _, nb, _ = r.shape
    parts, at = [], 0
    for width in head:  # [g, nb, 16 rows, width] for each field
        parts.append(r[..., at : at + width].transpose(0, 2, 1, 3).reshape(g, nb, 16 * width))
        at += width
    quants = r[..., at:].reshape(g, 16, nb, -1, 4)[:, :, :, chunk_order]
    parts.append(quants.transpose(0, 2, 3, 1, 4).reshape(g, nb, -1))
    return np.ascontiguousarray(np.concatenate(parts, axis=2).reshape(rows.shape))


def _k_ungroup(x16: np.ndarray, blk: int, head: list[int], chunk_order: np.ndarray, name: str) -> np.ndarray:
    r = _groups(x16, blk, name)
    g, _, nb, _ = r.shape
    flat = r.reshape(g, nb, 16 * blk)
    parts, at = [], 0
    for width in head:
        parts.append(flat[..., at : at + 16 * width].reshape(g, nb, 16, width).transpose(0, 2, 1, 3))
        at += 16 * width
    nq = len(chunk_order)
    quants = np.empty((g, 16, nb, nq, 4), np.uint8)
    quants[:, :, :, chunk_order] = flat[..., at:].reshape(g, nb, nq, 16, 4).transpose(0, 3, 1, 2, 4)
    parts.append(quants.reshape(g, 16, nb, 4 * nq))
    return np.ascontiguousarray(np.concatenate(parts, axis=3).reshape(x16.shape))


# Q6_K (210 bytes per 256 weights: ql[128] low nibbles, qh[64] high 2-bit pairs, int8 scales[16], fp16 d),
# moved to: d (16 rows x 2 bytes), scales (16 rows x 16 bytes, field order: byte i of all rows, so 16
# bytes per sub-block of 16 weights), then per half h (128 weights) and c = 0..7 three chunks: ql bytes
# 64h+4c.., ql bytes 64h+32+4c.., qh bytes 128+32h+4c..: together the 6 bits of weights
# 128h + {0, 32, 64, 96} + 4c..4c+3 (GGUF: ql low/high nibble = weight l / l+64, qh bit pairs = l, l+32,
# l+64, l+96), so each 192 bytes decode without crossing loads.
_Q6_K_HEAD = [2] + [1] * 16  # d, then the 16 scales as separate fields: 16 bytes per sub-block
_Q6_K_CHUNKS = np.array(
    [ch for h in range(2) for c in range(8) for ch in (16 * h + c, 16 * h + 8 + c, 32 + 8 * h + c)]
)


def _q6_k_gguf_order(rows: np.ndarray) -> np.ndarray:
    """Q6_K's GGUF order (ql, qh, scales, d) -> header first (d, scales), quants after, for _k_x16."""
    r = np.asarray(rows, dtype=np.uint8).reshape(rows.shape[0], -1, 210)
    return np.concatenate([r[..., 208:210], r[..., 192:208], r[..., :192]], axis=2).reshape(rows.shape)


def _q6_k_from_order(rows: np.ndarray) -> np.ndarray:
    r = rows.reshape(rows.shape[0], -1, 210)
    return np.ascontiguousarray(
        np.concatenate([r[..., 18:210], r[..., 2:18], r[..., :2]], axis=2).reshape(rows.shape)
    )


def q6_k_x16(rows: np.ndarray) -> np.ndarray:
    return _k_x16(_q6_k_gguf_order(rows), 210, _Q6_K_HEAD, _Q6_K_CHUNKS, "Q6_K")


def q6_k_ungroup(x16: np.ndarray) -> np.ndarray:
    return _q6_k_from_order(_k_ungroup(x16, 210, _Q6_K_HEAD, _Q6_K_CHUNKS, "Q6_K"))


# Q4_K (144 bytes per 256 weights: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 nibble bytes),
# moved to: d, dmin (16 rows x 2 bytes each), the 12 scale bytes as fields (byte k of the 16 rows, 16
# bytes), then 32 chunks in GGUF order: chunk 8g+c holds qs[32g+4c..+3] of each row (low nibbles: weights
# 64g+4c.., high: 64g+32+4c..).
_Q4_K_HEAD = [2, 2] + [1] * 12
_Q4_K_CHUNKS = np.arange(32)


def q4_k_x16(rows: np.ndarray) -> np.ndarray:
    return _k_x16(rows, 144, _Q4_K_HEAD, _Q4_K_CHUNKS, "Q4_K")


def q4_k_ungroup(x16: np.ndarray) -> np.ndarray:
    return _k_ungroup(x16, 144, _Q4_K_HEAD, _Q4_K_CHUNKS, "Q4_K")


def _interleave(rows: np.ndarray, fields: tuple[tuple[int, int], ...], name: str) -> np.ndarray:
    """The x16 form of a block made of `fields` (bytes, unit) in order: per group and block, each field
    in turn, unit by unit, 16 rows of `unit` bytes each (one 16-row vector per unit). A 2-byte unit of
    an fp16 scale gives 32 bytes (16 scales, one 512-bit conversion); a 4-byte unit of quant bytes gives
    64 bytes, one 32-bit lane per row (what a dot product of 4 bytes sums)."""
    r = _groups(rows, sum(w for w, _ in fields), name)
    g, _, nb, _ = r.shape
    parts, off = [], 0
    for width, unit in fields:
        f = r[..., off : off + width].reshape(g, 16, nb, width // unit, unit)
        parts.append(f.transpose(0, 2, 3, 1, 4).reshape(g, nb, 16 * width))
        off += width
    return np.ascontiguousarray(np.concatenate(parts, axis=2).reshape(rows.shape))


def _deinterleave(x16: np.ndarray, fields: tuple[tuple[int, int], ...], name: str) -> np.ndarray:
    """The inverse of _interleave."""
    r = _groups(x16, sum(w for w, _ in fields), name)
    g, _, nb, blk = r.shape
    flat = r.reshape(g, nb, 16 * blk)
    parts, off = [], 0
    for width, unit in fields:
        f = flat[..., off : off + 16 * width].reshape(g, nb, width // unit, 16, unit)
        parts.append(f.transpose(0, 3, 1, 2, 4).reshape(g, 16, nb, width))
        off += 16 * width
    return np.ascontiguousarray(np.concatenate(parts, axis=3).reshape(x16.shape))


# Blocks as (bytes, unit) fields: fp16 scales in 2-byte units, quant and high-bit bytes in 4-byte units.
Q8_0_FIELDS = ((2, 2), (32, 4))  # d; 32 int8 (8 chunks of 64 bytes)
Q5_0_FIELDS = ((2, 2), (4, 4), (16, 4))  # d; qh (each row's 32 high bits in its own lane); nibbles
Q4_1_FIELDS = ((2, 2), (2, 2), (16, 4))  # d; m; nibbles (as Q4_0)


def q8_0_x16(rows: np.ndarray) -> np.ndarray:
    """Q8_0 (34 bytes per 32 weights: fp16 d, 32 int8). Per group and block (544 bytes): the 16 rows'
    fp16 scales (32 bytes), then 8 chunks of 64 bytes where bytes 4r..4r+3 of chunk c are the quant
    bytes 4c..4c+3 of row r."""
    return _interleave(rows, Q8_0_FIELDS, "Q8_0")


def q8_0_ungroup(x16: np.ndarray) -> np.ndarray:
    return _deinterleave(x16, Q8_0_FIELDS, "Q8_0")


def q5_0_x16(rows: np.ndarray) -> np.ndarray:
    """Q5_0 (22 bytes per 32 weights: fp16 d, 4 bytes of high bits qh, 16 nibble bytes). Per group and
    block (352 bytes): the 16 rows' fp16 scales (32 bytes), their qh (64 bytes, row r at 4r), then four
    64-byte chunks where bytes 4r..4r+3 of chunk c are the nibble bytes 4c..4c+3 of row r."""
    return _interleave(rows, Q5_0_FIELDS, "Q5_0")


def q5_0_ungroup(x16: np.ndarray) -> np.ndarray:
    return _deinterleave(x16, Q5_0_FIELDS, "Q5_0")


def q4_1_x16(rows: np.ndarray) -> np.ndarray:
    """Q4_1 (20 bytes per 32 weights: fp16 d, fp16 m, 16 nibble bytes). Per group and block (320 bytes):
    the 16 rows' d (32 bytes), their m (32 bytes), then the nibbles in four 64-byte chunks as Q4_0."""
    return _interleave(rows, Q4_1_FIELDS, "Q4_1")


def q4_1_ungroup(x16: np.ndarray) -> np.ndarray:
    return _deinterleave(x16, Q4_1_FIELDS, "Q4_1")


@lru_cache(maxsize=32)
def _row_map(layout: X16Layout, row_bytes: int) -> np.ndarray:
    """int64 [16, row_bytes]: where byte j of row slot r sits in its x16 group's 16*row_bytes bytes.
    Found by ungrouping the positions themselves (a layout only moves bytes), one byte of them at a
    time since ungroup works on uint8."""
    pos = np.arange(16 * row_bytes, dtype=np.int64).reshape(16, row_bytes)
    out = np.zeros_like(pos)
    for shift in range(0, int(pos.max()).bit_length(), 8):
        out |= layout.ungroup(((pos >> shift) & 0xFF).astype(np.uint8)).astype(np.int64) << shift
    return out


@lru_cache(maxsize=32)
def _unit_map(layout: X16Layout, row_bytes: int) -> tuple[int, np.ndarray]:
    """The row map in the widest unit (4, 2 or 1 bytes) every row's bytes move in, aligned: gathering
    2- or 4-byte units is that many times fewer indices (a lookup's cost is its index count)."""
    rm = _row_map(layout, row_bytes)
    for unit in (4, 2):
        if row_bytes % unit:
            continue
        heads = rm[:, ::unit]
        runs = heads[:, :, None] + np.arange(unit)
        if not (heads % unit).any() and (runs.reshape(16, row_bytes) == rm).all():
            return unit, heads // unit
    return 1, rm


def gguf_rows(layout: X16Layout, x16: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The GGUF bytes of rows `ids` (any shape) of an x16 matrix: [*ids.shape, row_bytes]. Gathers just
    those rows' bytes (for embedding lookups from a memory map: a few rows per token, never the table)."""
    row_bytes = x16.shape[1]
    unit, umap = _unit_map(layout, row_bytes)
    groups, slots = np.divmod(np.asarray(ids, dtype=np.int64).reshape(-1), 16)
    flat = np.asarray(x16).reshape(-1).view(f"<u{unit}" if unit > 1 else np.uint8)
    index = np.int32 if flat.size < 2**31 else np.int64
    lin = (groups.astype(index) * index(16 * row_bytes // unit))[:, None] + umap[slots].astype(index)
    return flat.take(lin).view(np.uint8).reshape(*np.shape(ids), row_bytes)


LAYOUTS: dict[int, X16Layout] = {
    T.Q4_0: X16Layout("GgufMatMulQ4_0x16", 32, 18, q4_0_x16, q4_0_ungroup),
    T.Q4_K: X16Layout("GgufMatMulQ4_Kx16", 256, 144, q4_k_x16, q4_k_ungroup),
    T.Q6_K: X16Layout("GgufMatMulQ6_Kx16", 256, 210, q6_k_x16, q6_k_ungroup),
    T.Q5_0: X16Layout("GgufMatMulQ5_0x16", 32, 22, q5_0_x16, q5_0_ungroup),
    T.Q8_0: X16Layout("GgufMatMulQ8_0x16", 32, 34, q8_0_x16, q8_0_ungroup),
}

# Q4_1's op is built and tested (tests/test_native_q32.py: it equals MatMulNBits + correction to ~5e-7 per
# matrix, real SmolLM2 matrices included), but not yet used by import: in the whole SmolLM2-135M Q4_1
# graph it drifts from the MatMulNBits graph (teacher-forced cosine against the exact graph min 0.984,
# MatMulNBits 0.9967; tests/test_real_model.py bars 0.995), a cause not found yet. Add it to LAYOUTS once
# it is.
Q4_1_LAYOUT = X16Layout("GgufMatMulQ4_1x16", 32, 20, q4_1_x16, q4_1_ungroup)
