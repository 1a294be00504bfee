"""Byte-level BPE tokenizer built from a GGUF file's own metadata, matching llama.cpp token for token.

The GGUF carries everything a tokenizer needs (tokens, merges, token types, the pre-tokenizer name), so
there is no Hugging Face hub and no `transformers` at run time: the Rust `tokenizers` library does the
BPE, configured here with the same pre-tokenizer regexes llama.cpp uses for each `tokenizer.ggml.pre`.
Building from a GGUF is done once at model import and saved as `tokenizer.json`; `load` is the fast path.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llmos.errors import TokenizerError, UnsupportedModelError
from llmos.spm_vocab import SPACE, spm_tokenizer

if TYPE_CHECKING:  # the gguf reader is only needed at import time, not to load a model
    from llmos.gguf_file import GGUFFile

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
_CONFIG_FORMAT = 1

# GGUF token types (llama.cpp's llama_token_type).
_TYPE_NORMAL = 1
_TYPE_CONTROL = 3
_TYPE_USER_DEFINED = 4

# Pre-tokenizer regexes, as llama.cpp's llama-vocab.cpp spells them for each pre-tokenizer type. llama.cpp
# applies a list of them one after the other, each splitting the pieces the previous one produced and
# keeping matched and unmatched parts alike: that is `Split(pattern, "isolated")` in `tokenizers`.
# llama.cpp's GPT-2 regex has no trailing `|\s+`, but its hand-written GPT-2 splitter behaves as if it had.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS_ANY_CASE = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS_ANY_CASE
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS_ANY_CASE
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    patterns: tuple[str, ...]
    ignore_merges: bool = False  # a whole word that is in the vocabulary is taken as is (llama 3)
    add_bos_default: bool = False  # llama.cpp's default when the GGUF does not say


_LLAMA3_PRE = _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos_default=True)

#: `tokenizer.ggml.pre` values this tokenizer reproduces exactly.
PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    # SmolLM: every number code point on its own, then GPT-2 byte-level splitting.
    "smollm": _PreTokenizer((r"\p{N}", _GPT2)),
    "gpt-2": _PreTokenizer((_GPT2,)),
    # llama.cpp's fallback regex list (its LLAMA_VOCAB_PRE_TYPE_DEFAULT).
    "default": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    "qwen2": _PreTokenizer((_QWEN2,)),
    "llama-bpe": _LLAMA3_PRE,
    "llama3": _LLAMA3_PRE,
    "llama-v3": _LLAMA3_PRE,
}

# Longer texts are encoded without holding Python's GIL, so other threads (the service's event loop, the
# engine) run meanwhile; shorter ones take microseconds and the single-text call is cheaper for them.
GIL_FREE_CHARS = 8192

# Token texts that end a turn in the chat formats llmos meets; they stop generation like EOS does
# (llama.cpp's end-of-generation list has them too).
_END_OF_TURN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>")


def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: which printable character stands for which byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0, 0xAD)
    are given the code points from U+0100 upwards, in byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in alphabet.values():
            alphabet[chr(0x100 + extra)] = b
            extra += 1
    return alphabet


_CHAR_TO_BYTE = _byte_alphabet()
# str.translate table: byte-level character -> the Latin-1 character of its byte, so `.encode("latin-1")`
# turns a whole token into its raw bytes in one C call.
_TO_LATIN1 = {ord(ch): b for ch, b in _CHAR_TO_BYTE.items()}


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Tokenizer:
    """Text <-> token ids for one model. Thread-safe: encoding and decoding keep no per-call state.

    Ids are llama.cpp's, including its one lossy case: a byte with no token in the vocabulary (SmolLM2
    has none for 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D) is dropped from the encoding, as llama.cpp drops it.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        bos_id: int | None,
        eos_id: int,
        eos_ids: Iterable[int],
        add_bos: bool,
        pre: str,
        model: str = "gpt2",
    ) -> None:
        """Wrap a configured `tokenizers.Tokenizer`; use `from_gguf` or `load` rather than this.
        `model` is the GGUF's tokenizer kind: "gpt2" (byte-level BPE) or "llama" (SentencePiece)."""
        self._hf = hf
        self._hf_raw: HFTokenizer | None = None  # a twin that reads special-token text as plain text
        self._raw_lock = threading.Lock()
        self._vocab_size = hf.get_vocab_size(with_added_tokens=True)
        added = hf.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._added_ids = frozenset(added)
        self._bytes: list[bytes] | None = None
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = frozenset(eos_ids) | {eos_id}
        self.add_bos = add_bos
        self.pre = pre
        self.model = model
        for name, i in (("bos", bos_id), ("eos", eos_id)):
            if i is not None and not 0 <= i < self._vocab_size:
                raise TokenizerError(f"{name} token id {i} is outside the vocabulary of {self._vocab_size}")
        if add_bos and bos_id is None:
            raise TokenizerError("the model asks for a BOS token but has no bos_token_id")

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        """Build the tokenizer from `tokenizer.ggml.*` metadata (slow-ish: done once, at import).

        `tokenizer.ggml.model` "gpt2" is byte-level BPE (SmolLM, Qwen, Llama 3) with the pre-tokenizer
        `tokenizer.ggml.pre` names; "llama" is SentencePiece (Gemma, Llama 2), see llmos/spm_vocab.py.
        """
        where = str(gguf.path)
        model = gguf.get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError(f"{where}: tokenizer metadata is missing (no tokenizer.ggml.model)")
        if model not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"{where}: tokenizer model {model!r} is not supported "
                "(byte-level BPE 'gpt2' and SentencePiece 'llama' are)"
            )
        pre: _PreTokenizer | None = None
        pre_name = "spm"
        if model == "gpt2":
            pre_name = gguf.get("tokenizer.ggml.pre")
            if pre_name is None:
                raise TokenizerError(
                    f"{where}: tokenizer.ggml.pre is missing, so the pre-tokenizer is unknown "
                    "(re-convert the model with a current llama.cpp convert_hf_to_gguf.py)"
                )
            pre = PRE_TOKENIZERS.get(str(pre_name))
            if pre is None:
                raise UnsupportedModelError(
                    f"{where}: pre-tokenizer {pre_name!r} is not supported "
                    f"(supported: {', '.join(PRE_TOKENIZERS)})"
                )
        tokens = _string_list(gguf, "tokenizer.ggml.tokens")
        types = gguf.get("tokenizer.ggml.token_type")
        if types is None:
            raise TokenizerError(f"{where}: tokenizer.ggml.token_type is missing (it marks special tokens)")
        types = np.asarray(types)
        if types.ndim != 1 or len(types) != len(tokens) or not np.issubdtype(types.dtype, np.integer):
            raise TokenizerError(
                f"{where}: tokenizer.ggml.token_type has {types.size} entries for {len(tokens)} tokens"
            )
        eos_id = _token_id(gguf, "tokenizer.ggml.eos_token_id", len(tokens))
        if eos_id is None:
            raise TokenizerError(f"{where}: tokenizer.ggml.eos_token_id is missing (nothing ends a reply)")
        bos_id = _token_id(gguf, "tokenizer.ggml.bos_token_id", len(tokens))
        add_bos_meta = gguf.get("tokenizer.ggml.add_bos_token")
        # llama.cpp's defaults when the GGUF does not say: per pre-tokenizer for BPE, BOS for SPM
        add_bos_default = pre.add_bos_default if pre is not None else True
        add_bos = add_bos_default if add_bos_meta is None else bool(add_bos_meta)

        vocab: dict[str, int] = {}
        for i, text in enumerate(tokens):
            if not text:
                text = tokens[i] = f"[EMPTY_{i}]"  # what llama.cpp calls an empty token
            if vocab.setdefault(text, i) != i:
                raise TokenizerError(f"{where}: token {text!r} appears twice (ids {vocab[text]} and {i})")
        if pre is not None:
            hf = _byte_level_bpe(where, vocab, _string_list(gguf, "tokenizer.ggml.merges"), pre)
        else:
            scores = gguf.get("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise TokenizerError(f"{where}: a SentencePiece vocabulary needs one score per token")
            unk_id = _token_id(gguf, "tokenizer.ggml.unknown_token_id", len(tokens))
            hf = spm_tokenizer(
                tokens,
                np.asarray(scores, dtype=np.float64).tolist(),
                add_space_prefix=bool(gguf.get("tokenizer.ggml.add_space_prefix", True)),
                unk=None if unk_id is None else tokens[unk_id],
            )
        control = np.flatnonzero(types == _TYPE_CONTROL).tolist()
        user = np.flatnonzero(types == _TYPE_USER_DEFINED).tolist()
        # Control tokens are only recognised in text when asked (parse_special); user-defined tokens always.
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
        hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])

        eos_ids = {eos_id}
        for text in _END_OF_TURN_TEXTS:
            if (i := vocab.get(text)) is not None:
                eos_ids.add(i)
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if (i := _token_id(gguf, key, len(tokens))) is not None:
                eos_ids.add(i)
        return cls(
            hf, bos_id=bos_id, eos_id=eos_id, eos_ids=eos_ids, add_bos=add_bos, pre=str(pre_name), model=model
        )

    def hf_json(self) -> str:
        """The `tokenizers` JSON of this tokenizer (what grammar engines such as llguidance load)."""
        return self._hf.to_str()

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (each atomically) into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        config = {
            "format": _CONFIG_FORMAT,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "eos_ids": sorted(self.eos_ids),
            "add_bos": self.add_bos,
            "pre": self.pre,
            "model": self.model,
        }
        _write_atomic(d / TOKENIZER_FILE, self._hf.to_str())
        _write_atomic(d / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Read a tokenizer written by `save` (the fast path, used every time a model is opened)."""
        d = Path(directory)
        try:
            config = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
            hf = HFTokenizer.from_file(str(d / TOKENIZER_FILE))
        except FileNotFoundError as e:
            raise TokenizerError(f"{d}: no saved tokenizer ({e.filename} is missing)") from e
        except Exception as e:  # bad JSON in either file
            raise TokenizerError(f"{d}: saved tokenizer is unreadable ({e})") from e
        if not isinstance(config, dict) or config.get("format") != _CONFIG_FORMAT:
            raise TokenizerError(f"{d}/{CONFIG_FILE}: unknown format (expected format {_CONFIG_FORMAT})")
        try:
            return cls(
                hf,
                bos_id=config["bos_id"],
                eos_id=int(config["eos_id"]),
                eos_ids=[int(i) for i in config["eos_ids"]],
                add_bos=bool(config["add_bos"]),
                pre=str(config["pre"]),
                model=str(config.get("model", "gpt2")),  # saved before SentencePiece: byte-level BPE
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerError(f"{d}/{CONFIG_FILE}: missing or bad field ({e})") from e

    # -- encoding -----------------------------------------------------------------------------------
    def encode(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; BOS first only if the model asks for it (`add_bos`).

        With `parse_special`, control-token text such as `<|im_start|>` becomes that token's id (what
        a rendered chat template needs); without it, such text is tokenized as ordinary characters (what
        untrusted user text needs, so it cannot forge turn boundaries). A text that already starts with
        the BOS token (a chat template that writes `{{ bos_token }}`, as Llama 3's and Gemma's do) does
        not get a second one: llama.cpp's chat path strips the template's BOS for the same reason.
        """
        hf = self._hf if parse_special else self._raw()
        try:
            if len(text) <= GIL_FREE_CHARS:
                ids: list[int] = hf.encode(text, add_special_tokens=False).ids
            else:  # the batch call releases the GIL (a single encode holds it: ~0.7 s per MiB)
                ids = hf.encode_batch([text], add_special_tokens=False)[0].ids
        except TypeError as e:  # not a str, or a str with lone surrogates (not encodable as UTF-8)
            raise TokenizerError(f"cannot tokenize {type(text).__name__}: need text of valid Unicode") from e
        if self.add_bos and self.bos_id is not None and not (parse_special and ids[:1] == [self.bos_id]):
            ids.insert(0, self.bos_id)
        return ids

    def _raw(self) -> HFTokenizer:
        """The twin tokenizer with special-token matching off, made on first use.

        A separate object instead of toggling `encode_special_tokens` per call, which would race
        between threads.
        """
        if self._hf_raw is None:
            with self._raw_lock:
                if self._hf_raw is None:
                    raw = HFTokenizer.from_str(self._hf.to_str())
                    raw.encode_special_tokens = True
                    self._hf_raw = raw
        return self._hf_raw

    # -- decoding -----------------------------------------------------------------------------------
    def _byte_table(self) -> list[bytes]:
        """Raw bytes of every token, built on first use (~20 ms) so `load` stays fast."""
        table = self._bytes
        if table is None:
            table = []
            for i in range(self._vocab_size):
                text = self._hf.id_to_token(i) or ""
                if i in self._added_ids:
                    table.append(text.encode("utf-8"))  # special and user-defined tokens are literal text
                    continue
                if self.model == "llama":  # SentencePiece: "▁" is a space, <0xXX> one byte
                    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                        try:
                            table.append(bytes([int(text[3:5], 16)]))
                            continue
                        except ValueError:
                            pass
                    table.append(text.replace(SPACE, " ").encode("utf-8"))
                    continue
                try:
                    table.append(text.translate(_TO_LATIN1).encode("latin-1"))
                except UnicodeEncodeError:  # not byte-level text: the best reading is the literal text
                    table.append(text.encode("utf-8"))
            self._bytes = table
        return table

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for: a text of N bytes needs at least
        N / max_token_bytes tokens, which bounds prompts by size before any work on them."""
        return max(len(b) for b in self._byte_table())

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (may be part of a UTF-8 character); specials give their text."""
        if not 0 <= token_id < self._vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary of {self._vocab_size}")
        return self._byte_table()[token_id]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`. Bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        table = self._byte_table()
        n = self._vocab_size
        try:
            if skip_special:
                special = self._special_ids
                data = b"".join(table[i] for i in ids if i not in special)
            else:
                data = b"".join([table[i] for i in ids])
        except (IndexError, TypeError) as e:
            raise TokenizerError(f"cannot decode {list(ids)[:8]}: not all are token ids below {n}") from e
        if ids and min(ids) < 0:  # a negative id indexes from the end of the table instead of failing
            raise TokenizerError(f"token id {min(ids)} is outside the vocabulary of {n}")
        return data.decode("utf-8", errors="replace")

    # -- vocabulary ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of control tokens (GGUF token type 3): chat markers, EOS and the like."""
        return self._special_ids

    def id_to_token(self, token_id: int) -> str:
        """The token's text as the vocabulary stores it (byte-level form, e.g. 'Ġthe')."""
        text = self._hf.id_to_token(token_id) if 0 <= token_id < self._vocab_size else None
        if text is None:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary of {self._vocab_size}")
        return text

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry given in its stored form, or None if there is none."""
        return self._hf.token_to_id(token)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self._vocab_size}, "
            f"eos_ids={sorted(self.eos_ids)})"
        )


def _byte_level_bpe(where: str, vocab: dict[str, int], merges: list[str], pre: _PreTokenizer) -> HFTokenizer:
    pairs: list[tuple[str, str]] = []
    for n, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise TokenizerError(f"{where}: merge #{n} {merge!r} is not two tokens separated by a space")
        pairs.append((left, right))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges)
    except Exception as e:  # e.g. a merge whose result is not in the vocabulary
        raise TokenizerError(f"{where}: tokens and merges do not form a BPE vocabulary ({e})") from e
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), "isolated") for p in pre.patterns]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def _string_list(gguf: GGUFFile, key: str) -> list[str]:
    value: Any = gguf.get(key)
    if value is None:
        raise TokenizerError(f"{gguf.path}: {key} is missing")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokenizerError(f"{gguf.path}: {key} must be an array of strings")
    if not value:
        raise TokenizerError(f"{gguf.path}: {key} is empty")
    return list(value)


def _token_id(gguf: GGUFFile, key: str, n_tokens: int) -> int | None:
    value: Any = gguf.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TokenizerError(f"{gguf.path}: {key} must be an integer, not {value!r}")
    if not 0 <= int(value) < n_tokens:
        raise TokenizerError(f"{gguf.path}: {key} = {value} is outside the vocabulary of {n_tokens}")
    return int(value)
