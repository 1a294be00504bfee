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
from gguf.quants import dequantize

from llmos.architectures import ARCHITECTURES, SUPPORTED_ARCHITECTURES, Architecture
from llmos.errors import ModelFormatError, UnsupportedModelError


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
    # What the architecture adds to the llama block (llmos/architectures.py); the defaults are llama's.
    rope_interleaved: bool = True  # adjacent-pair rotary (llama.cpp NORM); False: half-split (NEOX)
    qk_norm: bool = False  # per-head RMS norm of q and k before rotary (qwen3, gemma3)
    post_norms: bool = False  # RMS norm on the attention and FFN outputs before the residual add (gemma3)
    ffn_activation: str = "silu"  # of the gate: "silu" or "gelu_tanh"
    embedding_scale: float = 1.0  # token embeddings are multiplied by it (gemma3: sqrt(n_embd))
    attention_scale: float = 0.0  # scale of q.k; 0 means 1/sqrt(head_dim)
    rope_freq_scale: float = 1.0  # linear rope scaling: positions x this (1/factor)
    rope_freq_factors: tuple[float, ...] | None = None  # llama 3.x `rope_freqs.weight`: angle / factor[i]
    sliding_window: int = 0  # keys a sliding-window layer sees, the query's own included (0: none)
    local_layers: tuple[int, ...] = ()  # layers with the sliding window (and their own rotary base)
    rope_theta_local: float = 10000.0  # rotary base of the sliding-window layers
    final_logit_softcap: float = 0.0  # logits = c * tanh(logits / c) when > 0

    @property
    def q_dim(self) -> int:
        """Width of the attention's query (and output) side: heads x head_dim, not always n_embd."""
        return self.n_head * self.head_dim

    @property
    def kq_scale(self) -> float:
        return self.attention_scale or float(1.0 / np.sqrt(self.head_dim))


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
        spec = ARCHITECTURES.get(arch)
        if spec is None:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        n_layer = int(self.require(f"{arch}.block_count"))
        n_embd = int(self.require(f"{arch}.embedding_length"))
        n_head = int(self.require(f"{arch}.attention.head_count"))
        n_head_kv = int(self.get(f"{arch}.attention.head_count_kv", n_head))
        head_dim = int(self.get(f"{arch}.attention.key_length", n_embd // max(n_head, 1)))
        emb = self.tensor("token_embd.weight")
        n_vocab = emb.shape[0]
        q = self._tensors.get("blk.0.attn_q.weight")
        q_shape = tuple(int(d) for d in reversed(q.shape.tolist())) if q is not None else None
        if (
            n_head <= 0
            or n_head_kv <= 0
            or head_dim <= 0
            or n_head % n_head_kv
            or (q_shape is not None and q_shape != (n_head * head_dim, n_embd))
            or (q_shape is None and head_dim * n_head != n_embd)
        ):
            raise ModelFormatError(
                f"{self.path}: inconsistent attention shape (embd {n_embd}, heads {n_head}, "
                f"kv heads {n_head_kv}, head dim {head_dim}, attn_q {q_shape})"
            )
        if head_dim % 2:
            raise UnsupportedModelError(f"head dimension {head_dim} is odd; rotary needs it even")
        value_dim = int(self.get(f"{arch}.attention.value_length", head_dim))
        rope_dims = int(self.get(f"{arch}.rope.dimension_count", head_dim))
        if value_dim != head_dim or rope_dims != head_dim:
            raise UnsupportedModelError(
                f"key length {head_dim}, value length {value_dim} and rotary dimensions {rope_dims} differ; "
                "llmos runs only models where all three are the head size"
            )
        window, local = self._sliding_window(spec, n_layer)
        return LlamaHParams(
            architecture=arch,
            n_layer=n_layer,
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
            rope_interleaved=spec.rope_interleaved,
            qk_norm=spec.qk_norm,
            post_norms=spec.post_norms,
            ffn_activation=spec.ffn_activation,
            embedding_scale=float(np.sqrt(np.float32(n_embd))) if spec.scaled_embeddings else 1.0,
            attention_scale=self._attention_scale(spec, n_layer, n_embd, n_head, head_dim),
            rope_freq_scale=self._rope_freq_scale(arch),
            rope_freq_factors=self._rope_freq_factors(spec, head_dim),
            sliding_window=window,
            local_layers=local,
            rope_theta_local=float(self.get(f"{arch}.rope.freq_base_swa", spec.rope_theta_local)),
            final_logit_softcap=float(self.get(f"{arch}.final_logit_softcapping", 0.0) or 0.0),
        )

    def _rope_freq_scale(self, arch: str) -> float:
        """llama.cpp's rule: `rope.scaling.factor` (or the old `rope.scale_linear`) divides positions unless
        the scaling type is "none"; an absent type means linear. YaRN and LongRoPE are not supported."""
        kind = self.get(f"{arch}.rope.scaling.type")
        kind = "linear" if kind is None else str(kind)
        if kind == "none":
            return 1.0
        if kind != "linear":
            raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (only linear and llama 3's)")
        factor = self.get(f"{arch}.rope.scaling.factor")
        if factor is None:
            factor = self.get(f"{arch}.rope.scale_linear")
        factor = float(factor or 0.0)
        if factor < 0 or not np.isfinite(factor):
            raise ModelFormatError(f"{self.path}: rope scaling factor {factor} is not a positive number")
        return 1.0 if factor == 0.0 else 1.0 / factor

    def _rope_freq_factors(self, spec: Architecture, head_dim: int) -> tuple[float, ...] | None:
        """llama 3.x: the converter folds its rope scaling into `rope_freqs.weight`, one divisor of the
        rotary angle per frequency (llama.cpp passes it to ggml_rope_ext as freq_factors)."""
        t = self._tensors.get("rope_freqs.weight")
        if t is None or not spec.rope_freq_factors:
            return None
        values = np.asarray(dequantize(np.asarray(t.data), GGMLQuantizationType(t.tensor_type)))
        values = values.reshape(-1).astype(np.float64)
        if values.size != head_dim // 2 or not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ModelFormatError(
                f"{self.path}: rope_freqs.weight needs {head_dim // 2} positive factors, has {values.size}"
            )
        return tuple(float(v) for v in values)

    def _sliding_window(self, spec: Architecture, n_layer: int) -> tuple[int, tuple[int, ...]]:
        """The window size and which layers use it. gemma3: every layer but each 6th (5, 11, ...), as
        llama.cpp's set_swa_pattern(6); a file's own `attention.sliding_window_pattern` (a period, or one
        flag per layer) overrides the pattern. No window (or 0) means every layer is global."""
        arch = spec.name
        window = int(self.get(f"{arch}.attention.sliding_window", 0) or 0) if spec.swa_pattern else 0
        if window <= 0:
            return 0, ()
        pattern = self.get(f"{arch}.attention.sliding_window_pattern", spec.swa_pattern)
        if isinstance(pattern, list | np.ndarray):
            flags = [bool(v) for v in pattern]
            if len(flags) != n_layer:
                raise ModelFormatError(
                    f"{self.path}: sliding_window_pattern has {len(flags)} flags for {n_layer} layers"
                )
            return window, tuple(i for i, f in enumerate(flags) if f)
        period = int(pattern)
        if period <= 0:
            return window, tuple(range(n_layer))
        return window, tuple(i for i in range(n_layer) if i % period < period - 1)

    @staticmethod
    def _attention_scale(spec: Architecture, n_layer: int, n_embd: int, n_head: int, head_dim: int) -> float:
        """gemma3 scales q.k by 1/sqrt(query_pre_attn_scalar), which GGUF does not carry: llama.cpp uses
        the head size, except for the 27B (62 layers) where it is n_embd / n_head (168), as in Google's
        configs. Every other architecture: 1/sqrt(head_dim)."""
        if spec.name == "gemma3" and n_layer == 62:
            return float(1.0 / np.sqrt(np.float32(n_embd // n_head)))
        return float(1.0 / np.sqrt(np.float32(head_dim)))

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
