"""A plain numpy forward pass of llama, qwen2, qwen3 and gemma3: the definition of "correct" for every
llmos engine test.

Written from the GGUF directly (gguf-py's reader and dequantizer, nothing from llmos), in float64, and
following llama.cpp's semantics (src/models/*.cpp) step by step:

  x = token_embd[ids]                                                   (gemma3: x * sqrt(n_embd))
  per layer:  h = rmsnorm(x) * attn_norm
              q, k, v = h @ Wq.T (+bq), h @ Wk.T (+bk), h @ Wv.T (+bv)      # biases: qwen2 only
              qwen3, gemma3: each head of q and k = rmsnorm(head) * attn_{q,k}_norm  ([head_dim])
              rotary on q, k at absolute positions: llama rotates ADJACENT pairs (x[2i], x[2i+1])
                (LLAMA_ROPE_TYPE_NORM), the others HALF-SPLIT pairs (x[i], x[i+hd/2]) (NEOX), by the
                angle pos * freq_scale * theta^(-2i/head_dim) / factor[i]   (factor: llama's rope_freqs,
                freq_scale: 1/rope.scaling.factor; gemma3's sliding-window layers: theta 10000 or
                rope.freq_base_swa, unscaled)
              grouped-query attention: query head h reads kv head h // (n_head / n_head_kv),
                causal, scores scaled by 1/sqrt(head_dim) (gemma3 27B: 1/sqrt(n_embd/n_head));
                gemma3's sliding-window layers (i % 6 < 5) see only keys with q_pos - k_pos < window
              a = attn @ Wo.T                                   (gemma3: a = rmsnorm(a) * post_attention_norm)
              x = x + a
              h = rmsnorm(x) * ffn_norm;  f = Wdown @ (act(Wgate h) * Wup h)   act: silu, gemma3 gelu(tanh)
              x = x + f                                         (gemma3: f = rmsnorm(f) * post_ffw_norm)
  logits = (rmsnorm(x) * output_norm) @ output.T, output = token_embd when output.weight is absent
           (then c * tanh(logits / c) if final_logit_softcapping c is set)
  rmsnorm(x) = x / sqrt(mean(x^2) + eps)

It is slow on purpose: no fusion, no batching tricks, so it is easy to read and hard to get wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize


def load_reference_weights(gguf_path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float64, numpy order (a matrix is [out_features, in_features])."""
    reader = GGUFReader(Path(gguf_path), "r")
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the innermost dim first
        values = dequantize(np.asarray(t.data), GGMLQuantizationType(t.tensor_type))
        out[t.name] = np.asarray(values, dtype=np.float64).reshape(shape)
    return out


@dataclass(frozen=True)
class ReferenceConfig:
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    rope_theta: float
    rms_eps: float
    rope_freq_scale: float = 1.0
    rope_factors: tuple[float, ...] | None = None  # llama's rope_freqs.weight
    sliding_window: int = 0
    rope_theta_local: float = 10000.0  # gemma3's sliding-window layers (`rope.freq_base_swa` if given)
    final_logit_softcap: float = 0.0

    @property
    def neox_rope(self) -> bool:
        """llama rotates adjacent pairs (NORM); the others half-split pairs (NEOX)."""
        return self.architecture != "llama"

    @property
    def gemma(self) -> bool:
        return self.architecture == "gemma3"

    def is_local(self, layer: int) -> bool:
        """gemma3 with a window: every layer but each 6th (5, 11, ...) is a sliding-window layer."""
        return self.gemma and self.sliding_window > 0 and layer % 6 < 5

    @property
    def kq_scale(self) -> float:
        if self.gemma and self.n_layer == 62:  # llama.cpp's gemma3 27B rule (query_pre_attn_scalar 168)
            return 1.0 / np.sqrt(self.n_embd // self.n_head)
        return 1.0 / np.sqrt(self.head_dim)

    @classmethod
    def from_gguf(cls, gguf_path: str | os.PathLike[str], weights: dict[str, np.ndarray]) -> ReferenceConfig:
        reader = GGUFReader(Path(gguf_path), "r")

        def meta(key: str, default: float | int | str | None = None) -> float | int | str:
            f = reader.fields.get(key)
            if f is None:
                if default is None:
                    raise KeyError(key)
                return default
            return f.contents()

        arch = str(meta("general.architecture"))
        n_embd = int(meta(f"{arch}.embedding_length"))
        n_head = int(meta(f"{arch}.attention.head_count"))
        scaling = str(meta(f"{arch}.rope.scaling.type", "linear"))
        factor = float(meta(f"{arch}.rope.scaling.factor", 0.0))
        factors = weights.get("rope_freqs.weight") if arch == "llama" else None
        return cls(
            architecture=arch,
            n_layer=int(meta(f"{arch}.block_count")),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(meta(f"{arch}.attention.head_count_kv", n_head)),
            head_dim=int(meta(f"{arch}.attention.key_length", n_embd // n_head)),
            n_vocab=weights["token_embd.weight"].shape[0],
            rope_theta=float(meta(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_freq_scale=1.0 / factor if factor and scaling != "none" else 1.0,
            rope_factors=None if factors is None else tuple(factors.ravel().tolist()),
            sliding_window=int(meta(f"{arch}.attention.sliding_window", 0)) if arch == "gemma3" else 0,
            rope_theta_local=float(meta(f"{arch}.rope.freq_base_swa", 10000.0)),
            final_logit_softcap=float(meta(f"{arch}.final_logit_softcapping", 0.0)),
        )


@dataclass
class KVState:
    """Per-layer K and V of every position seen so far, each [n_head_kv, n_pos, head_dim]."""

    keys: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys else int(self.keys[0].shape[1])

    def truncate(self, n_pos: int) -> None:
        """Forget positions >= n_pos (rewind, e.g. to reuse a shared prompt prefix)."""
        self.keys = [k[:, :n_pos] for k in self.keys]
        self.values = [v[:, :n_pos] for v in self.values]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (ggml_gelu; Gemma's gelu_pytorch_tanh)."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def apply_rope(
    x: np.ndarray,
    positions: np.ndarray,
    theta: float,
    neox: bool,
    freq_scale: float = 1.0,
    factors: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Rotate x [n_heads, n_pos, head_dim] at absolute `positions` the way llama.cpp does."""
    hd = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # theta^(-2i/hd), i < hd/2
    if factors is not None:
        inv_freq = inv_freq / np.asarray(factors, dtype=np.float64)
    angles = positions.astype(np.float64)[:, None] * freq_scale * inv_freq[None, :]  # [n_pos, hd/2]
    cos, sin = np.cos(angles), np.sin(angles)
    if neox:
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if neox:
        out[..., : hd // 2], out[..., hd // 2 :] = ra, rb
    else:
        out[..., 0::2], out[..., 1::2] = ra, rb
    return out


class ReferenceLlama:
    """Reference forward pass over dequantized weights; see the module docstring for the maths."""

    def __init__(self, weights: dict[str, np.ndarray], config: ReferenceConfig) -> None:
        self.w = weights
        self.cfg = config
        self.output = weights.get("output.weight", weights["token_embd.weight"])

    @classmethod
    def from_gguf(cls, gguf_path: str | os.PathLike[str]) -> ReferenceLlama:
        weights = load_reference_weights(gguf_path)
        return cls(weights, ReferenceConfig.from_gguf(gguf_path, weights))

    def new_state(self) -> KVState:
        return KVState()

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _attention(self, layer: int, h: np.ndarray, positions: np.ndarray, state: KVState) -> np.ndarray:
        c = self.cfg
        p = f"blk.{layer}."
        n_new = h.shape[0]
        q = self._linear(h, p + "attn_q").reshape(n_new, c.n_head, c.head_dim).transpose(1, 0, 2)
        k = self._linear(h, p + "attn_k").reshape(n_new, c.n_head_kv, c.head_dim).transpose(1, 0, 2)
        v = self._linear(h, p + "attn_v").reshape(n_new, c.n_head_kv, c.head_dim).transpose(1, 0, 2)
        if p + "attn_q_norm.weight" in self.w:  # qwen3, gemma3: per-head norms before rotary
            q = rms_norm(q, self.w[p + "attn_q_norm.weight"], c.rms_eps)
            k = rms_norm(k, self.w[p + "attn_k_norm.weight"], c.rms_eps)
        local = c.is_local(layer)
        if local:  # gemma3's sliding-window layers: their own base (10000), no scaling
            rope = {"theta": c.rope_theta_local, "freq_scale": 1.0, "factors": None}
        else:
            rope = {"theta": c.rope_theta, "freq_scale": c.rope_freq_scale, "factors": c.rope_factors}
        q = apply_rope(q, positions, neox=c.neox_rope, **rope)  # type: ignore[arg-type]
        k = apply_rope(k, positions, neox=c.neox_rope, **rope)  # type: ignore[arg-type]
        if layer < len(state.keys):
            state.keys[layer] = np.concatenate([state.keys[layer], k], axis=1)
            state.values[layer] = np.concatenate([state.values[layer], v], axis=1)
        else:
            state.keys.append(k)
            state.values.append(v)
        keys, values = state.keys[layer], state.values[layer]
        key_pos = np.arange(keys.shape[1])
        masked = key_pos[None, :] > positions[:, None]  # [n_new, n_total]: a query sees keys at <= its pos
        if local:  # ... and, in a sliding-window layer, only the last `window` of them
            masked |= positions[:, None] - key_pos[None, :] >= c.sliding_window
        group = c.n_head // c.n_head_kv
        out = np.empty((n_new, c.n_head, c.head_dim))
        for head in range(c.n_head):
            kv = head // group
            scores = q[head] @ keys[kv].T * c.kq_scale
            scores = np.where(masked, -np.inf, scores)
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            out[:, head] = probs @ values[kv]
        out = self._linear(out.reshape(n_new, c.n_head * c.head_dim), p + "attn_output")
        if c.gemma:
            out = rms_norm(out, self.w[p + "post_attention_norm.weight"], c.rms_eps)
        return out

    def forward(
        self, token_ids: list[int], start_pos: int = 0, kv_state: KVState | None = None
    ) -> np.ndarray:
        """Logits [len(token_ids), n_vocab] (float64) for tokens at positions start_pos, start_pos+1, ...

        `kv_state` holds the earlier positions and is extended in place; `start_pos` must equal its
        length (call `kv_state.truncate` first to rewind). None means a fresh state.
        """
        state = KVState() if kv_state is None else kv_state
        if start_pos != state.length:
            raise ValueError(f"start_pos {start_pos} but the KV state holds {state.length} positions")
        if not token_ids:
            raise ValueError("forward needs at least one token")
        c = self.cfg
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= c.n_vocab:
            raise ValueError(f"token id out of range 0..{c.n_vocab - 1}")
        positions = np.arange(start_pos, start_pos + len(ids))
        x = self.w["token_embd.weight"][ids]
        if c.gemma:
            x = x * np.sqrt(c.n_embd)
        act = gelu_tanh if c.gemma else silu
        for layer in range(c.n_layer):
            p = f"blk.{layer}."
            h = rms_norm(x, self.w[p + "attn_norm.weight"], c.rms_eps)
            x = x + self._attention(layer, h, positions, state)
            h = rms_norm(x, self.w[p + "ffn_norm.weight"], c.rms_eps)
            gated = act(self._linear(h, p + "ffn_gate")) * self._linear(h, p + "ffn_up")
            f = self._linear(gated, p + "ffn_down")
            if c.gemma:
                f = rms_norm(f, self.w[p + "post_ffw_norm.weight"], c.rms_eps)
            x = x + f
        x = rms_norm(x, self.w["output_norm.weight"], c.rms_eps)
        logits = x @ self.output.T
        if c.final_logit_softcap > 0:
            logits = c.final_logit_softcap * np.tanh(logits / c.final_logit_softcap)
        return logits

    def greedy(self, prompt_ids: list[int], n: int) -> list[int]:
        """The n argmax tokens after the prompt (prefill once, then one decode step per token)."""
        state = self.new_state()
        logits = self.forward(list(prompt_ids), 0, state)
        generated: list[int] = []
        for _ in range(n):
            token = int(np.argmax(logits[-1]))
            generated.append(token)
            if len(generated) == n:
                break
            logits = self.forward([token], state.length, state)
        return generated
