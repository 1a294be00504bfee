"""The GGUF tokenizer against llama.cpp's own token ids, plus its edges: bytes, save/load, bad metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gguf_files import write_metadata_gguf
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos.errors import TokenizerError, UnsupportedModelError
from llmos.gguf_file import GGUFFile
from llmos.tokenizer import CONFIG_FILE, TOKENIZER_FILE, Tokenizer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_llamacpp.json").read_text("utf-8"))
CASES: list[dict[str, Any]] = FIXTURE["cases"]
CASE_IDS = [f"{n}-{c['category']}" for n, c in enumerate(CASES)]
LOSSY = "control"  # the category holding bytes SmolLM2 has no token for


@pytest.fixture(scope="module")
def tok(default_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(default_gguf))


@pytest.fixture(scope="module")
def saved_dir(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def loaded(saved_dir: Path) -> Tokenizer:
    return Tokenizer.load(saved_dir)


@pytest.fixture(scope="module")
def missing_bytes(tok: Tokenizer) -> set[int]:
    """Bytes with no single-byte token, found from the tokenizer's own byte table."""
    single = {
        tok.token_bytes(i)[0]
        for i in range(tok.vocab_size)
        if i not in tok.special_ids and len(tok.token_bytes(i)) == 1
    }
    return set(range(256)) - single


def _without(text: str, missing: set[int]) -> bytes:
    return bytes(b for b in text.encode("utf-8") if b not in missing)


# -- the reference fixture --------------------------------------------------------------------------
def test_fixture_covers_the_corpus() -> None:
    assert len(CASES) >= 60
    categories = {c["category"] for c in CASES}
    assert {
        "prose",
        "code",
        "cjk",
        "emoji",
        "whitespace",
        "digits",
        "latin",
        "scripts",
        "mixed",
        "special",
    } <= categories
    assert FIXTURE["llama_cpp_version"]
    chat = next(c for c in CASES if c["text"].startswith("<|im_start|>user"))
    assert chat["ids_special"][0] == 1 and 1 not in chat["ids"]  # the fixture really tells the modes apart


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ids_equal_llamacpp_without_special_parsing(tok: Tokenizer, case: dict[str, Any]) -> None:
    assert tok.encode(case["text"], parse_special=False) == case["ids"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ids_equal_llamacpp_with_special_parsing(tok: Tokenizer, case: dict[str, Any]) -> None:
    assert tok.encode(case["text"]) == case["ids_special"]
    assert tok.encode(case["text"], parse_special=True) == case["ids_special"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_inverts_encode(tok: Tokenizer, case: dict[str, Any], missing_bytes: set[int]) -> None:
    text = case["text"]
    for ids in (tok.encode(text), tok.encode(text, parse_special=False)):
        if case["category"] == LOSSY:
            assert tok.decode(ids) == _without(text, missing_bytes).decode("utf-8")
        else:
            assert tok.decode(ids) == text


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_token_bytes_concatenate_to_the_utf8(
    tok: Tokenizer, case: dict[str, Any], missing_bytes: set[int]
) -> None:
    text = case["text"]
    for ids in (tok.encode(text), tok.encode(text, parse_special=False)):
        assert b"".join(tok.token_bytes(i) for i in ids) == _without(text, missing_bytes)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_saved_and_loaded_tokenizer_gives_identical_ids(loaded: Tokenizer, case: dict[str, Any]) -> None:
    assert loaded.encode(case["text"], parse_special=False) == case["ids"]
    assert loaded.encode(case["text"]) == case["ids_special"]
    assert loaded.decode(case["ids"]) == loaded.decode(case["ids_special"])


def test_only_the_documented_bytes_are_lossy(missing_bytes: set[int]) -> None:
    # 0x04 0x06 0x13 0x14 0x16 0x1D are control characters; the rest never occur in text SmolLM2 saw.
    assert {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D} <= missing_bytes
    assert not missing_bytes & {*range(0x20, 0x7F), 0x09, 0x0A, 0x0D}  # printable ASCII, tab, newlines
    lossy = next(c for c in CASES if c["category"] == LOSSY and "\x14" in c["text"])
    assert "\x14" in lossy["text"] and len(lossy["ids"]) > 0


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80))
def test_any_text_round_trips_through_bytes(tok: Tokenizer, missing_bytes: set[int], text: str) -> None:
    ids = tok.encode(text, parse_special=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == _without(text, missing_bytes)
    if not set(text.encode("utf-8")) & missing_bytes:
        assert tok.decode(ids) == text


# -- SmolLM2's vocabulary as a user meets it ----------------------------------------------------------
def test_smollm2_ids_and_special_tokens(tok: Tokenizer) -> None:
    assert tok.pre == "smollm"
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.eos_ids == {0, 2}  # <|im_end|> and <|endoftext|> both end a reply
    assert tok.special_ids == set(range(17))
    assert tok.id_to_token(2) == "<|im_end|>"
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("no such token here") is None
    assert tok.id_to_token(tok.token_to_id("Ġthe") or -1) == "Ġthe"


def test_no_bos_is_added_and_digits_are_split(tok: Tokenizer) -> None:
    assert tok.add_bos is False
    ids = tok.encode("2024")
    assert len(ids) == 4 and [tok.decode([i]) for i in ids] == ["2", "0", "2", "4"]
    assert tok.encode("hi")[0] != tok.bos_id


def test_special_text_is_parsed_only_when_asked(tok: Tokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode(text)[0] == 1 and tok.encode(text)[-1] == 2
    plain = tok.encode(text, parse_special=False)
    assert not set(plain) & tok.special_ids
    assert tok.decode(plain) == text


def test_skip_special_drops_control_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nHello!<|im_end|>")
    assert tok.decode(ids) == "<|im_start|>assistant\nHello!<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "assistant\nHello!"
    assert tok.token_bytes(2) == b"<|im_end|>"


def test_token_bytes_stream_a_character_split_across_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("😀", parse_special=False)
    pieces = [tok.token_bytes(i) for i in ids]
    assert len(pieces) > 1 and b"".join(pieces) == "😀".encode()
    with pytest.raises(UnicodeDecodeError):
        pieces[0].decode("utf-8")  # a half character: what a streaming decoder must hold back
    assert tok.decode(ids[:1]) == "\ufffd"


def test_text_that_is_not_valid_unicode_is_a_named_error(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="valid Unicode"):
        tok.encode("broken \ud800 surrogate")


def test_out_of_range_ids_are_named_errors(tok: Tokenizer) -> None:
    for bad in (-1, tok.vocab_size):
        with pytest.raises(TokenizerError):
            tok.token_bytes(bad)
        with pytest.raises(TokenizerError):
            tok.id_to_token(bad)
        with pytest.raises(TokenizerError):
            tok.decode([5, bad])


# -- save / load --------------------------------------------------------------------------------------
def test_save_writes_both_files_and_no_leftovers(saved_dir: Path, tok: Tokenizer, loaded: Tokenizer) -> None:
    assert sorted(p.name for p in saved_dir.iterdir()) == sorted([TOKENIZER_FILE, CONFIG_FILE])
    config = json.loads((saved_dir / CONFIG_FILE).read_text())
    assert config["eos_ids"] == [0, 2] and config["pre"] == "smollm"
    for attr in ("bos_id", "eos_id", "eos_ids", "special_ids", "vocab_size", "add_bos", "pre"):
        assert getattr(loaded, attr) == getattr(tok, attr), attr
    assert [loaded.token_bytes(i) for i in range(0, tok.vocab_size, 97)] == [
        tok.token_bytes(i) for i in range(0, tok.vocab_size, 97)
    ]


def test_load_of_missing_or_broken_files(tmp_path: Path, saved_dir: Path) -> None:
    with pytest.raises(TokenizerError, match="no saved tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_bytes((saved_dir / TOKENIZER_FILE).read_bytes())
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(TokenizerError, match="unreadable"):
        Tokenizer.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text('{"format": 1}')
    with pytest.raises(TokenizerError, match="missing or bad field"):
        Tokenizer.load(tmp_path)


# -- small synthetic GGUF files -------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet, written out independently of llmos.tokenizer."""
    keep = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    chars = {b: chr(b) for b in keep}
    shifted = [b for b in range(256) if b not in chars]
    chars.update({b: chr(0x100 + n) for n, b in enumerate(shifted)})
    return [chars[b] for b in range(256)]


BYTES = _byte_chars()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<tool>", "my tool"]
WORDS = ["he", "ll", "hell", "hello", "12", "123", "1234", "12345", "45"]
MERGES = ["h e", "l l", "he ll", "hell o", "1 2", "12 3", "123 4", "1234 5", "4 5"]
TOKENS = SPECIALS + USER_DEFINED + BYTES + WORDS
TYPES = [3] * len(SPECIALS) + [4] * len(USER_DEFINED) + [1] * (len(BYTES) + len(WORDS))


def _good_kv() -> dict[str, Any]:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": list(TOKENS),
        "tokenizer.ggml.merges": list(MERGES),
        "tokenizer.ggml.token_type": list(TYPES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


_write_gguf = write_metadata_gguf


def _tiny(tmp_path: Path, **changes: Any) -> Tokenizer:
    kv = _good_kv()
    for key, value in changes.items():
        full = "tokenizer.ggml." + key
        if value is None:
            kv.pop(full)
        else:
            kv[full] = value
    n = len(list(tmp_path.glob("tiny*.gguf")))  # a fresh file each time: older ones may still be mapped
    return Tokenizer.from_gguf(_write_gguf(tmp_path / f"tiny{n}.gguf", kv))


def _ids(*tokens: str) -> list[int]:
    return [TOKENS.index(t) for t in tokens]


def test_tiny_vocabulary_merges_and_token_kinds(tmp_path: Path) -> None:
    tok = _tiny(tmp_path)
    assert tok.encode("hello") == _ids("hello")
    assert tok.special_ids == {0, 1, 2}
    # user-defined tokens are matched even when special text is not parsed, and decode to their raw text
    ids = tok.encode("use <tool> on my tool", parse_special=False)
    assert _ids("<tool>")[0] in ids and _ids("my tool")[0] in ids
    assert tok.decode(ids) == "use <tool> on my tool"
    assert tok.token_bytes(_ids("my tool")[0]) == b"my tool"
    assert [tok.token_bytes(5 + b) for b in range(256)] == [bytes([b]) for b in range(256)]
    assert tok.encode("<|im_end|>") == [2]
    assert 2 not in tok.encode("<|im_end|>", parse_special=False)


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        ("smollm", ["1", "2", "3", "4", "5"]),  # every digit alone
        ("qwen2", ["1", "2", "3", "4", "5"]),
        ("gpt-2", ["12345"]),  # a digit run is one word
        ("llama-bpe", ["123", "45"]),  # runs of at most three digits
        ("default", ["123", "45"]),
    ],
)
def test_pre_tokenizers_split_numbers_as_llamacpp_does(tmp_path: Path, pre: str, expected: list[str]) -> None:
    tok = _tiny(tmp_path, pre=pre, add_bos_token=False)
    assert tok.encode("12345") == _ids(*expected)


def test_llama3_adds_bos_unless_the_gguf_says_otherwise(tmp_path: Path) -> None:
    assert _tiny(tmp_path, pre="llama-bpe").encode("hello") == [1, *_ids("hello")]
    assert _tiny(tmp_path, pre="smollm", add_bos_token=True).encode("hello") == [1, *_ids("hello")]
    assert _tiny(tmp_path, pre="llama-bpe", add_bos_token=False).encode("hello") == _ids("hello")


def test_eos_ids_include_end_of_turn_tokens(tmp_path: Path) -> None:
    assert _tiny(tmp_path).eos_ids == {0, 2}
    assert _tiny(tmp_path, eos_token_id=0, eot_token_id=1).eos_ids == {0, 1, 2}


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"model": None}, TokenizerError, "tokenizer.ggml.model"),
        ({"model": "llama"}, TokenizerError, "one score per token"),  # SentencePiece needs scores
        ({"model": "bert"}, UnsupportedModelError, "'bert' is not supported"),
        ({"pre": "no-such-pre"}, UnsupportedModelError, "'no-such-pre' is not supported"),
        ({"pre": None}, TokenizerError, "tokenizer.ggml.pre is missing"),
        ({"tokens": None}, TokenizerError, "tokenizer.ggml.tokens is missing"),
        ({"merges": None}, TokenizerError, "tokenizer.ggml.merges is missing"),
        ({"token_type": None}, TokenizerError, "token_type is missing"),
        ({"token_type": TYPES[:-1]}, TokenizerError, "entries for"),
        ({"eos_token_id": None}, TokenizerError, "eos_token_id is missing"),
        ({"eos_token_id": len(TOKENS)}, TokenizerError, "outside the vocabulary"),
        ({"bos_token_id": None, "add_bos_token": True}, TokenizerError, "no bos_token_id"),
        ({"merges": [*MERGES, "he zz"]}, TokenizerError, "do not form a BPE vocabulary"),
        ({"merges": [*MERGES, "nospace"]}, TokenizerError, "not two tokens"),
        ({"tokens": [*TOKENS[:-1], "he"]}, TokenizerError, "appears twice"),
    ],
)
def test_bad_metadata_is_a_named_error(
    tmp_path: Path, changes: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _tiny(tmp_path, **changes)
