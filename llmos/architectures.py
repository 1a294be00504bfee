"""What each supported GGUF architecture adds to the llama block, as llama.cpp runs it.

Every architecture here is the llama decoder (RMS norm, rotary attention with grouped KV heads, gated
FFN, residual stream) with a few switches; `ARCHITECTURES` holds them, `gguf_file.GGUFFile.hparams`
turns them plus the file's metadata into numbers, and `graph_builder` reads only those numbers.

- llama: rotary on adjacent pairs (the converter permutes Q/K rows for it); llama 3.x's
  `rope_freqs.weight` frequency factors.
- qwen2: q/k/v biases; rotary on half-split pairs (NEOX).
- qwen3: per-head RMS norms on q and k before rotary; NEOX; heads x head_dim may differ from the width.
- gemma3: embeddings x sqrt(width); norms after attention and FFN as well as before; q/k norms; GELU(tanh)
  gated FFN; a sliding window on 5 layers of 6 with their own rotary base (10000); q.k scaled by the
  head size's root; NEOX.

Sources: llama.cpp's src/models/{llama,qwen2,qwen3,gemma3}.cpp and its hparams loader, checked against
llama.cpp itself on the same files (tests/test_architectures.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FfnActivation = Literal["silu", "gelu_tanh"]


@dataclass(frozen=True)
class Architecture:
    name: str
    # rotary on adjacent pairs (x[2i], x[2i+1]): llama.cpp's LLAMA_ROPE_TYPE_NORM, for which the llama
    # converter permutes the Q/K rows; otherwise half-split pairs (x[i], x[i + d/2]), LLAMA_ROPE_TYPE_NEOX
    rope_interleaved: bool
    qk_norm: bool = False  # RMS norm over each head of q and k (attn_q_norm / attn_k_norm), before rotary
    post_norms: bool = False  # post_attention_norm / post_ffw_norm on each sub-block's output
    ffn_activation: FfnActivation = "silu"
    scaled_embeddings: bool = False  # token embeddings x sqrt(n_embd)
    # sliding-window layers: layer i uses the window when i % pattern < pattern - 1 (0: no pattern)
    swa_pattern: int = 0
    rope_theta_local: float = 10000.0  # rotary base of the sliding-window layers
    rope_freq_factors: bool = False  # reads `rope_freqs.weight` (llama.cpp passes it for llama only)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama", rope_interleaved=True, rope_freq_factors=True),
        Architecture("qwen2", rope_interleaved=False),
        Architecture("qwen3", rope_interleaved=False, qk_norm=True),
        Architecture(
            "gemma3",
            rope_interleaved=False,
            qk_norm=True,
            post_norms=True,
            ffn_activation="gelu_tanh",
            scaled_embeddings=True,
            swa_pattern=6,
        ),
    )
}

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
