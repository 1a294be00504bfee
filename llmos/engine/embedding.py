"""Token embedding lookup from a memory map of the model's own weight file.

The graph takes `inputs_embeds`, not token ids. The table lives once on disk, inside model.onnx.data,
where a tied head reads it too; the engine maps the same bytes read-only, so only the rows of tokens it
has seen become resident (a Gather inside onnxruntime would keep the whole table mapped, ~30 MB for the
default model, next to the head's prepacked copy). The byte ranges come from the manifest, so loading a
model never needs the `onnx` package.

When a native op reads the table's GGUF type (the tied head, llmos/native/), the table is the GGUF's own
rows regrouped 16 at a time ("x16", llmos/gguf_layouts.py): a lookup gathers just the looked-up rows'
bytes from the map (`gguf_rows`) and decodes them as the type's blocks (`quant.dequantize_rows`); the
manifest's `embedding_type` names the type, so nothing of the GGUF is parsed at load.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from llmos.errors import ModelFormatError
from llmos.gguf_layouts import LAYOUTS, X16Layout, gguf_rows
from llmos.manifest import TensorLocation
from llmos.quant import dequantize_rows


def _map(model_dir: Path, loc: TensorLocation) -> np.ndarray:
    path = model_dir / loc.file
    dtype = np.dtype(loc.dtype)
    if (
        loc.length != int(np.prod(loc.shape)) * dtype.itemsize
        or not path.is_file()
        or loc.offset + loc.length > os.path.getsize(path)
    ):
        raise ModelFormatError(f"{path}: the embedding table does not fit the file (truncated model?)")
    return np.memmap(path, dtype=dtype, mode="r", offset=loc.offset, shape=tuple(loc.shape))


def _x16_type(d: Path, qtype: str) -> tuple[GGMLQuantizationType, X16Layout]:
    try:
        q = GGMLQuantizationType[qtype]
        return q, LAYOUTS[q]
    except KeyError:
        raise ModelFormatError(
            f"{d}: the embedding table's type {qtype or '(none)'} has no x16 layout in this llmos "
            "(re-import the model)"
        ) from None


class EmbeddingTable:
    def __init__(
        self, model_dir: str | os.PathLike[str], locations: dict[str, TensorLocation], qtype: str = ""
    ) -> None:
        d = Path(model_dir)
        self._float = self._q = self._scales = self._corr = self._x16 = None
        if "x16" in locations:  # the GGUF's rows for a native op; qtype: their GGUF type name
            self._qtype, self._layout = _x16_type(d, qtype)
            self._x16 = _map(d, locations["x16"])  # uint8 [V, row_bytes]
            self.n_vocab = self._x16.shape[0]
            self.n_embd = self._x16.shape[1] // self._layout.blk * self._layout.qk
        elif "weight" in locations:  # fp32 graph
            self._float = _map(d, locations["weight"])
            self.n_vocab, self.n_embd = self._float.shape
        elif "qweight" in locations and "scales" in locations:
            self._q = _map(d, locations["qweight"])  # uint8 [V, nb, 32]: value = scale * (q - 128) (+ corr)
            self._scales = _map(d, locations["scales"])  # [V, nb]
            self._corr = _map(d, locations["correction"]) if "correction" in locations else None
            self.n_vocab = self._q.shape[0]
            self.n_embd = self._q.shape[1] * self._q.shape[2]
        else:
            raise ModelFormatError(
                f"{d}: the manifest does not locate an embedding table (re-import the model)"
            )

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """float32 [..., n_embd] embeddings of integer `ids` (shape [...])."""
        if self._float is not None:
            return np.ascontiguousarray(self._float[ids], dtype=np.float32)
        if self._x16 is not None:
            raw = gguf_rows(self._layout, self._x16, ids).reshape(-1, self._x16.shape[1])
            return dequantize_rows(self._qtype, raw).reshape(*np.shape(ids), self.n_embd)
        q = self._q[ids].astype(np.float32)
        q -= 128.0
        q *= self._scales[ids][..., None]
        if self._corr is not None:
            q += self._corr[ids][..., None]
        return q.reshape(*ids.shape, self.n_embd)
