"""Read and validate a GGUF file: metadata, hyper-parameters and raw tensors.

`gguf.GGUFReader` does the parsing; this class turns its many ways of failing on a bad file (struct
errors, numpy reshape errors, KeyErrors) into one named `ModelFormatError`, and checks what the reader
does not: that every tensor's bytes are really in the file and that the hyper-parameters agree.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from llmos.errors import ModelFormatError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: (rows, cols) for a matrix, cols being the contiguous dim
    data: np.ndarray  # raw bytes as the reader maps them (uint8 rows for quantized types)


@dataclass(frozen=True)
class LlamaHParams:
    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    context_length: int
    rope_theta: float
    rms_eps: float
    tied_embeddings: bool
    attention_bias: bool  # qwen2 has q/k/v biases


class GGUFFile:
    """One opened GGUF file. Raises `ModelFormatError` for anything malformed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such model file")
        size = self.path.stat().st_size
        if size < 24:
            raise ModelFormatError(f"{self.path}: {size} bytes is too short to be a GGUF file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFormatError(f"{self.path}: not a GGUF file (magic {magic!r})")
        try:
            self._reader = GGUFReader(self.path, "r")
        except Exception as e:  # the reader fails in many shapes on a damaged file
            raise ModelFormatError(f"{self.path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from e
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._check_tensor_extents(size)

    def _check_tensor_extents(self, file_size: int) -> None:
        for t in self._reader.tensors:
            try:
                block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            except KeyError as e:
                raise UnsupportedModelError(f"tensor {t.name}: unknown tensor type {t.tensor_type}") from e
            n = int(np.prod(t.shape))
            expected = n // block * type_size
            if t.data_offset + expected > file_size or t.data.nbytes != expected:
                raise ModelFormatError(
                    f"{self.path}: tensor {t.name} needs {expected} bytes at offset {t.data_offset} "
                    f"but the file has {file_size} bytes (truncated?)"
                )

    # -- metadata -------------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value as a Python object (str, int, float, bool or list)."""
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            if (
                field.types
                and field.types[0] == GGUFValueType.ARRAY
                and field.types[-1] != GGUFValueType.STRING
            ):
                # numeric arrays: one numpy array instead of 49k Python objects
                return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.array([])
            return field.contents()
        except Exception as e:
            raise ModelFormatError(f"{self.path}: metadata {key} is unreadable ({e})") from e

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelFormatError(f"{self.path}: required metadata {key} is missing")
        return value

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def hparams(self) -> LlamaHParams:
        arch = self.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        n_embd = int(self.require(f"{arch}.embedding_length"))
        n_head = int(self.require(f"{arch}.attention.head_count"))
        n_head_kv = int(self.get(f"{arch}.attention.head_count_kv", n_head))
        head_dim = int(self.get(f"{arch}.attention.key_length", n_embd // max(n_head, 1)))
        emb = self.tensor("token_embd.weight")
        n_vocab = emb.shape[0]
        hp = LlamaHParams(
            architecture=arch,
            n_layer=int(self.require(f"{arch}.block_count")),
            n_embd=n_embd,
            n_ff=int(self.require(f"{arch}.feed_forward_length")),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_vocab=n_vocab,
            context_length=int(self.get(f"{arch}.context_length", 2048)),
            rope_theta=float(self.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(self.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            tied_embeddings="output.weight" not in self._tensors,
            attention_bias="blk.0.attn_q.bias" in self._tensors,
        )
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv or head_dim * n_head != n_embd:
            raise ModelFormatError(
                f"{self.path}: inconsistent attention shape (embd {n_embd}, heads {n_head}, "
                f"kv heads {n_head_kv}, head dim {head_dim})"
            )
        if head_dim % 2:
            raise UnsupportedModelError(f"head dimension {head_dim} is odd; rotary needs it even")
        if self.get(f"{arch}.rope.scaling.type") not in (None, "none"):
            raise UnsupportedModelError(
                f"rope scaling {self.get(f'{arch}.rope.scaling.type')!r} is not supported"
            )
        return hp

    # -- tensors --------------------------------------------------------------------------------------
    def release(self, name: str) -> None:
        """Done with a tensor: drop its pages of the file mapping from this process (they stay in the
        page cache), so reading a whole model does not hold the whole file resident."""
        t = self._tensors.get(name)
        mm = getattr(self._reader.data, "_mmap", None)
        if t is None or mm is None:
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        end = t.data_offset + t.data.nbytes
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def drop_vocabulary(self) -> None:
        """Forget the tokenizer's metadata arrays once the tokenizer is built: the reader keeps a numpy
        view per token and merge, ~160 MB for a 49k vocabulary."""
        for key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores",
        ):
            self._reader.fields.pop(key, None)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> TensorInfo:
        t = self._tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: tensor {name} is missing")
        # GGUF lists dims innermost first; numpy order is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return TensorInfo(name=name, qtype=GGMLQuantizationType(t.tensor_type), shape=shape, data=t.data)
