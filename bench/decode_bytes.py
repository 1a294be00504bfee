"""Weight bytes one decode step must read, for llama.cpp (from the GGUF) and for llmos (from its graph).

Decode at batch 1 is bound by memory traffic: every weight matrix is read once per token, and the
caches are far smaller than the model. These figures are *computed* from the files, not counted by
hardware; bench/engine_sizes.py sets them beside a measured resident-set growth at load as a check.

* llama.cpp reads the GGUF tensors as stored (its CPU repacking, e.g. Q4_0 -> q4_0_8x8, interleaves
  blocks without changing their size). The token embedding table counts only when it is also the output
  head (tied embeddings); otherwise a step reads one row of it, which is not counted.
* llmos runs onnxruntime. A MatMulNBits weight is prepacked by MLAS at session creation; with
  accuracy_level 4 (int8 compute, the int4 graph's setting) the packed form is the 4- or 8-bit data,
  fp32 scales per block, and fp32 per-block "BlkSum" terms with N rounded up to 16
  (onnxruntime/core/mlas/lib/qnbitgemm.h, PackedQuantBDataStruct). llmos's native ops (domain
  `llmos.gguf`, one per GGUF type, used when their library was available at import) read their
  initializer as stored: the GGUF's own bytes per block, regrouped 16 rows at a time. Every other
  initializer a node reads counts in full (norms, block-offset corrections, block indicators), once,
  except tables only looked up by row: GroupQueryAttention's rotary cos/sin caches and Gather data.
  The embedding lookup happens outside the graph (a memory map, one row per token), so an untied
  model's table is not read by the graph at all.
  Not counted: a second fp32 correction array MLAS adds for some 8-bit kernels whose activations are
  quantized unsigned (QuantAUnsigned), when this onnxruntime chooses one.

KV reads are a separate, position-dependent term (`kv_bytes_per_token`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any


def gguf_decode_bytes(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Bytes of the GGUF tensors a llama.cpp decode step reads, with a breakdown by GGML type."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    by_type: dict[str, int] = defaultdict(int)
    skipped = 0
    for t in reader.tensors:
        n = int(t.n_bytes)
        if t.name == "token_embd.weight" and not tied:
            skipped += n
            continue
        by_type[t.tensor_type.name] += n
    return {
        "bytes": sum(by_type.values()),
        "by_type": dict(by_type),
        "tied_embeddings": tied,
        "not_read_embedding_bytes": skipped,
        "file_bytes": os.path.getsize(path),
    }


def _np_itemsize(data_type: int) -> int:
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(data_type).itemsize


def llmos_decode_bytes(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Bytes of weights an llmos decode step reads, from the built graph (see the module docstring)."""
    import onnx

    from llmos.graph_builder import GGUF_DOMAIN

    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def nbytes(name: str) -> int:
        t = inits[name]
        n = 1
        for d in t.dims:
            n *= int(d)
        return n * _np_itemsize(t.data_type)

    counted: set[str] = set()
    parts: dict[str, int] = defaultdict(int)
    lookup_only: dict[str, bool] = {}
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for j, name in enumerate(node.input):
            if name not in inits:
                continue
            is_lookup = (node.op_type == "GroupQueryAttention" and j in (7, 8)) or (
                node.op_type.startswith("Gather") and j == 0
            )
            lookup_only[name] = lookup_only.get(name, True) and is_lookup
        if node.domain == GGUF_DOMAIN:  # native: the initializer as stored, named by the op's type
            if node.input[1] in inits and node.input[1] not in counted:
                counted.add(node.input[1])
                kind = node.op_type.removeprefix("GgufMatMul").removesuffix("x16")
                parts[f"{kind} (native op)"] += nbytes(node.input[1])
            continue
        if node.op_type != "MatMulNBits":
            continue
        n, k, bits, block = int(attrs["N"]), int(attrs["K"]), int(attrs["bits"]), int(attrs["block_size"])
        nb = -(-k // block)
        weight, scales = node.input[1], node.input[2]
        if weight in counted:
            continue
        counted.update((weight, scales))
        parts[f"int{bits} weights"] += n * nb * block * bits // 8
        parts["fp32 scales"] += n * nb * 4
        if int(attrs.get("accuracy_level", 0)) == 4:
            parts["fp32 BlkSum"] += -(-n // 16) * 16 * nb * 4
        if len(node.input) > 3 and node.input[3] in inits:
            counted.add(node.input[3])
            parts["zero points"] += nbytes(node.input[3])
    for name, only_lookup in lookup_only.items():
        if name in counted or only_lookup:
            continue
        counted.add(name)
        if name.endswith(".correction"):
            kind = "fp32 block-offset corrections"
        else:
            kind = "other (norms, indicators, ...)"
        parts[kind] += nbytes(name)
    native: dict[str, int] = defaultdict(int)
    for node in graph.node:
        if node.domain == GGUF_DOMAIN:
            native[node.op_type.removeprefix("GgufMatMul").removesuffix("x16")] += 1
    return {
        "bytes": sum(parts.values()),
        "parts": dict(parts),
        "matmulnbits_nodes": sum(n.op_type == "MatMulNBits" for n in graph.node),
        "native_nodes": dict(native),  # per GGUF type: nodes on llmos's native op
    }


def kv_bytes_per_token(n_layer: int, n_head_kv: int, head_dim: int, position: int, itemsize: int) -> int:
    """K and V bytes one decode step reads at `position` (every earlier position's keys and values)."""
    return 2 * n_layer * n_head_kv * head_dim * itemsize * position
