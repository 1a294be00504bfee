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
}
