"""SentencePiece vocabularies (GGUF `tokenizer.ggml.model = "llama"`, Gemma's) tokenize as llama.cpp's.

The tiny Gemma-like vocabulary (llmos/tiny_spm.py) has byte fallback, a user-defined token, control
tokens and merge scores shuffled against piece length; ids are compared with llama.cpp's on the same
file for 300+ texts (random mixes of words, spaces, newlines, characters outside the vocabulary and
special-token text), with special tokens parsed and not, with and without `add_space_prefix`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agents.structured_output import StructuredOutput
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.gguf_file import GGUFFile
from llmos.model_store import ModelStore
from llmos.spm_vocab import spm_merges
from llmos.tiny_model import write_random_gguf
from llmos.tokenizer import Tokenizer

FIXED = [
    "Hello world",
    " Hello  world ",
    "the quick brown fox jumps over the lazy dog.",
    "tokenizer sentencepiece",
    "Ünïcödé ☃ 東京 😀",
    "a\nb\n\nc\t d",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "use <custom> now",
    "",
    " ",
    "   lead",
    "trail   ",
    'weather in Oslo? {"city": "Paris"}',
    "ééé é ▁▁",
]


def _texts() -> list[str]:
    rng = np.random.default_rng(0)
    alphabet = [*"abcdefghijklmnopqrstuvwxyz    \n.,!éü東😀", "the", "Hello", "▁", "<custom>", "<eos>", " is"]
    return FIXED + ["".join(rng.choice(alphabet, rng.integers(1, 40))) for _ in range(300)]


@pytest.fixture(scope="module", params=[False, True], ids=["gemma-no-prefix", "llama2-space-prefix"])
def spm_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_gguf(
        tmp_path_factory.mktemp("spm") / "s.gguf", arch="gemma3", head_dim=32, add_space_prefix=request.param
    )


def test_merges_follow_the_merged_piece_score() -> None:
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, 0.0, 0.0, -3.0, -1.0, -2.0]
    assert spm_merges(tokens, scores) == [("b", "c"), ("a", "bc"), ("ab", "c"), ("a", "b")]


@pytest.mark.llamacpp
def test_ids_equal_llama_cpp(spm_file: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = Tokenizer.from_gguf(GGUFFile(spm_file))
    assert tok.model == "llama" and tok.add_bos and tok.bos_id == 2
    llm = llama_cpp.Llama(str(spm_file), vocab_only=True, verbose=False)
    differ = []
    for special in (True, False):
        for text in _texts():
            ours = tok.encode(text, parse_special=special)
            theirs = llm.tokenize(text.encode(), add_bos=True, special=special)
            if ours != theirs:
                differ.append((special, text, ours, theirs))
    assert not differ, differ[:5]
    # the one intended difference: a text that starts with the BOS token gets no second one
    assert tok.encode("<bos>Hello") == llm.tokenize(b"<bos>Hello", add_bos=True, special=True)[1:]
    llm.close()


def test_decoding_round_trips_and_bytes(spm_file: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_gguf(GGUFFile(spm_file))
    # with add_space_prefix every piece of text (after each special token too) gains a leading space
    prefixed = '"Prepend"' in tok.hf_json()
    for text in _texts():
        if "▁" in text:  # a space is written ▁, so a literal ▁ comes back a space (in llama.cpp too)
            continue
        ids = tok.encode(text, parse_special=False)[1:]  # without BOS
        if not prefixed:
            assert tok.decode(ids) == text
        elif "<custom>" not in text:
            assert tok.decode(ids) == (" " + text if text else "")
    snowman = tok.encode("☃", parse_special=False)[1:]  # not in the vocabulary: its three UTF-8 bytes
    assert [tok.token_bytes(i) for i in snowman][-3:] == [b"\xe2", b"\x98", b"\x83"]
    assert tok.token_bytes(tok.token_to_id("▁the")) == b" the"  # type: ignore[arg-type]
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.model == "llama" and again.encode("Hello world") == tok.encode("Hello world")
    assert again.decode(tok.encode("a b")) == tok.decode(tok.encode("a b"))


def test_constrained_json_on_a_sentencepiece_model(tmp_path: Path) -> None:
    """llguidance reads the SentencePiece tokenizer.json (▁ spaces, byte fallback): JSON comes out valid."""
    path = write_random_gguf(tmp_path / "g.gguf", arch="gemma3", head_dim=32, weight_type="Q8_0")
    engine = LLMEngine(ModelStore(tmp_path / "store").import_gguf(path), threads=1, warmup=False)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "maximum": 99}},
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    structured = StructuredOutput(engine.tokenizer)
    for seed in range(3):
        chunks = list(
            engine.stream(
                [{"role": "user", "content": "Describe a city."}],
                SamplingParams(max_tokens=80, temperature=1.0, seed=seed),
                constraint=structured.constraint(json.dumps(schema)),
            )
        )
        answer = json.loads("".join(c.text for c in chunks))
        assert set(answer) == {"city", "n"} and chunks[-1].finish_reason == "stop"
