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


def gguf_rows(layout: X16Layout, x16: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The GGUF bytes of rows `ids` (any shape) of an x16 matrix: [*ids.shape, row_bytes]. Reads each
    row's whole group of 16 (for embedding lookups: a few rows per token, never the whole table)."""
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    groups, slots = np.divmod(flat, 16)
    uniq, inverse = np.unique(groups, return_inverse=True)
    blocks = x16.reshape(-1, 16, x16.shape[1])[uniq].reshape(-1, x16.shape[1])
    rows = layout.ungroup(blocks).reshape(len(uniq), 16, -1)[inverse, slots]
    return rows.reshape(*np.shape(ids), x16.shape[1])


LAYOUTS: dict[int, X16Layout] = {
    T.Q4_0: X16Layout("GgufMatMulQ4_0x16", 32, 18, q4_0_x16, q4_0_ungroup),
    T.Q4_K: X16Layout("GgufMatMulQ4_Kx16", 256, 144, q4_k_x16, q4_k_ungroup),
    T.Q6_K: X16Layout("GgufMatMulQ6_Kx16", 256, 210, q6_k_x16, q6_k_ungroup),
}
