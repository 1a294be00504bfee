"""A plain numpy llama/qwen2 forward pass: the definition of "correct" for every llmos engine test.

Written from the GGUF directly (gguf-py's reader and dequantizer, nothing from llmos), in float64, and
following llama.cpp's semantics step by step:

  x = token_embd[ids]
  per layer:  h = rmsnorm(x) * attn_norm
              q, k, v = h @ Wq.T (+bq), h @ Wk.T (+bk), h @ Wv.T (+bv)      # biases: qwen2 only
              rotary on q, k at absolute positions: llama rotates ADJACENT pairs (x[2i], x[2i+1])
                (LLAMA_ROPE_TYPE_NORM), qwen2 HALF-SPLIT pairs (x[i], x[i+hd/2]) (NEOX), by the angle
                pos * theta^(-2i/head_dim)
              grouped-query attention: query head h reads kv head h // (n_head / n_head_kv),
                causal, scores scaled by 1/sqrt(head_dim)
              x = x + attn @ Wo.T
              h = rmsnorm(x) * ffn_norm;  x = x + Wdown @ (silu(Wgate h) * Wup h)
  logits = (rmsnorm(x) * output_norm) @ output.T, output = token_embd when output.weight is absent
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

    @property
    def neox_rope(self) -> bool:
        """qwen2 rotates half-split pairs (NEOX); llama rotates adjacent pairs (NORM)."""
        return self.architecture == "qwen2"

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
        return cls(
            architecture=arch,
            n_layer=int(meta(f"{arch}.block_count")),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(meta(f"{arch}.attention.head_count_kv", n_head)),
            head_dim=n_embd // n_head,
            n_vocab=weights["token_embd.weight"].shape[0],
            rope_theta=float(meta(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
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


def apply_rope(x: np.ndarray, positions: np.ndarray, theta: float, neox: bool) -> np.ndarray:
    """Rotate x [n_heads, n_pos, head_dim] at absolute `positions` the way llama.cpp does."""
    hd = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # theta^(-2i/hd), i < hd/2
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [n_pos, hd/2]
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
        q = apply_rope(q, positions, c.rope_theta, c.neox_rope)
        k = apply_rope(k, positions, c.rope_theta, c.neox_rope)
        if layer < len(state.keys):
            state.keys[layer] = np.concatenate([state.keys[layer], k], axis=1)
            state.values[layer] = np.concatenate([state.values[layer], v], axis=1)
        else:
            state.keys.append(k)
            state.values.append(v)
        keys, values = state.keys[layer], state.values[layer]
        key_pos = np.arange(keys.shape[1])
        masked = key_pos[None, :] > positions[:, None]  # [n_new, n_total]: a query sees keys at <= its pos
        group = c.n_head // c.n_head_kv
        out = np.empty((n_new, c.n_head, c.head_dim))
        for head in range(c.n_head):
            kv = head // group
            scores = q[head] @ keys[kv].T / np.sqrt(c.head_dim)
            scores = np.where(masked, -np.inf, scores)
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            out[:, head] = probs @ values[kv]
        return self._linear(out.reshape(n_new, c.n_head * c.head_dim), p + "attn_output")

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
        for layer in range(c.n_layer):
            p = f"blk.{layer}."
            h = rms_norm(x, self.w[p + "attn_norm.weight"], c.rms_eps)
            x = x + self._attention(layer, h, positions, state)
            h = rms_norm(x, self.w[p + "ffn_norm.weight"], c.rms_eps)
            gated = silu(self._linear(h, p + "ffn_gate")) * self._linear(h, p + "ffn_up")
            x = x + self._linear(gated, p + "ffn_down")
        x = rms_norm(x, self.w["output_norm.weight"], c.rms_eps)
        return x @ self.output.T

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
