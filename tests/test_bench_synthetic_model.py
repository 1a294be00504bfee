"""bench/synthetic_model.py writes GGUFs of the requested shape that llmos and llama.cpp both read.

The bench builds 0.5B/1B random-weight models with it; here the same code runs at tiny dims (well under
a second), with the tiny test tokenizer standing in for SmolLM2's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from llmos.gguf_file import GGUFFile
from llmos.tiny_model import write_random_gguf

# bench/ is not a package: load the file as a module of its own name (dataclasses need it in sys.modules)
_SPEC = importlib.util.spec_from_file_location(
    "bench_synthetic_model", Path(__file__).resolve().parents[1] / "bench" / "synthetic_model.py"
)
assert _SPEC and _SPEC.loader
synthetic_model = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = synthetic_model
_SPEC.loader.exec_module(synthetic_model)

SHAPE = synthetic_model.Shape(n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2)


@pytest.fixture
def tokenizer_gguf(tmp_path: Path) -> Path:
    return write_random_gguf(tmp_path / "tokenizer-source.gguf")


def test_f16_file_has_the_requested_shape_and_the_source_tokenizer(
    tmp_path: Path, tokenizer_gguf: Path
) -> None:
    path = synthetic_model.write_f16_gguf(tmp_path / "m.gguf", SHAPE, tokenizer_gguf, seed=1)
    f, src = GGUFFile(path), GGUFFile(tokenizer_gguf)
    hp = f.hparams()
    assert (hp.n_layer, hp.n_embd, hp.n_ff, hp.n_head, hp.n_head_kv) == (2, 128, 256, 4, 2)
    assert hp.tied_embeddings and hp.n_vocab == len(src.get("tokenizer.ggml.tokens"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert f.get(key) == src.get(key)
    assert f.get("tokenizer.ggml.eos_token_id") == src.get("tokenizer.ggml.eos_token_id")
    expected = synthetic_model.tensor_shapes(SHAPE, hp.n_vocab)
    assert f.tensor_names() == list(expected)
    for name, shape in expected.items():
        t = f.tensor(name)
        assert t.shape == shape
        assert t.qtype.name == ("F32" if len(shape) == 1 else "F16")
    q = np.asarray(f.tensor("blk.0.attn_q.weight").data, dtype=np.float32)
    assert np.isfinite(q).all() and 0.5 < q.std() * np.sqrt(128) < 2  # ~ 1/sqrt(in), as documented


@pytest.mark.llamacpp
def test_llama_cpp_quantizes_it(tmp_path: Path, tokenizer_gguf: Path) -> None:
    """llama.cpp's quantizer reads the F16 file (its loader parses it) and writes a Q4_0 file llmos reads."""
    pytest.importorskip("llama_cpp")
    path = synthetic_model.ensure_model("tiny", "Q4_0", tokenizer_gguf, tmp_path, shapes={"tiny": SHAPE})
    assert path.name == synthetic_model.model_path(tmp_path, "tiny", "Q4_0").name
    f = GGUFFile(path)
    assert f.tensor("blk.1.ffn_down.weight").qtype.name == "Q4_0"
    assert f.hparams().n_embd == 128
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("llama-")) == [
        synthetic_model.model_path(tmp_path, "tiny", fmt).name for fmt in ("F16", "Q4_0")
    ]
