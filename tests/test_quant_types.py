"""Every common GGUF weight type carried exactly: the integer form decoded here equals what the `gguf`
package dequantizes, value for value, and the MatMulNBits packing reproduces it.

Blocks are random bytes (every bit pattern is a valid block) with sane fp16 scales written in, so every
nibble, high bit, scale and min position of each layout is exercised.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from llmos.errors import UnsupportedModelError
from llmos.gguf_file import TensorInfo
from llmos.quant import dequantize, int_blocks, pack_matrix, source_bits, unpack

# type -> byte offsets of its fp16 scale fields inside a block, and the container it needs
TYPES = {
    Q.Q4_0: ((0,), 4),
    Q.Q4_1: ((0, 2), 4),
    Q.Q5_0: ((0,), 8),
    Q.Q5_1: ((0, 2), 8),
    Q.Q8_0: ((0,), 8),
    Q.Q2_K: ((80, 82), 4),
    Q.Q3_K: ((108,), 4),
    Q.Q4_K: ((0, 2), 4),
    Q.Q5_K: ((0, 2), 8),
    Q.Q6_K: ((208,), 8),
    Q.IQ4_NL: ((0,), 8),
    Q.IQ4_XS: ((0,), 8),
}


def random_tensor(qtype: Q, n: int = 8, k: int = 512, seed: int = 0) -> TensorInfo:
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for off in TYPES[qtype][0]:
        raw[..., off : off + 2] = (
            (rng.standard_normal((n, k // block, 1)) * 0.01).astype(np.float16).view(np.uint8)
        )
    return TensorInfo(name="w", qtype=qtype, shape=(n, k), data=raw.reshape(n, -1))


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda q: q.name)
def test_the_integer_form_is_exactly_what_gguf_dequantizes(qtype: Q) -> None:
    t = random_tensor(qtype)
    b = int_blocks(t)
    assert b is not None
    w = b.s[..., None] * b.q.astype(np.float32)
    if b.o is not None:
        w = w + b.o[..., None]
    ref = dequantize(t)
    assert np.array_equal(w.reshape(t.shape), ref), np.abs(w.reshape(t.shape) - ref).max()
    assert b.q.min() >= b.qmin and b.q.max() <= b.qmax


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda q: q.name)
def test_packing_keeps_every_weight_in_the_smallest_container(qtype: Q) -> None:
    t = random_tensor(qtype, seed=1)
    bits = TYPES[qtype][1]
    assert source_bits(t) == bits
    p = pack_matrix(t, 4)
    assert p.exact and p.bits == bits
    ref = dequantize(t)
    np.testing.assert_allclose(unpack(p), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    # in an 8-bit container (int8 precision), and in 16-weight blocks (to share a form with K-quants)
    np.testing.assert_allclose(unpack(pack_matrix(t, 8)), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(unpack(pack_matrix(t, 8, 16)), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_types_without_an_integer_form_are_refused_by_name() -> None:
    _block, size = GGML_QUANT_SIZES[Q.IQ2_XXS]
    t = TensorInfo("blk.0.ffn_up.weight", Q.IQ2_XXS, (4, 256), np.zeros((4, size), dtype=np.uint8))
    with pytest.raises(
        UnsupportedModelError, match=r"blk\.0\.ffn_up\.weight: weight type IQ2_XXS .*--precision fp32"
    ):
        pack_matrix(t, 4)


def test_float_sources_are_re_rounded_and_say_so() -> None:
    w = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    p = pack_matrix(TensorInfo("w", Q.F32, (4, 64), w), 4)
    assert not p.exact
    assert np.abs(unpack(p) - w).max() < 0.2 * np.abs(w).max()


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q4_1, Q.Q4_K], ids=lambda q: q.name)
def test_a_big_matrix_packed_in_slices_of_rows_is_the_same(qtype: Q, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedding table is packed a few rows at a time to bound scratch memory: same result."""
    t = random_tensor(qtype, n=40, seed=3)
    whole = pack_matrix(t, 8)
    monkeypatch.setattr("llmos.quant.CHUNK_WEIGHTS", 512 * 7)  # 7 rows a slice: uneven last slice
    sliced = pack_matrix(t, 8)
    assert np.array_equal(sliced.packed, whole.packed) and np.array_equal(sliced.scales, whole.scales)
    assert (sliced.correction is None) == (whole.correction is None)
    if whole.correction is not None:
        assert np.array_equal(sliced.correction, whole.correction)
