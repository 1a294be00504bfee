"""The reference forward pass is self-consistent, and the tiny GGUF builder writes real-looking files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from reference_llama import KVState, ReferenceLlama, apply_rope, load_reference_weights

from llmos.gguf_file import GGUFFile
from llmos.tiny_model import (
    SPECIAL_TOKENS,
    base_vocab_size,
    bytes_to_unicode,
    random_weights,
    tiny_vocab,
    write_random_gguf,
)

PROMPT = [1, 40, 75, 80, 80, 83, 3, 90, 83, 86, 80, 72, 2, 1, 280]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request: pytest.FixtureRequest, tiny_dir: Path) -> ReferenceLlama:
    path = write_random_gguf(tiny_dir / f"{request.param}.gguf", arch=request.param, seed=3)
    return ReferenceLlama.from_gguf(path)


# -- the reference is self-consistent ------------------------------------------------------------------


def test_prefill_equals_token_by_token_decode(model: ReferenceLlama) -> None:
    full = model.forward(PROMPT, 0, KVState())
    state = model.new_state()
    steps = np.concatenate([model.forward([t], i, state) for i, t in enumerate(PROMPT)])
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-5)
    # and a split prefill (prefix, then the rest as a chunk) agrees too
    state = model.new_state()
    head = model.forward(PROMPT[:6], 0, state)
    tail = model.forward(PROMPT[6:], 6, state)
    np.testing.assert_allclose(np.concatenate([head, tail]), full, rtol=0, atol=1e-5)


def test_truncate_rewinds_the_state(model: ReferenceLlama) -> None:
    state = model.new_state()
    model.forward(PROMPT, 0, state)
    state.truncate(5)
    again = model.forward(PROMPT[5:], 5, state)
    np.testing.assert_allclose(again, model.forward(PROMPT)[5:], rtol=0, atol=1e-9)


def test_start_pos_must_match_the_state(model: ReferenceLlama) -> None:
    state = model.new_state()
    model.forward(PROMPT[:3], 0, state)
    with pytest.raises(ValueError, match="start_pos"):
        model.forward([5], 2, state)


def test_causal_later_tokens_do_not_change_earlier_logits(model: ReferenceLlama) -> None:
    base = model.forward(PROMPT)
    changed = [*PROMPT[:7], *[(t * 7 + 11) % model.cfg.n_vocab for t in PROMPT[7:]]]
    other = model.forward(changed)
    np.testing.assert_allclose(other[:7], base[:7], rtol=0, atol=1e-12)
    assert not np.allclose(other[7:], base[7:])  # ... and the later ones really do change


def test_logits_are_not_degenerate(model: ReferenceLlama) -> None:
    logits = model.forward(PROMPT)
    assert np.isfinite(logits).all()
    assert 0.5 < logits.std(axis=-1).mean() < 20
    assert len(set(np.argmax(logits, axis=-1).tolist())) > 3  # predictions depend on the context
    # attention is not uniform: a different history changes the last position's prediction
    assert not np.allclose(model.forward([9, 9, 9, 9, PROMPT[-1]])[-1], logits[-1], atol=1e-3)


def test_greedy_is_deterministic_and_consistent(model: ReferenceLlama) -> None:
    out = model.greedy(PROMPT, 6)
    assert len(out) == 6 and all(0 <= t < model.cfg.n_vocab for t in out)
    assert model.greedy(PROMPT, 6) == out
    full = model.forward(PROMPT + out[:-1])
    assert np.argmax(full[len(PROMPT) - 1 :], axis=-1).tolist() == out


def test_rope_position_zero_is_identity_and_scores_are_relative() -> None:
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, 16))
    for neox in (False, True):
        np.testing.assert_allclose(apply_rope(q, np.array([0]), 1e4, neox), q, atol=1e-15)

        def score(pq: int, pk: int, neox: bool = neox) -> float:
            rq = apply_rope(q, np.array([pq]), 1e4, neox)
            rk = apply_rope(k, np.array([pk]), 1e4, neox)
            return float(rq.ravel() @ rk.ravel())

        assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-9)


def _rope_pairs_complex(x: np.ndarray, pos: np.ndarray, theta: float, neox: bool) -> np.ndarray:
    """Rotary as a complex multiply; written independently of `apply_rope` to cross-check it."""
    hd = x.shape[-1]
    z = x[..., : hd // 2] + 1j * x[..., hd // 2 :] if neox else x[..., 0::2] + 1j * x[..., 1::2]
    freqs = np.exp(1j * np.outer(pos, 1.0 / theta ** (np.arange(hd // 2) * 2.0 / hd)))
    r = z * freqs
    if neox:
        return np.concatenate([r.real, r.imag], axis=-1)
    return np.stack([r.real, r.imag], axis=-1).reshape(x.shape)


def _plain_mha_logits(
    w: dict[str, np.ndarray], n_layer: int, n_head: int, eps: float, theta: float, neox: bool, ids: list[int]
) -> np.ndarray:
    """Textbook multi-head attention transformer (no GQA, no cache), einsum style."""
    x = w["token_embd.weight"][ids]
    t, d = x.shape
    hd = d // n_head
    pos = np.arange(t)
    causal = np.triu(np.full((t, t), -np.inf), k=1)

    def norm(v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return v * g / np.sqrt((v**2).mean(-1, keepdims=True) + eps)

    def lin(v: np.ndarray, name: str) -> np.ndarray:
        return np.einsum("td,od->to", v, w[name + ".weight"]) + w.get(name + ".bias", 0.0)

    for i in range(n_layer):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q, k, v = (
            lin(h, p + n).reshape(t, n_head, hd).transpose(1, 0, 2) for n in ("attn_q", "attn_k", "attn_v")
        )
        q, k = _rope_pairs_complex(q, pos, theta, neox), _rope_pairs_complex(k, pos, theta, neox)
        s = np.einsum("htd,hsd->hts", q, k) / np.sqrt(hd) + causal
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,hsd->thd", a, v).reshape(t, d)
        x = x + lin(o, p + "attn_output")
        h = norm(x, w[p + "ffn_norm.weight"])
        g = lin(h, p + "ffn_gate")
        x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + "ffn_up"), p + "ffn_down")
    out = w.get("output.weight", w["token_embd.weight"])
    return norm(x, w["output_norm.weight"]) @ out.T


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mha_file_matches_an_independent_plain_mha(tmp_path: Path, arch: str) -> None:
    path = write_random_gguf(tmp_path / "mha.gguf", arch=arch, n_head=4, n_head_kv=4, seed=5)
    ref = ReferenceLlama.from_gguf(path)
    expected = _plain_mha_logits(
        ref.w, ref.cfg.n_layer, 4, ref.cfg.rms_eps, ref.cfg.rope_theta, arch == "qwen2", PROMPT
    )
    np.testing.assert_allclose(ref.forward(PROMPT), expected, rtol=0, atol=1e-9)


def test_gqa_equals_mha_with_repeated_kv_heads(tmp_path: Path) -> None:
    gqa = ReferenceLlama.from_gguf(write_random_gguf(tmp_path / "gqa.gguf", n_head=4, n_head_kv=2, seed=2))
    hd, group = gqa.cfg.head_dim, gqa.cfg.n_head // gqa.cfg.n_head_kv
    weights = dict(gqa.w)
    for i in range(gqa.cfg.n_layer):
        for n in ("attn_k", "attn_v"):
            m = weights[f"blk.{i}.{n}.weight"]  # [n_head_kv * hd, n_embd]
            heads = m.reshape(gqa.cfg.n_head_kv, hd, -1)
            weights[f"blk.{i}.{n}.weight"] = np.repeat(heads, group, axis=0).reshape(gqa.cfg.n_head * hd, -1)
    cfg = type(gqa.cfg)(**{**gqa.cfg.__dict__, "n_head_kv": gqa.cfg.n_head})
    mha = ReferenceLlama(weights, cfg)
    np.testing.assert_allclose(mha.forward(PROMPT), gqa.forward(PROMPT), rtol=0, atol=1e-10)
    # and the plain MHA agrees with both
    plain = _plain_mha_logits(weights, cfg.n_layer, cfg.n_head, cfg.rms_eps, cfg.rope_theta, False, PROMPT)
    np.testing.assert_allclose(plain, gqa.forward(PROMPT), rtol=0, atol=1e-9)


def test_llama_and_qwen2_rope_layouts_differ(tmp_path: Path) -> None:
    """Same weights, different rope pairing: the logits must differ (the arch really selects the rope)."""
    ref = ReferenceLlama.from_gguf(write_random_gguf(tmp_path / "l.gguf", seed=1))
    neox = ReferenceLlama(ref.w, type(ref.cfg)(**{**ref.cfg.__dict__, "architecture": "qwen2"}))
    assert not np.allclose(ref.forward(PROMPT)[1:], neox.forward(PROMPT)[1:], atol=1e-4)
    np.testing.assert_allclose(ref.forward(PROMPT)[0], neox.forward(PROMPT)[0], atol=1e-12)  # pos 0


# -- the tiny GGUF builder ------------------------------------------------------------------------------

EXPECTED_QTYPES = {  # weight_type -> (2-D matrices, tied token_embd)
    "F32": ("F32", "F32"),
    "F16": ("F16", "F16"),
    "Q8_0": ("Q8_0", "Q8_0"),
    "Q4_0": ("Q4_0", "Q8_0"),
    "Q4_1": ("Q4_1", "Q8_0"),
}


@pytest.mark.parametrize("weight_type", list(EXPECTED_QTYPES))
def test_tiny_gguf_opens_with_the_right_hparams(tmp_path: Path, weight_type: str) -> None:
    path = write_random_gguf(
        tmp_path / "m.gguf",
        weight_type=weight_type,
        n_layer=3,
        n_embd=96,
        n_ff=160,
        n_head=6,
        n_head_kv=2,
        context_length=512,
        rope_theta=100000.0,
        rms_eps=1e-6,
    )
    g = GGUFFile(path)
    hp = g.hparams()
    assert (hp.architecture, hp.n_layer, hp.n_embd, hp.n_ff) == ("llama", 3, 96, 160)
    assert (hp.n_head, hp.n_head_kv, hp.head_dim) == (6, 2, 16)
    assert (hp.n_vocab, hp.context_length) == (base_vocab_size(), 512)
    assert hp.rope_theta == 100000.0 and hp.rms_eps == pytest.approx(1e-6, rel=1e-6)
    assert hp.tied_embeddings and not hp.attention_bias
    matrices, embd = EXPECTED_QTYPES[weight_type]
    assert g.tensor("blk.2.ffn_down.weight").qtype.name == matrices
    assert g.tensor("blk.0.attn_k.weight").shape == (32, 96)
    assert g.tensor("token_embd.weight").qtype.name == embd
    assert g.tensor("blk.1.attn_norm.weight").qtype == GGMLQuantizationType.F32
    assert "output.weight" not in g.tensor_names()
    assert g.get("general.file_type") == {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3}[weight_type]
    assert g.get("llama.rope.dimension_count") == 16 and g.get("llama.vocab_size") == hp.n_vocab
    # every weight dequantizes to finite values of the right shape
    weights = load_reference_weights(path)
    assert weights["blk.0.ffn_gate.weight"].shape == (160, 96)
    assert all(np.isfinite(v).all() for v in weights.values())


def test_qwen2_untied_file(tmp_path: Path) -> None:
    path = write_random_gguf(
        tmp_path / "q.gguf", arch="qwen2", tied_embeddings=False, weight_type="Q4_1", n_vocab=400
    )
    g = GGUFFile(path)
    hp = g.hparams()
    assert hp.architecture == "qwen2" and hp.attention_bias and not hp.tied_embeddings and hp.n_vocab == 400
    assert g.tensor("blk.0.attn_k.bias").shape == (32,)
    assert g.tensor("blk.0.attn_q.bias").qtype == GGMLQuantizationType.F32
    assert g.tensor("output.weight").qtype == GGMLQuantizationType.Q8_0  # llama-quantize: Q6_K / Q8_0
    assert g.tensor("token_embd.weight").qtype == GGMLQuantizationType.Q4_1
    assert g.get("qwen2.block_count") == 2
    assert ReferenceLlama.from_gguf(path).forward([1, 2, 3]).shape == (3, 400)


def test_bad_shapes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of"):
        write_random_gguf(tmp_path / "a.gguf", n_embd=48, n_head=4, n_ff=96, weight_type="Q8_0")
    with pytest.raises(ValueError, match="attention shape"):
        write_random_gguf(tmp_path / "b.gguf", n_head=4, n_head_kv=3)
    with pytest.raises(ValueError, match="minimum"):
        write_random_gguf(tmp_path / "c.gguf", n_vocab=100)
    with pytest.raises(ValueError, match="weight_type"):
        write_random_gguf(tmp_path / "d.gguf", weight_type="Q6_K")


def _max_error(w: np.ndarray, weight_type: str) -> np.ndarray:
    """Largest possible quantization error per element, for 32-element blocks.

    Round-to-nearest costs half a step (Q4_0: a full step, since the value opposite the largest one
    can land on level 16, clipped to 15); the fp16 scale d (and Q4_1's fp16 minimum) adds up to
    2^-11 relative error, times the largest level used.
    """
    b = w.reshape(-1, 32)
    amax, lo, hi = np.abs(b).max(1), b.min(1), b.max(1)
    eps16 = 2.0**-11
    if weight_type == "Q8_0":
        d = amax / 127
        bound = d / 2 + 127 * d * eps16
    elif weight_type == "Q4_1":
        d = (hi - lo) / 15
        bound = d / 2 + 15 * d * eps16 + np.abs(lo) * eps16
    elif weight_type == "Q4_0":
        d = amax / 8
        bound = d + 8 * d * eps16
    else:  # F16
        bound = amax * eps16
    return np.repeat(bound + 1e-7, 32).reshape(w.shape)


@pytest.mark.parametrize(
    ("weight_type", "rel_rms"), [("Q8_0", 0.01), ("Q4_1", 0.12), ("Q4_0", 0.15), ("F16", 1e-3)]
)
def test_quantized_weights_are_close_to_the_floats(tmp_path: Path, weight_type: str, rel_rms: float) -> None:
    path = write_random_gguf(tmp_path / "m.gguf", weight_type=weight_type, seed=9)
    floats = random_weights(seed=9)
    got = load_reference_weights(path)
    assert set(got) == set(floats)
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.1.attn_v.weight", "token_embd.weight"):
        f, q = floats[name].astype(np.float64), got[name]
        err = np.abs(q - f)
        tensor_type = "Q8_0" if name == "token_embd.weight" and weight_type.startswith("Q") else weight_type
        assert (err <= _max_error(f, tensor_type)).all(), name
        assert np.sqrt((err**2).mean()) < rel_rms * np.sqrt((f**2).mean()), name
    np.testing.assert_array_equal(got["blk.0.attn_norm.weight"], floats["blk.0.attn_norm.weight"])


def test_quantized_model_tracks_the_float_model(tmp_path: Path) -> None:
    f32 = ReferenceLlama.from_gguf(write_random_gguf(tmp_path / "f.gguf", weight_type="F32", seed=4))
    q8 = ReferenceLlama.from_gguf(write_random_gguf(tmp_path / "q8.gguf", weight_type="Q8_0", seed=4))
    q41 = ReferenceLlama.from_gguf(write_random_gguf(tmp_path / "q4.gguf", weight_type="Q4_1", seed=4))
    a, b, c = (m.forward(PROMPT) for m in (f32, q8, q41))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    assert np.corrcoef(a.ravel(), c.ravel())[0, 1] > 0.95


def test_gguf_dequantize_roundtrip_matches_reader_layout(tmp_path: Path) -> None:
    """The reader's raw rows and gguf.quants agree on the [out, in] layout for a quantized matrix."""
    path = write_random_gguf(tmp_path / "m.gguf", weight_type="Q8_0", seed=1)
    t = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.attn_k.weight")
    deq = dequantize(t.data, GGMLQuantizationType.Q8_0)
    assert deq.shape == (32, 64)
    np.testing.assert_allclose(deq, random_weights(seed=1)["blk.0.attn_k.weight"], atol=0.01)


# -- the tiny tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_metadata_layout(tmp_path: Path) -> None:
    g = GGUFFile(write_random_gguf(tmp_path / "m.gguf", n_vocab=600))
    tokens = g.get("tokenizer.ggml.tokens")
    types = g.get("tokenizer.ggml.token_type").tolist()
    merges = g.get("tokenizer.ggml.merges")
    assert len(tokens) == len(types) == 600 == g.hparams().n_vocab
    assert len(set(tokens)) == len(tokens)
    assert tokens[:3] == list(SPECIAL_TOKENS) and types[:3] == [3, 3, 3]
    assert tokens[3:259] == list(bytes_to_unicode().values()) and set(types[3:]) == {1}
    assert len(merges) == 600 - 259
    for rank, merge in enumerate(merges):  # each merge joins two earlier tokens into the next new one
        left, right = merge.split(" ")
        assert tokens.index(left) < 259 + rank and tokens.index(right) < 259 + rank
        assert tokens[259 + rank] == left + right
    assert g.get("tokenizer.ggml.model") == "gpt2" and g.get("tokenizer.ggml.pre") == "smollm"
    assert (g.get("tokenizer.ggml.bos_token_id"), g.get("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert "<|im_start|>" in g.get("tokenizer.chat_template")


def test_bytes_to_unicode_is_a_bijection_onto_printables() -> None:
    m = bytes_to_unicode()
    assert len(set(m.values())) == 256 and m[ord("A")] == "A" and m[ord(" ")] == "Ġ" and m[10] == "Ċ"
    assert all(c.isprintable() and not c.isspace() for c in m.values())


def test_tiny_vocab_works_with_a_byte_level_bpe(tmp_path: Path) -> None:
    """The HF `tokenizers` BPE accepts the vocab/merges and uses the merges ("Hello world" -> 2 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = tiny_vocab()
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(vocab.tokens)}, merges=[tuple(m.split(" ")) for m in vocab.merges]
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    enc = tok.encode("Hello world, the end\n\n")
    assert enc.tokens[:2] == ["Hello", "Ġworld"] and "Ġthe" in enc.tokens and "ĊĊ" in enc.tokens
    assert tok.decode(enc.ids) == "Hello world, the end\n\n"
    text = "héllo ☃ \x00"  # bytes without merges fall back to byte tokens
    assert tok.decode(tok.encode(text).ids) == text


# -- the reference against llama.cpp itself and against the real model ------------------------------------


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reference_matches_llama_cpp_on_a_tiny_file(tmp_path: Path, arch: str) -> None:
    """llama.cpp (F32 weights, F32 KV cache) and the reference agree: same file conventions, same maths."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = write_random_gguf(tmp_path / "m.gguf", arch=arch, seed=3)
    llm = llama_cpp.Llama(
        str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0
    )  # ggml type 0 = F32 KV cache; the default F16 costs ~2e-3
    llm.eval(PROMPT)
    theirs = np.asarray(llm.scores[: len(PROMPT)], dtype=np.float64)
    np.testing.assert_allclose(ReferenceLlama.from_gguf(path).forward(PROMPT), theirs, rtol=0, atol=1e-4)
    # llama.cpp's gpt2/smollm tokenizer reads the tiny vocabulary and uses its merges
    vocab = tiny_vocab().tokens
    ids = llm.tokenize(b"<|im_start|>Hello world, the end", add_bos=False, special=True)
    assert [vocab[i] for i in ids] == ["<|im_start|>", "Hello", "Ġworld", ",", "Ġthe", "Ġ", "en", "d"]


# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" (llama.cpp's ids)
FRANCE_PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


@pytest.mark.model
def test_reference_answers_sensibly_with_the_real_model(default_gguf: Path) -> None:
    """On SmolLM2 (llama rope on adjacent pairs, Q4_1 + Q8_0 embeddings) the reference talks sense."""
    ref = ReferenceLlama.from_gguf(default_gguf)
    out = ref.greedy(FRANCE_PROMPT, 8)
    tokens = GGUFFile(default_gguf).get("tokenizer.ggml.tokens")
    assert "".join(tokens[i] for i in out).replace("Ġ", " ") == "The capital of France is Paris.<|im_end|>"
