"""llmos's native ops for the 32-weight block types Q8_0, Q5_0 and Q4_1, and the embedding table on them.

Each op is checked against a float64 product of the exact weights (`gguf`'s own dequantization of random
blocks, every bit pattern) with activations rounded to int8 per block of 32, as the op rounds them, at
decode (M = 1, 7) and prefill sizes. Then tiny llamas quantized by llama.cpp's own quantizer (Q8_0, and
Q5_0 with a Q8_0 tied embedding) are imported with the ops and for MatMulNBits: logits as close to the
exact fp32 graph, the same greedy tokens, and embedding rows equal to what the GGUF dequantizes.

`LLMOS_GGUF_OPS` may name another build of the library (e.g. one compiled with AVX2-only flags) to run
these tests against its code path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from onnx import TensorProto, helper, numpy_helper

from llmos.engine import native_ops
from llmos.engine.embedding import EmbeddingTable
from llmos.engine.llm_engine import LLMEngine
from llmos.gguf_file import GGUFFile, TensorInfo
from llmos.gguf_layouts import LAYOUTS as IMPORT_LAYOUTS
from llmos.gguf_layouts import Q4_1_LAYOUT, _interleave, gguf_rows, q4_0_x16
from llmos.manifest import ModelManifest
from llmos.model_store import ModelStore
from llmos.quant import dequantize, dequantize_rows, int_blocks
from llmos.tiny_model import write_random_gguf

TYPES = [Q.Q8_0, Q.Q5_0, Q.Q4_1]
LAYOUTS = {**IMPORT_LAYOUTS, Q.Q4_1: Q4_1_LAYOUT}  # Q4_1's op is tested, not yet used by import
SCALES = {Q.Q8_0: (0,), Q.Q5_0: (0,), Q.Q4_1: (0, 2)}  # byte offsets of the fp16 fields of a block
TOKENS = [int(t) for t in np.random.default_rng(0).integers(3, 1000, 48)]
missing_reason = native_ops.unavailable_reason()
needs_op = pytest.mark.skipif(
    missing_reason is not None, reason=f"native op library not built ({missing_reason}; scripts/setup.sh)"
)


def random_rows(qtype: Q, n: int, k: int, seed: int) -> np.ndarray:
    """GGUF rows [n, k/32*blk] of random blocks (every bit pattern) with sane fp16 scales written in."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for off in SCALES[qtype]:
        raw[..., off : off + 2] = (
            (rng.standard_normal((n, k // block, 1)) * 0.02).astype(np.float16).view(np.uint8)
        )
    return raw.reshape(n, -1)


def weights(qtype: Q, raw: np.ndarray) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    return dequantize(TensorInfo("w", qtype, (raw.shape[0], raw.shape[1] // size * block), raw))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_x16_layouts_only_move_the_bytes(qtype: Q) -> None:
    layout = LAYOUTS[qtype]
    raw = random_rows(qtype, 48, 96, 1)
    x16 = layout.regroup(raw)
    assert x16.shape == raw.shape and sorted(x16.ravel()) == sorted(raw.ravel())
    assert (layout.ungroup(x16) == raw).all()
    ids = np.array([[47, 0, 3], [16, 16, 33]])
    assert (gguf_rows(layout, x16, ids) == raw[ids]).all()
    # group 1, block 2, row 5: its scale(s) at 2*5 of each 32-byte scale field, then its quant bytes
    g = x16.reshape(3, 3, 16 * layout.blk)[1, 2]
    row = raw[16 + 5].reshape(3, layout.blk)[2]
    assert bytes(g[10:12]) == bytes(row[0:2])
    assert bytes(g[-64 + 20 : -64 + 24]) == bytes(row[-4:])  # the last chunk: the row's last 4 bytes
    with pytest.raises(ValueError):
        layout.regroup(raw[:8])


def test_the_generic_interleave_is_q4_0s_layout() -> None:
    raw = random_rows(Q.Q5_0, 32, 64, 2)[:, : 2 * 18]  # any bytes: 32 rows of 2 Q4_0 blocks
    assert (_interleave(raw, ((2, 2), (16, 4)), "Q4_0") == q4_0_x16(raw)).all()


@pytest.mark.parametrize("qtype", [*TYPES, Q.Q4_0, Q.Q6_K, Q.F16], ids=lambda q: q.name)
def test_dequantize_rows_is_what_gguf_dequantizes(qtype: Q) -> None:
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(3)
    if qtype == Q.F16:
        raw = (rng.standard_normal((5, 512)).astype(np.float16)).view(np.uint8)
    elif qtype == Q.Q6_K:
        raw = rng.integers(0, 256, (5, 2, size), dtype=np.uint8)
        raw[..., 208:210] = (rng.standard_normal((5, 2, 1)) * 0.01).astype(np.float16).view(np.uint8)
        raw = raw.reshape(5, -1)
    else:
        raw = random_rows(qtype if qtype in SCALES else Q.Q8_0, 5, 512, 3)[:, : 512 // block * size]
        if qtype == Q.Q4_0:
            raw.reshape(5, -1, size)[..., 0:2] = (
                (rng.standard_normal((5, 16, 1)) * 0.01).astype(np.float16).view(np.uint8)
            )
    w = dequantize_rows(qtype, raw)
    assert w.dtype == np.float32 and np.array_equal(w, weights(qtype, raw))


def q8_reference(x: np.ndarray, w: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """x @ w.T with x rounded to int8 per block of 32, as the op (and llama.cpp's q8_0) rounds it; the
    part of w that is a per-block constant `offset` [N, K/32], if given, times the exact x's block sums."""
    xb = x.reshape(*x.shape[:-1], -1, 32)
    d = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
    q = np.rint(xb / np.where(d == 0, 1, d))
    xr = (q * d).reshape(x.shape).astype(np.float64)
    if offset is None:
        return xr @ w.T.astype(np.float64)
    o = np.repeat(offset.astype(np.float64), 32, axis=-1)  # [N, K]
    return xr @ (w.astype(np.float64) - o).T + x.astype(np.float64) @ o.T


def op_session(qtype: Q, x16: np.ndarray, n: int, k: int):  # -> ort.InferenceSession
    import onnxruntime as ort

    node = helper.make_node(LAYOUTS[qtype].op, ["x", "w"], ["y"], domain=native_ops.DOMAIN, K=k, N=n)
    graph = helper.make_graph(
        [node],
        "op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(x16, "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(native_ops.DOMAIN, 1)]
    )
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    native_ops.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@needs_op
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 64)])
def test_op_computes_the_product_of_the_exact_weights(qtype: Q, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(4)
    n, k = 80, 352  # 5 groups of 16 rows, 11 blocks
    raw = random_rows(qtype, n, k, 5)
    x = rng.standard_normal((*shape, k)).astype(np.float32)
    y = op_session(qtype, LAYOUTS[qtype].regroup(raw), n, k).run(None, {"x": x})[0]
    assert y.shape == (*shape, n)
    blocks = int_blocks(TensorInfo("w", qtype, (n, k), raw))
    assert blocks is not None
    # Q4_1: the op meets rounded activations with d (q - 8) and exact ones with m + 8 d (as MatMulNBits)
    ref = q8_reference(x, weights(qtype, raw), None if blocks.o is None else blocks.o + 8 * blocks.s)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()  # float32 sums of the same integers


@needs_op
def test_q8_0_op_is_exact_for_every_int8_including_minus_128() -> None:
    n, k = 16, 64
    raw = random_rows(Q.Q8_0, n, k, 6).reshape(n, 2, 34)
    raw[..., 2:] = np.tile(np.arange(256, dtype=np.uint8), 4).reshape(n, 2, 32)  # every int8 value
    raw = raw.reshape(n, -1)
    x = -np.abs(np.random.default_rng(7).standard_normal((1, 1, k))).astype(np.float32)  # all negative
    y = op_session(Q.Q8_0, LAYOUTS[Q.Q8_0].regroup(raw), n, k).run(None, {"x": x})[0]
    ref = q8_reference(x, weights(Q.Q8_0, raw))
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


# -- tiny models quantized by llama.cpp ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama (width 224: not a multiple of 256, so llama.cpp makes the tied embedding Q8_0, as for
    real 0.5B models) quantized to Q8_0 and to Q5_0; and an untied one (its own Q8_0 output.weight)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's quantizer makes the files")
    d = tmp_path_factory.mktemp("q32")
    shape = dict(arch="llama", n_embd=224, n_ff=448, n_head=7, n_head_kv=1, n_layer=2, n_vocab=1024, seed=11)
    out = {}
    for name, tied in (("Q8_0", True), ("Q5_0", True), ("Q8_0-untied", False)):
        src = write_random_gguf(d / f"f32-{tied}.gguf", tied_embeddings=tied, **shape)  # type: ignore[arg-type]
        dst = d / f"{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name[:4]}")
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
        out[name] = dst
    return out


@pytest.fixture(scope="module")
def imports(files: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """Each file imported with the ops (when built), for MatMulNBits, and as the exact fp32 graph."""
    out: dict[str, dict[str, Path]] = {}
    for ftype, path in files.items():
        store = ModelStore(path.parent / f"store-{ftype}")
        out[ftype] = {"fp32": store.import_gguf(path, precision="fp32", name="exact")}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(native_ops.ENV, str(path.parent / "no-such-library.so"))
            out[ftype]["nbits"] = store.import_gguf(path, precision="int4", name="nbits")
        if missing_reason is None:
            out[ftype]["native"] = store.import_gguf(path, precision="int4", name="native")
    return out


def logits(model_dir: Path) -> np.ndarray:
    engine = LLMEngine(model_dir, threads=2)
    cache = engine.pool.allocate()
    try:
        return engine.runner.prefill(cache, TOKENS, all_logits=True).astype(np.float64)
    finally:
        cache.free()


def greedy(model_dir: Path, prompt: list[int], steps: int) -> list[int]:
    engine = LLMEngine(model_dir, threads=2)
    cache = engine.pool.allocate()
    try:
        out = [int(engine.runner.prefill(cache, prompt).argmax())]
        for _ in range(steps - 1):
            out.append(int(engine.runner.decode([cache], [out[-1]])[0].argmax()))
        return out
    finally:
        cache.free()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@needs_op
@pytest.mark.parametrize("ftype", ["Q8_0", "Q5_0", "Q8_0-untied"])
def test_native_import_follows_the_exact_graph_like_matmul_nbits(
    files: dict[str, Path], imports: dict[str, dict[str, Path]], ftype: str
) -> None:
    m = ModelManifest.read(imports[ftype]["native"])
    qtype = Q[ftype[:4]]
    assert m.exact_weights and m.embedding_type == "Q8_0" and set(m.embedding) == {"x16"}
    assert m.native_ops == sorted({LAYOUTS[qtype].op, LAYOUTS[Q.Q8_0].op})
    graph = onnx.load(str(imports[ftype]["native"] / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "MatMulNBits" not in ops  # every matrix and the tied head on the native ops
    # per layer: fused q/k/v, o, fused gate/up, down; and the head (the x16 table, or output.weight)
    assert ops.count(LAYOUTS[Q.Q8_0].op) == (0 if ftype == "Q5_0" else 8) + 1
    # the model is the GGUF's size on disk (both hold the same blocks, plus norms and rope tables)
    size = (imports[ftype]["native"] / "model.onnx.data").stat().st_size
    assert size <= 1.02 * files[ftype].stat().st_size + (1 << 20), (size, files[ftype].stat().st_size)
    native, nbits, exact = (logits(imports[ftype][k]) for k in ("native", "nbits", "fp32"))
    off_native = (1 - cosine(native, exact)).max()
    off_nbits = (1 - cosine(nbits, exact)).max()
    assert off_native <= max(2e-4, 1.5 * off_nbits), (off_native, off_nbits)
    # same greedy choices as MatMulNBits (both round activations to int8 per 32), and as often the exact
    # graph's (the untied model has one near-tie that both settle the other way)
    assert (native.argmax(-1) == nbits.argmax(-1)).all()
    assert (native.argmax(-1) == exact.argmax(-1)).mean() >= min(
        0.97, (nbits.argmax(-1) == exact.argmax(-1)).mean()
    )
    prompt = TOKENS[:9]
    assert greedy(imports[ftype]["native"], prompt, 12) == greedy(imports[ftype]["nbits"], prompt, 12)


@needs_op
def test_embedding_rows_from_the_x16_table_are_the_ggufs(
    files: dict[str, Path], imports: dict[str, dict[str, Path]]
) -> None:
    model = imports["Q5_0"]["native"]
    m = ModelManifest.read(model)
    table = EmbeddingTable(model, m.embedding, m.embedding_type)
    t = GGUFFile(files["Q5_0"]).tensor("token_embd.weight")
    assert t.qtype == Q.Q8_0
    ref = dequantize(t)
    ids = np.array([[0, 1023, 17], [17, 500, 2]])
    assert np.array_equal(table.lookup(ids), ref[ids])
    fp32 = EmbeddingTable(imports["Q5_0"]["fp32"], ModelManifest.read(imports["Q5_0"]["fp32"]).embedding)
    assert np.array_equal(fp32.lookup(ids), ref[ids])
