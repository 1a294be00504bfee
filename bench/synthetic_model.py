"""Random-weight llama models in the shapes of real small models, quantized by llama.cpp's own quantizer.

Speed and memory do not depend on the weight values, so a model with the shape of Qwen2.5-0.5B or
Llama-3.2-1B but random weights measures what those models would cost, without downloading them. The
tokenizer (and chat template) is copied from another GGUF, normally the default model's (SmolLM2's
49,152-token vocabulary), so prompts tokenize exactly as they do for the default model.

A model is written once as F16 with the `gguf` package (tensor by tensor: at most one float32 tensor
is in memory), then quantized with `llama_cpp.llama_model_quantize`, which makes the same per-tensor
choices as `llama-quantize` (Q6_K or Q8_0 for a tied embedding, Q6_K/Q5_0 inside Q4_K_M, ...). Files are
cached by shape, seed and recipe version:

    <cache>/llama-<size>-r<RECIPE>-s<seed>-<format>.gguf      (cache: ~/.cache/llmos/bench/synthetic)

Weight scales keep activations finite and lively (as llmos/tiny_model.py's): q/k ~ 1/sqrt(in), the other
matrices ~ 0.5/sqrt(in), the embedding 0.25, norms 1 +- 0.1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RECIPE = 1  # bump when the weights or metadata written change, so cached files are rebuilt

# format name -> llama_cpp's llama_ftype constant
FORMATS = {
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    tied_embeddings: bool = True
    context_length: int = 8192
    rope_theta: float = 100000.0
    rms_eps: float = 1e-5


# Real shapes: Qwen2.5-0.5B's body (24 x 896, ffn 4864, 14/2 heads) and Llama-3.2-1B's (16 x 2048, ffn 8192,
# 32/8 heads), both with tied embeddings like the originals, here with SmolLM2's 49,152-token vocabulary.
SHAPES: dict[str, Shape] = {
    "0.5B": Shape(n_layer=24, n_embd=896, n_ff=4864, n_head=14, n_head_kv=2),
    "1B": Shape(n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8),
}


def default_cache_dir() -> Path:
    from llmos.paths import cache_dir

    return cache_dir() / "bench" / "synthetic"


def tensor_shapes(shape: Shape, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """llama.cpp tensor names and numpy-order shapes ([out, in]) of a llama model, in file order."""
    head_dim = shape.n_embd // shape.n_head
    kv_dim = head_dim * shape.n_head_kv
    e, f = shape.n_embd, shape.n_ff
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_vocab, e)}
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = (e,)
        out[p + "attn_q.weight"] = (e, e)
        out[p + "attn_k.weight"] = (kv_dim, e)
        out[p + "attn_v.weight"] = (kv_dim, e)
        out[p + "attn_output.weight"] = (e, e)
        out[p + "ffn_norm.weight"] = (e,)
        out[p + "ffn_gate.weight"] = (f, e)
        out[p + "ffn_up.weight"] = (f, e)
        out[p + "ffn_down.weight"] = (e, f)
    out["output_norm.weight"] = (e,)
    if not shape.tied_embeddings:
        out["output.weight"] = (n_vocab, e)
    return out


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """One tensor's values: norms float32 around 1, matrices float16 with the scales in the docstring."""
    rng = np.random.default_rng([seed, *name.encode()])
    w = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:
        w *= 0.1
        w += 1.0
        return w  # 1-D tensors stay F32, as llama.cpp's converter writes them
    if name in ("token_embd.weight", "output.weight"):
        w *= 0.25
    else:
        w *= (1.0 if name.endswith(("attn_q.weight", "attn_k.weight")) else 0.5) / np.sqrt(shape[1])
    return w.astype(np.float16)


def _copy_tokenizer(writer: object, tokenizer_gguf: Path) -> int:
    """Copy every `tokenizer.*` key of `tokenizer_gguf` into `writer`; return the vocabulary size."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(tokenizer_gguf, "r")
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=field.types[-1])  # type: ignore[attr-defined]
        else:
            writer.add_key_value(key, value, field.types[0])  # type: ignore[attr-defined]
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if not n_vocab:
        raise ValueError(f"{tokenizer_gguf} has no tokenizer.ggml.tokens")
    return n_vocab


def write_f16_gguf(path: str | os.PathLike[str], shape: Shape, tokenizer_gguf: Path, seed: int = 0) -> Path:
    """Write a complete F16 llama GGUF of `shape` with random weights and `tokenizer_gguf`'s tokenizer.

    Streams tensor by tensor, so memory stays at about one tensor whatever the model's size.
    """
    from gguf import GGUFWriter, LlamaFileType

    if shape.n_embd % shape.n_head or shape.n_head % shape.n_head_kv or (shape.n_embd // shape.n_head) % 2:
        raise ValueError(f"bad attention shape: {shape}")
    path = Path(path)
    w = GGUFWriter(path, "llama")
    w.add_type("model")
    w.add_name(f"synthetic-llama-{shape.n_layer}x{shape.n_embd}")
    n_vocab = _copy_tokenizer(w, tokenizer_gguf)
    w.add_block_count(shape.n_layer)
    w.add_context_length(shape.context_length)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_file_type(LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    w.add_quantization_version(2)

    shapes = tensor_shapes(shape, n_vocab)
    for name, s in shapes.items():
        dtype = np.dtype(np.float32 if len(s) == 1 else np.float16)
        w.add_tensor_info(name, s, dtype, int(np.prod(s)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, s in shapes.items():
        w.write_tensor_data(random_tensor(name, s, seed))
    w.close()
    return path


def quantize(src: Path, dst: Path, fmt: str, threads: int = 0) -> Path:
    """Quantize `src` (F16/F32 GGUF) to `fmt` with llama.cpp's own quantizer (llama-cpp-python)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FORMATS[fmt])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama_model_quantize({src.name} -> {fmt}) failed with {rc}")
    return dst


def model_path(cache: Path, size: str, fmt: str, seed: int = 0) -> Path:
    return cache / f"llama-{size}-r{RECIPE}-s{seed}-{fmt}.gguf"


def ensure_model(
    size: str,
    fmt: str,
    tokenizer_gguf: Path,
    cache: Path | None = None,
    seed: int = 0,
    threads: int = 0,
    say: Callable[[str], None] = lambda _m: None,
    shapes: Mapping[str, Shape] = SHAPES,
) -> Path:
    """The cached `size` model in `fmt` ("F16" or a key of FORMATS), built (and its F16 source) if missing.

    Files appear under their final name only when complete (written to a temporary name, then renamed).
    """
    cache = cache or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dst = model_path(cache, size, fmt, seed)
    if dst.is_file():
        return dst
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        if fmt == "F16":
            say(f"writing {dst.name} (random weights, {shapes[size]})")
            write_f16_gguf(tmp, shapes[size], tokenizer_gguf, seed)
        else:
            src = ensure_model(size, "F16", tokenizer_gguf, cache, seed, threads, say, shapes)
            say(f"quantizing {src.name} -> {fmt} with llama.cpp")
            quantize(src, tmp, fmt, threads)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
