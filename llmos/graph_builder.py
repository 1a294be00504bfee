"""Build the onnxruntime graph of a llama-family GGUF model.

One graph serves prefill, chunked prefill and batched decode: the KV cache lives in buffers the engine
owns ([batch, kv_heads, max_len, head_dim] per layer) and binds as both `past_*` and `present_*`, and
GroupQueryAttention writes the new positions in place. `logit_positions` picks which positions reach the
(49k-wide, expensive) head, so prefill computes one row of logits instead of hundreds.

Operators are onnxruntime's CPU-fast contrib ops: MatMulNBits (int4/int8 weights carried from the GGUF,
see quant.py), GroupQueryAttention (rotary inside), SimplifiedLayerNormalization and its Skip variant.
With `native_ops` (the op names llmos's own library holds, engine/native_ops.py), matrices of the
types those ops read use them instead, their GGUF bytes regrouped 16 rows at a time (gguf_layouts.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmos.errors import UnsupportedModelError
from llmos.gguf_file import GGUFFile, LlamaHParams, TensorInfo
from llmos.gguf_layouts import LAYOUTS, X16Layout
from llmos.precision import PRECISIONS, Precision
from llmos.quant import PackedMatrix, dequantize, pack_matrix, source_bits

OPSET = 21
MS = "com.microsoft"
GGUF_DOMAIN = "llmos.gguf"  # llmos's native op library (engine/native_ops.py, native/gguf_ops.cc)
GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
BUILDER_VERSION = 10  # bump when the graph changes, so imports are redone
ALIGN = 4096  # weight offsets in the data file: page-aligned, so they can be mapped
INLINE_BYTES = 1024  # smaller initializers stay inside model.onnx


@dataclass
class BuildReport:
    """What the builder did, for the manifest and the import summary."""

    precision: Precision
    exact: bool = True  # False if any weight had to be re-rounded from floats
    corrected_matrices: int = 0  # matrices that carry a block-offset correction (Q4_1, Q5_1, K-quants)
    native_matrices: int = 0  # (fused) matrices on llmos's native ops rather than MatMulNBits
    native_ops: set[str] = field(default_factory=set)  # which of those ops the graph uses
    embedding: dict[str, dict[str, object]] = field(default_factory=dict)  # where the table's bytes are
    embedding_type: str = ""  # the table's GGUF type name when it is stored x16 (role "x16")
    notes: list[str] = field(default_factory=list)


class _Graph:
    """A thin accumulator of nodes and initializers with unique names.

    Initializers are streamed: each array's bytes go to the weight file the moment it is made (at a
    page-aligned offset, so onnxruntime and the engine can map them), and the graph keeps only a
    reference. Peak memory while importing is then about one tensor at a time, not the whole model
    several times over (protobuf copies, then serialisation).
    """

    def __init__(self, data: BinaryIO | None = None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = set()
        self.locations: dict[str, dict[str, object]] = {}  # name -> file, offset, length, dtype, shape
        self._data = data
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def init(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        self.names.add(name)
        if self._data is None or array.nbytes < INLINE_BYTES:
            self.inits.append(numpy_helper.from_array(array, name))
            return name
        offset = -self._data.tell() % ALIGN + self._data.tell()
        self._data.seek(offset)
        self._data.write(memoryview(array).cast("B"))
        t = onnx.TensorProto(
            name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype)
        )
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", array.nbytes)):
            t.external_data.add(key=key, value=str(value))
        self.inits.append(t)
        self.locations[name] = {
            "file": WEIGHTS_FILE,
            "offset": offset,
            "length": array.nbytes,
            "dtype": array.dtype.name,
            "shape": list(array.shape),
        }
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        n_out: int = 1,
        domain: str = "",
        out: list[str] | None = None,
        **attrs: object,
    ) -> list[str]:
        outputs = out or [self.name(f"{op_type}_out") for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outputs, name=self.name(op_type), domain=domain, **attrs)
        )
        return outputs

    def const(self, array: np.ndarray) -> str:
        return self.init(self.name("const"), array)


class LlamaGraphBuilder:
    def __init__(
        self,
        gguf: GGUFFile,
        precision: Precision,
        accuracy_level: int = 4,
        progress: Callable[[int, int], None] | None = None,
        data: BinaryIO | None = None,  # the weight file initializers stream into (None: kept in memory)
        native_ops: frozenset[str] = frozenset(),  # llmos.gguf ops to use (the library must load at run time)
    ) -> None:
        if precision not in PRECISIONS:
            raise UnsupportedModelError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.gguf = gguf
        self.hp: LlamaHParams = gguf.hparams()
        self.precision = precision
        self.accuracy_level = accuracy_level
        # GGUF type -> the native layout for it, for the ops the library holds (int4: the file's own bits)
        self.layouts: dict[int, X16Layout] = (
            {q: lay for q, lay in LAYOUTS.items() if lay.op in native_ops} if precision == "int4" else {}
        )
        self.progress = progress or (lambda _i, _n: None)  # (tensors read, tensors in the file)
        self._read: set[str] = set()
        self._n_tensors = len(gguf.tensor_names())
        self.g = _Graph(data)
        self.report = BuildReport(precision=precision)

    # -- weights ----------------------------------------------------------------------------------------
    def _tensor(self, name: str) -> TensorInfo:
        """A GGUF tensor, counted for progress the first time it is read: tensor by tensor, so a phone
        importing a 1B model sees the bar move every few hundred milliseconds, not once per layer."""
        if name not in self._read:
            self._read.add(name)
            self.progress(len(self._read), self._n_tensors)
        return self.gguf.tensor(name)

    def _bits_for(self, t: TensorInfo) -> int:
        """int8 precision: 8 bits. int4: the smallest container that holds the source exactly, 4 bits for
        4-bit types and 8 for types of 5 bits or more (Q5_x, Q6_K, Q8_0, IQ4) rather than re-rounding."""
        return 8 if self.precision == "int8" else source_bits(t)

    def _packs(self, names: list[str]) -> list[PackedMatrix | GgufRows]:
        """One or several matrices stacked on N (fused projections share their input), fused where they
        share a form. Parts of different types (a Q4_K_M file's Q4_K q/k beside a Q6_K v) stay apart:
        a common form (8 bits, 16-weight blocks) would hold them exactly too, but read more bytes per
        token than the sources do, and decode speed is bytes per token. With native ops, runs of matrices
        of one type that has a layout become one `GgufRows` when their rows come in groups of 16 (fused,
        else one by one); a matrix that does not fit goes to MatMulNBits."""
        if not self.layouts:
            return list(self._packs_int(names))
        out: list[PackedMatrix | GgufRows] = []
        rest: list[str] = []  # for MatMulNBits, in order
        rows = {n: self._tensor(n).shape[0] for n in names}

        def native(n: str) -> int | None:
            q = self._tensor(n).qtype
            return q if q in self.layouts else None

        for qtype, run_iter in groupby(names, key=native):
            run = list(run_iter)
            if qtype is None:
                rest += run
                continue
            for group in [run] if sum(rows[n] for n in run) % 16 == 0 else [[n] for n in run]:
                if sum(rows[n] for n in group) % 16:
                    rest += group
                    continue
                out += self._packs_int(rest)
                rest = []
                out.append(self._gguf_rows(group, self.layouts[qtype]))
        return out + self._packs_int(rest)

    def _gguf_rows(self, names: list[str], layout: X16Layout) -> GgufRows:
        ts = [self._tensor(n) for n in names]
        rows = np.concatenate([np.asarray(t.data, dtype=np.uint8).reshape(t.shape[0], -1) for t in ts])
        for n in names:
            self.gguf.release(n)
        return GgufRows(n=rows.shape[0], k=ts[0].shape[1], data=layout.regroup(rows), layout=layout)

    def _packs_int(self, names: list[str]) -> list[PackedMatrix]:
        if not names:
            return []
        parts = [pack_matrix(self._tensor(n), self._bits_for(self._tensor(n))) for n in names]
        for n in names:
            self.gguf.release(n)
        if any(not p.exact for p in parts):
            self.report.exact = False
        groups: list[list[PackedMatrix]] = []
        for p in parts:
            if groups and (groups[-1][0].bits, groups[-1][0].block) == (p.bits, p.block):
                groups[-1].append(p)
            else:
                groups.append([p])
        return [_stack(g) for g in groups]

    def _block_indicator(self, k: int, block: int) -> str:
        """E [K, K/block] with E[i, b] = 1 when element i is in block b: x @ E gives the block sums."""
        name = f"block_indicator.{k}.{block}"
        if name not in self.g.names:
            e = np.zeros((k, k // block), dtype=np.float32)
            e[np.arange(k), np.arange(k) // block] = 1.0
            self.g.init(name, e)
        return name

    def _linear(self, x: str, names: list[str], tag: str) -> str:
        """y = x @ W^T for the stacked GGUF matrices `names` (each [N_i, K]); x is 2-D [tokens, K]."""
        g = self.g
        if self.precision == "fp32":
            w = np.concatenate([dequantize(self._tensor(n)) for n in names])  # [N, K]
            for n in names:
                self.gguf.release(n)
            return g.op("MatMul", [x, g.init(f"{tag}.weight", np.ascontiguousarray(w.T))])[0]
        packs = self._packs(names)
        outs = [
            self._gguf_matmul(x, p, t) if isinstance(p, GgufRows) else self._matmul_nbits(x, p, t)
            for i, p in enumerate(packs)
            for t in [tag if len(packs) == 1 else f"{tag}.{i}"]
        ]
        return outs[0] if len(outs) == 1 else g.op("Concat", outs, axis=-1)[0]

    def _gguf_matmul(self, x: str, p: GgufRows, tag: str) -> str:
        """y = x @ W^T on the native op for the type, from the GGUF's bytes (regrouped, not re-rounded)."""
        self.report.native_matrices += 1
        self.report.native_ops.add(p.layout.op)
        w = self.g.init(f"{tag}.x16", p.data)
        return self.g.op(p.layout.op, [x, w], domain=GGUF_DOMAIN, K=p.k, N=p.n)[0]

    def _matmul_nbits(self, x: str, p: PackedMatrix, tag: str) -> str:
        g = self.g
        y = g.op(
            "MatMulNBits",
            [x, g.init(f"{tag}.qweight", p.packed), g.init(f"{tag}.scales", p.scales)],
            domain=MS,
            K=p.k,
            N=p.n,
            bits=p.bits,
            block_size=p.block,
            accuracy_level=self.accuracy_level,
        )[0]
        if p.correction is None:
            return y
        # Block offsets (Q4_1, Q5_1, K-quant mins): y += blocksum(x) @ C^T with C = o + s*(z - off) per
        # block (see quant.py). The block sums are of the exact activations, so this term adds no rounding
        # of its own; Gemm folds the add.
        self.report.corrected_matrices += 1
        sums = g.op("MatMul", [x, self._block_indicator(p.k, p.block)])[0]
        ct = g.init(f"{tag}.correction", np.ascontiguousarray(p.correction.T))
        return g.op("Gemm", [sums, ct, y])[0]

    def _bias(self, y: str, names: list[str], tag: str) -> str:
        if not self.hp.attention_bias:
            return y
        b = np.concatenate([dequantize(self._tensor(n)).reshape(-1) for n in names])
        return self.g.op("Add", [y, self.g.init(f"{tag}.bias", b)])[0]

    # -- graph --------------------------------------------------------------------------------------------
    def _embedding_table(self) -> tuple[PackedMatrix | GgufRows | None, str]:
        """Store the token embedding table; the engine looks rows up itself (see engine/embedding.py).

        The lookup happens outside the graph, from a memory map of this initializer's bytes, so only the
        rows of tokens actually seen become resident, while a tied head reads the same initializer (one
        copy on disk; onnxruntime keeps only its prepacked form in memory). When a native op reads the
        table's type (and the vocabulary comes in groups of 16 rows), the table is the GGUF's own bytes,
        x16, and the engine decodes looked-up rows itself (`embedding_type` names the type); else 8-bit
        rows for MatMulNBits.
        """
        t = self._tensor("token_embd.weight")
        if self.precision == "fp32":
            return None, self.g.init("token_embd.weight", dequantize(t))
        layout = self.layouts.get(t.qtype)
        if layout is not None and t.shape[0] % 16 == 0:
            rows = self._gguf_rows([t.name], layout)
            self.report.embedding_type = t.qtype.name
            return rows, self.g.init("token_embd.x16", rows.data)
        p = pack_matrix(t, 8)  # 8-bit rows need no nibble unpacking; exact for every integer type
        self.gguf.release(t.name)
        if not p.exact:
            self.report.exact = False
        self.g.init("token_embd.scales", p.scales)  # [V, nb]
        if p.correction is not None:
            self.g.init("token_embd.correction", p.correction)
        return p, self.g.init("token_embd.qweight", p.packed)  # [V, nb, 32]

    def _head(self, x: str, emb_packed: PackedMatrix | GgufRows | None, emb_name: str | None) -> str:
        g, hp = self.g, self.hp
        if not hp.tied_embeddings:  # output.weight: a native op when its type has one, as every matrix
            return self._linear(x, ["output.weight"], "lm_head")
        if isinstance(emb_packed, GgufRows):  # the native op reads the x16 table itself: one copy
            self.report.native_matrices += 1
            self.report.native_ops.add(emb_packed.layout.op)
            return g.op(
                emb_packed.layout.op, [x, emb_name], domain=GGUF_DOMAIN, K=emb_packed.k, N=emb_packed.n
            )[0]
        if self.precision == "fp32":
            # Gemm with transB reads the embedding table itself: one copy of the tied weights.
            flat = g.op("Reshape", [x, g.const(np.array([-1, hp.n_embd], dtype=np.int64))])[0]
            y = g.op("Gemm", [flat, emb_name], transB=1)[0]
            shape = g.op(
                "Concat",
                [
                    g.op(
                        "Slice",
                        [
                            g.op("Shape", [x])[0],
                            g.const(np.array([0], np.int64)),
                            g.const(np.array([2], np.int64)),
                        ],
                    )[0],
                    g.const(np.array([hp.n_vocab], dtype=np.int64)),
                ],
                axis=0,
            )[0]
            return g.op("Reshape", [y, shape])[0]
        assert emb_packed is not None and emb_name is not None
        # The head is the embedding table read as MatMulNBits weights: the same initializer, one copy.
        y = g.op(
            "MatMulNBits",
            [x, emb_name, "token_embd.scales"],
            domain=MS,
            K=hp.n_embd,
            N=hp.n_vocab,
            bits=8,
            block_size=emb_packed.block,
            accuracy_level=self.accuracy_level,
        )[0]
        if emb_packed.correction is not None:
            sums = g.op("MatMul", [x, self._block_indicator(hp.n_embd, emb_packed.block)])[0]
            ct = g.init("lm_head.correction", np.ascontiguousarray(emb_packed.correction.T))
            y = g.op("Add", [y, g.op("MatMul", [sums, ct])[0]])[0]
        return y

    def _rope_cache(self, local: bool = False) -> tuple[str, str]:
        """cos/sin [context, head_dim/2] for GroupQueryAttention: the angle of position p and frequency i
        is p * freq_scale * theta^(-2i/head_dim) / factor[i], as ggml_rope_ext computes it without YaRN.
        Global layers use the file's base, linear scaling and llama 3.x `rope_freqs` factors; gemma3's
        sliding-window layers their own base, unscaled (llama.cpp's rope_freq_*_train_swa)."""
        hp = self.hp
        if local:
            name, theta, scale, factors = "rope_local", hp.rope_theta_local, 1.0, None
        else:
            name, theta, scale, factors = "rope", hp.rope_theta, hp.rope_freq_scale, hp.rope_freq_factors
        if any(t.name == f"{name}.cos" for t in self.g.inits):
            return f"{name}.cos", f"{name}.sin"
        half = hp.head_dim // 2
        inv_freq = 1.0 / (theta ** (np.arange(0, half, dtype=np.float64) * 2.0 / hp.head_dim))
        if factors is not None:
            inv_freq = inv_freq / np.asarray(factors, dtype=np.float64)
        angles = np.outer(np.arange(hp.context_length, dtype=np.float64) * scale, inv_freq)
        return (
            self.g.init(f"{name}.cos", np.cos(angles).astype(np.float32)),
            self.g.init(f"{name}.sin", np.sin(angles).astype(np.float32)),
        )

    def _norm_weight(self, name: str) -> str:
        return self.g.init(name, dequantize(self._tensor(name)))

    def _rms_norm(self, x: str, weight_name: str) -> str:
        return self.g.op(
            "SimplifiedLayerNormalization",
            [x, self._norm_weight(weight_name)],
            axis=-1,
            epsilon=float(self.hp.rms_eps),
            stash_type=1,
        )[0]

    def _qk_norm(self, qkv: str, p: str) -> str:
        """qwen3, gemma3: an RMS norm over each head of q and of k (weights [head_dim]) before the rotary
        GroupQueryAttention applies; v passes through. [tokens, q_dim + 2 kv_dim] in and out, so the
        packed input, the KV cache and the engine stay as they are."""
        g, hp = self.g, self.hp
        kv = hp.n_head_kv * hp.head_dim
        q, k, v = g.op("Split", [qkv, g.const(np.array([hp.q_dim, kv, kv], np.int64))], n_out=3, axis=-1)
        per_head = g.const(np.array([-1, hp.head_dim], np.int64))
        normed = []
        for x, name, width in ((q, "attn_q_norm", hp.q_dim), (k, "attn_k_norm", kv)):
            y = self._rms_norm(g.op("Reshape", [x, per_head])[0], f"{p}{name}.weight")
            normed.append(g.op("Reshape", [y, g.const(np.array([-1, width], np.int64))])[0])
        return g.op("Concat", [*normed, v], axis=-1)[0]

    def _ffn_activation(self, gate: str, up: str) -> str:
        g = self.g
        if self.hp.ffn_activation == "gelu_tanh":  # gemma: GELU, tanh approximation (ggml_gelu)
            act = g.op("Gelu", [gate], approximate="tanh")[0]
        else:
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])[0]  # SiLU
        return g.op("Mul", [act, up])[0]

    def _attention(self, normed: str, i: int, shape_3d: str) -> str:
        """Self-attention of layer i on 2-D [tokens, n_embd]: the output projection's input, 2-D."""
        g, hp = self.g, self.hp
        p = f"blk.{i}."
        qkv_names = [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"]
        qkv = self._bias(
            self._linear(normed, qkv_names, f"{p}attn_qkv"),
            [p + "attn_q.bias", p + "attn_k.bias", p + "attn_v.bias"],
            f"{p}attn_qkv",
        )
        if hp.qk_norm:
            qkv = self._qk_norm(qkv, p)
        local = i in hp.local_layers
        cos, sin = self._rope_cache(local)
        window: dict[str, object] = {}
        if local:
            # llama.cpp masks keys with q_pos - k_pos >= window, so a query sees `window` keys, itself
            # included; onnxruntime's local_window_size counts the same way (measured against the numpy
            # reference and llama.cpp, prefill and decode: tests/test_architectures.py)
            window["local_window_size"] = hp.sliding_window
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [
                g.op("Reshape", [qkv, shape_3d])[0],
                "",
                "",
                f"past_key.{i}",
                f"past_value.{i}",
                "seqlens_k",
                "total_sequence_length",
                cos,
                sin,
            ],
            domain=MS,
            out=[g.name("attn"), f"present_key.{i}", f"present_value.{i}"],
            num_heads=hp.n_head,
            kv_num_heads=hp.n_head_kv,
            do_rotary=1,
            # llama GGUFs permute Q/K rows for ggml's adjacent-pair rope; the others keep the NEOX halves.
            rotary_interleaved=1 if hp.rope_interleaved else 0,
            scale=hp.kq_scale,
            **window,
        )
        return g.op("Reshape", [attn, g.const(np.array([-1, hp.q_dim], dtype=np.int64))])[0]

    def build(self) -> onnx.ModelProto:
        g, hp = self.g, self.hp
        eps = float(hp.rms_eps)
        emb_packed, emb_name = self._embedding_table()
        # The layers work on 2-D [tokens, features]: the Q4_1 correction folds into one Gemm there, and
        # only attention needs the [batch, seq, features] view back.
        i64 = np.int64
        x = g.op("Reshape", ["inputs_embeds", g.const(np.array([-1, hp.n_embd], dtype=i64))])[0]
        if hp.embedding_scale != 1.0:  # gemma: the looked-up rows x sqrt(n_embd), in float32 as llama.cpp
            x = g.op("Mul", [x, g.const(np.array(hp.embedding_scale, dtype=np.float32))])[0]
        batch_seq = g.op(
            "Slice",
            [g.op("Shape", ["inputs_embeds"])[0], g.const(np.array([0], i64)), g.const(np.array([2], i64))],
        )[0]
        shape_3d = g.op("Concat", [batch_seq, g.const(np.array([-1], dtype=i64))], axis=0)[0]
        residual: str | None = None
        branch = x  # the output of the previous sub-block, not yet added to the residual stream
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            attn_norm = self._norm_weight(f"{p}attn_norm.weight")
            if residual is None:
                normed = g.op(
                    "SimplifiedLayerNormalization", [branch, attn_norm], axis=-1, epsilon=eps, stash_type=1
                )[0]
                residual = branch
            else:
                normed, _, _, residual = g.op(
                    "SkipSimplifiedLayerNormalization",
                    [branch, residual, attn_norm],
                    n_out=4,
                    domain=MS,
                    epsilon=eps,
                )
            attn = self._attention(normed, i, shape_3d)
            o = self._linear(attn, [p + "attn_output.weight"], f"{p}attn_output")
            if hp.post_norms:  # gemma: the sub-block's output is normed before it joins the residual
                o = self._rms_norm(o, f"{p}post_attention_norm.weight")
            ffn_norm = self._norm_weight(f"{p}ffn_norm.weight")
            normed, _, _, residual = g.op(
                "SkipSimplifiedLayerNormalization", [o, residual, ffn_norm], n_out=4, domain=MS, epsilon=eps
            )
            gate_up = self._linear(normed, [p + "ffn_gate.weight", p + "ffn_up.weight"], f"{p}ffn_gate_up")
            gate, up = g.op("Split", [gate_up], n_out=2, axis=-1, num_outputs=2)
            branch = self._linear(self._ffn_activation(gate, up), [p + "ffn_down.weight"], f"{p}ffn_down")
            if hp.post_norms:
                branch = self._rms_norm(branch, f"{p}post_ffw_norm.weight")
        assert residual is not None
        # Only the positions asked for reach the final norm and the head.
        idx = g.op("Unsqueeze", ["logit_positions", g.const(np.array([-1], dtype=i64))])[0]
        branch = g.op("GatherND", [g.op("Reshape", [branch, shape_3d])[0], idx], batch_dims=1)[0]
        residual = g.op("GatherND", [g.op("Reshape", [residual, shape_3d])[0], idx], batch_dims=1)[0]
        out_norm = self._norm_weight("output_norm.weight")
        final, _, _, _ = g.op(
            "SkipSimplifiedLayerNormalization", [branch, residual, out_norm], n_out=4, domain=MS, epsilon=eps
        )
        logits = self._head(final, emb_packed, emb_name)
        if hp.final_logit_softcap > 0:  # gemma2-style: c * tanh(logits / c)
            c = np.float32(hp.final_logit_softcap)
            scaled = g.op("Mul", [logits, g.const(np.array(1.0 / c, dtype=np.float32))])[0]
            logits = g.op("Mul", [g.op("Tanh", [scaled])[0], g.const(np.array(c, dtype=np.float32))])[0]
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))
        return self._model()

    def _model(self) -> onnx.ModelProto:
        hp = self.hp
        kv_shape = ["batch", hp.n_head_kv, "max_len", hp.head_dim]
        inputs = [
            helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", hp.n_embd]),
            helper.make_tensor_value_info("logit_positions", TensorProto.INT64, ["batch", "n_logits"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ]
        outputs = [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "n_logits", hp.n_vocab])
        ]
        for i in range(hp.n_layer):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", TensorProto.FLOAT, kv_shape))
                outputs.append(
                    helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, kv_shape)
                )
        graph = helper.make_graph(self.g.nodes, "llmos_llama", inputs, outputs, self.g.inits)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
        if self.report.native_matrices:
            opsets.append(helper.make_opsetid(GGUF_DOMAIN, 1))
        model = helper.make_model(
            graph,
            opset_imports=opsets,
            producer_name="llmos",
            producer_version=str(BUILDER_VERSION),
        )
        model.ir_version = 10
        # Initializers no node reads (the embedding table of an untied model) are still written to the
        # data file for the engine's lookup; onnxruntime ignores them.
        self.progress(self._n_tensors, self._n_tensors)  # tensors the graph does not read (rope_freqs, ...)
        return model


EMBEDDING_TENSORS = {
    "token_embd.x16": "x16",  # the GGUF's rows regrouped for a native op (gguf_layouts), of embedding_type
    "token_embd.qweight": "qweight",
    "token_embd.scales": "scales",
    "token_embd.correction": "correction",
    "token_embd.weight": "weight",
}


def build_onnx(
    gguf: GGUFFile,
    precision: Precision,
    out_dir: str | os.PathLike[str],
    progress: Callable[[int, int], None] | None = None,
    native_ops: frozenset[str] = frozenset(),
) -> BuildReport:
    """Build and write `model.onnx` + `model.onnx.data` into `out_dir` (which the caller makes atomic)."""
    out = Path(out_dir)
    with open(out / WEIGHTS_FILE, "wb") as data:
        builder = LlamaGraphBuilder(gguf, precision, progress=progress, data=data, native_ops=native_ops)
        model = builder.build()
    onnx.save_model(model, str(out / GRAPH_FILE))  # the graph and small constants; weights are written
    locations = builder.g.locations
    builder.report.embedding = {
        role: locations[name] for name, role in EMBEDDING_TENSORS.items() if name in locations
    }
    return builder.report


@dataclass
class GgufRows:
    """Matrices of one GGUF type stacked on N, their bytes in the native op's x16 layout (gguf_layouts)."""

    n: int
    k: int
    data: np.ndarray  # uint8 [N, K/qk*blk]
    layout: X16Layout


def _stack(parts: list[PackedMatrix]) -> PackedMatrix:
    """Matrices of one form stacked on N: one MatMulNBits for all (a correction of zeros where needed)."""
    if len(parts) == 1:
        return parts[0]
    corr = None
    if any(p.correction is not None for p in parts):
        corr = np.concatenate(
            [p.correction if p.correction is not None else np.zeros_like(p.scales) for p in parts]
        )
    return PackedMatrix(
        n=sum(p.n for p in parts),
        k=parts[0].k,
        bits=parts[0].bits,
        block=parts[0].block,
        packed=np.concatenate([p.packed for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        correction=corr,
        exact=all(p.exact for p in parts),
    )
