"""llmos's native K-quant ops (llmos/native/q6_k.cc, q4_k.cc) and their x16 layouts.

The layouts only move the GGUF's bytes (round trip, and chosen rows read back for embedding lookups);
the ops compute the product of the exact GGUF weights with activations rounded to int8 per 32, checked
against a float64 reference at decode (M=1), small-batch and prefill sizes; and tiny random-weight
llamas quantized by llama.cpp's own quantizer to Q4_K_M and Q6_K, imported with the ops, follow the exact
fp32 graph at least as closely as the MatMulNBits import of the same file, with the same greedy tokens.
The op tests skip, with the reason, only when the library was not built here.
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
from llmos.engine.llm_engine import LLMEngine
from llmos.gguf_file import GGUFFile, TensorInfo
from llmos.gguf_layouts import LAYOUTS, gguf_rows
from llmos.manifest import ModelManifest
from llmos.model_store import ModelStore
from llmos.quant import dequantize, dequantize_rows
from llmos.tiny_model import write_random_gguf

KQUANTS = [Q.Q6_K, Q.Q4_K]
FP16_FIELDS = {Q.Q6_K: (208,), Q.Q4_K: (0, 2)}  # byte offsets of the fp16 scales inside a block
TOKENS = [int(t) for t in np.random.default_rng(0).integers(3, 1000, 48)]
missing_reason = native_ops.unavailable_reason()
needs_op = pytest.mark.skipif(
    missing_reason is not None, reason=f"native op library not built ({missing_reason}; scripts/setup.sh)"
)


def random_rows(qtype: Q, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random GGUF rows [n, k/256*bytes] (every bit pattern is a valid block) with sane fp16 scales."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        raw[..., off : off + 2] = (
            (rng.standard_normal((n, k // block, 1)) * 0.01).astype(np.float16).view(np.uint8)
        )
    return raw.reshape(n, -1)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_x16_layout_only_moves_the_bytes(qtype: Q) -> None:
    layout = LAYOUTS[qtype]
    raw = random_rows(qtype, 48, 512)
    x16 = layout.regroup(raw)
    assert x16.shape == raw.shape and (np.sort(x16, axis=None) == np.sort(raw, axis=None)).all()
    assert (layout.ungroup(x16) == raw).all()
    ids = np.array([[47, 0], [17, 17], [5, 33]])
    assert (gguf_rows(layout, x16, ids) == raw[ids]).all()
    with pytest.raises(ValueError):
        layout.regroup(raw[:8])


def test_q6_k_x16_positions() -> None:
    """Group 1, super-block 1, row 5: d, scale 3, and the chunk unit (h=1, c=2) the kernel reads."""
    raw = random_rows(Q.Q6_K, 32, 512)
    g = LAYOUTS[Q.Q6_K].regroup(raw).reshape(2, 2, 3360)[1, 1]
    row = raw[16 + 5].reshape(2, 210)[1]
    assert bytes(g[10:12]) == bytes(row[208:210])  # d
    assert g[32 + 16 * 3 + 5] == row[192 + 3]  # scale of sub-block 3
    unit = g[288 + 192 * (8 + 2) :][:192].reshape(3, 16, 4)[:, 5]  # ql 64+8.., ql 96+8.., qh 32+8..
    assert (unit == [row[72:76], row[104:108], row[128 + 40 : 128 + 44]]).all()


def test_q4_k_x16_positions() -> None:
    """Group 0, super-block 2, row 9: d, dmin, scale byte 7, and chunk 8g+c = 13 (g=1, c=5)."""
    raw = random_rows(Q.Q4_K, 16, 768)
    g = LAYOUTS[Q.Q4_K].regroup(raw).reshape(3, 2304)[2]
    row = raw[9].reshape(3, 144)[2]
    assert bytes(g[18:20]) == bytes(row[0:2]) and bytes(g[50:52]) == bytes(row[2:4])
    assert g[64 + 16 * 7 + 9] == row[4 + 7]
    assert (g[256 + 64 * 13 + 36 : 256 + 64 * 13 + 40] == row[16 + 32 + 20 : 16 + 32 + 24]).all()


@pytest.mark.parametrize("qtype", [*KQUANTS, Q.Q4_0], ids=lambda q: q.name)
def test_dequantize_rows_is_what_gguf_dequantizes(qtype: Q) -> None:
    raw = random_rows(qtype, 6, 512) if qtype != Q.Q4_0 else np.zeros((6, 16 * 18), np.uint8)
    t = TensorInfo(name="w", qtype=qtype, shape=(6, 512), data=raw)
    assert np.array_equal(dequantize_rows(qtype, raw), dequantize(t))


def q8_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T with x rounded to int8 per block of 32 as the op rounds it (float32 x * (1/d), to nearest
    even: dividing instead flips the odd tie, an error of a whole weight)."""
    xb = x.reshape(*x.shape[:-1], -1, 32)
    d = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
    q = np.rint(xb * (np.float32(1) / np.where(d == 0, np.float32(1), d)))
    return (q * d).reshape(x.shape).astype(np.float64) @ w.T.astype(np.float64)


@needs_op
@pytest.mark.parametrize("m", [1, 7, 130])
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_op_computes_the_product_of_the_exact_weights(qtype: Q, m: int) -> None:
    import onnxruntime as ort

    layout = LAYOUTS[qtype]
    n, k = 80, 768
    raw = random_rows(qtype, n, k, seed=m)
    node = helper.make_node(layout.op, ["x", "w"], ["y"], domain=native_ops.DOMAIN, K=k, N=n)
    graph = helper.make_graph(
        [node],
        "op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(layout.regroup(raw), "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(native_ops.DOMAIN, 1)]
    )
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    native_ops.register(so)
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    x[0, :32] = 0  # an all-zero activation block (scale 0)
    y = session.run(None, {"x": x})[0]
    ref = q8_reference(x, dequantize_rows(qtype, raw))
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()  # float32 sums of the same integers


# -- tiny models quantized by llama.cpp -------------------------------------------------------------------
@pytest.fixture(scope="module", params=["Q4_K_M", "Q6_K"])
def imports(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A K-quant file imported with the ops (when built), for MatMulNBits, and as the exact fp32 graph.
    Untied, so the LM head (Q6_K in both) is a matrix of its own on the op."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's quantizer makes the K-quant file")
    d = tmp_path_factory.mktemp(request.param)
    src = d / "f32.gguf"
    write_random_gguf(
        src,
        n_embd=256,
        n_ff=512,
        n_head=4,
        n_head_kv=2,
        n_layer=2,
        n_vocab=1024,
        seed=7,
        tied_embeddings=False,
    )
    path = d / f"{request.param}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{request.param}")
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), params) == 0
    store = ModelStore(d / "store")
    out = {"source": path, "fp32": store.import_gguf(path, precision="fp32", name="exact")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(native_ops.ENV, str(d / "no-such-library.so"))
        out["nbits"] = store.import_gguf(path, precision="int4", name="nbits")
    if missing_reason is None:
        out["native"] = store.import_gguf(path, precision="int4", name="native")
    return out


def logits(model_dir: Path) -> np.ndarray:
    engine = LLMEngine(model_dir, threads=2)
    cache = engine.pool.allocate()
    try:
        return engine.runner.prefill(cache, TOKENS, all_logits=True).astype(np.float64)
    finally:
        cache.free()


def greedy(model_dir: Path, steps: int = 12) -> list[int]:
    engine = LLMEngine(model_dir, threads=2)
    cache = engine.pool.allocate()
    try:
        out = [int(engine.runner.prefill(cache, TOKENS[:9]).argmax())]
        for _ in range(steps - 1):
            out.append(int(engine.runner.decode([cache], [out[-1]])[0].argmax()))
        return out
    finally:
        cache.free()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@needs_op
def test_native_k_quant_graph_follows_the_exact_graph(imports: dict[str, Path]) -> None:
    m = ModelManifest.read(imports["native"])
    assert m.custom_op_domains == [native_ops.DOMAIN] and m.exact_weights
    graph = onnx.load(str(imports["native"] / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert LAYOUTS[Q.Q6_K].op in ops  # the head, and the Q6_K file's every matrix
    assert "MatMulNBits" not in ops  # every matrix of these files has an op (K and N fit)
    native, nbits, exact = logits(imports["native"]), logits(imports["nbits"]), logits(imports["fp32"])
    # both round activations to int8 (the op per 32, as llama.cpp's Q8_0; MatMulNBits per weight block,
    # 16 for Q6_K's 8-bit carry; llama.cpp rounds them per 256 for K-quants): measured 5-6e-5 for both
    off_native = (1 - cosine(native, exact)).max()
    off_nbits = (1 - cosine(nbits, exact)).max()
    assert off_native <= max(2e-4, 1.5 * off_nbits), (off_native, off_nbits)
    # the top token as the exact graph's, except at near ties (the random-weight Q6_K model has one,
    # margin 0.06 against a logit std of 4, that activation rounding decides)
    top2 = np.sort(exact, -1)[:, -2:]
    flips = native.argmax(-1) != exact.argmax(-1)
    assert (top2[flips, 1] - top2[flips, 0] < 0.05 * exact.std()).all() and flips.sum() <= 2
    # free-running greedy: as MatMulNBits, which rounds activations to int8 per 32 too (both leave the
    # exact graph's path at step 10 of the Q4_K_M file, on a near tie of this random-weight model)
    assert greedy(imports["native"]) == greedy(imports["nbits"])


@needs_op
def test_every_k_quant_matrix_of_the_file_is_on_its_op(imports: dict[str, Path]) -> None:
    gguf = GGUFFile(imports["source"])
    kinds = {gguf.tensor(n).qtype for n in gguf.tensor_names() if gguf.tensor(n).qtype in KQUANTS}
    assert kinds  # Q4_K_M: Q4_K and Q6_K; Q6_K: Q6_K only
    assert set(ModelManifest.read(imports["native"]).native_ops) == {LAYOUTS[q].op for q in kinds}
