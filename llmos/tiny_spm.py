"""A tiny SentencePiece vocabulary (GGUF `tokenizer.ggml.model = "llama"`) laid out like Gemma's, for
tiny test models: tokens, scores and token types as llama.cpp's converter writes them.

  ids 0..5     `<pad>`, `<eos>`, `<bos>`, `<unk>` (UNKNOWN), `<start_of_turn>`, `<end_of_turn>` (CONTROL)
  id  6        `<custom>` (USER_DEFINED: always matched as a whole, like Gemma's `<unusedN>`)
  ids 7..262   `<0x00>` … `<0xFF>` (BYTE: what characters outside the vocabulary fall back to)
  then         single characters (`▁` is the space), then pieces cut from a small word list, scored in a
               shuffled order so that merge priority is not simply by length, then filler pieces
pad = 0, eos = 1, bos = 2, unk = 3, as in Gemma 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

SPACE = "▁"
SPM_SPECIALS = (
    ("<pad>", 3),
    ("<eos>", 3),
    ("<bos>", 3),
    ("<unk>", 2),
    ("<start_of_turn>", 3),
    ("<end_of_turn>", 3),
)
TYPE_NORMAL, TYPE_USER_DEFINED, TYPE_BYTE = 1, 4, 6
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

_CHARS = (
    [SPACE, "\n", "\t"]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    + list("0123456789.,!?;:'\"()-_/<>{}[]=+*#@&%$é")
)
_WORDS = (  # noqa: SIM905 (a word list reads best as text)
    "Hello world the quick brown fox jumps over a lazy dog and it is of to in that with for "
    "this model tokenizer sentence piece name colour capital France Paris weather Oslo city "
    "user assistant system tool call answer json true false null"
).split()


@dataclass(frozen=True)
class SpmVocab:
    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID
    pad_id: int = PAD_ID


def tiny_spm_vocab(n_vocab: int | None = None, seed: int = 0) -> SpmVocab:
    tokens = [t for t, _ in SPM_SPECIALS] + ["<custom>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [k for _, k in SPM_SPECIALS] + [TYPE_USER_DEFINED] + [TYPE_BYTE] * 256
    scores = [0.0] * len(tokens)
    present = set(tokens)
    pieces: list[str] = []
    for word in _WORDS:
        for text in (word, SPACE + word):
            for start in range(len(text)):
                for end in range(start + 2, len(text) + 1):
                    piece = text[start:end]
                    if piece not in present and piece not in pieces:
                        pieces.append(piece)
    pieces += [SPACE * 2, SPACE * 4, "\n\n", SPACE + "\n"]
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(pieces), size=len(pieces) * 3 // 4, replace=False).tolist())
    chosen = [pieces[i] for i in keep]
    order = rng.permutation(len(chosen))  # score rank unrelated to length or position
    for char in _CHARS:
        tokens.append(char)
        types.append(TYPE_NORMAL)
        scores.append(-10000.0 - len(scores))
        present.add(char)
    for rank, i in enumerate(order):
        tokens.append(chosen[i])
        types.append(TYPE_NORMAL)
        scores.append(-float(rank + 1))
        present.add(chosen[i])
    if n_vocab is not None:
        if n_vocab < len(tokens):
            raise ValueError(f"n_vocab {n_vocab} is below the tiny SentencePiece vocabulary's {len(tokens)}")
        for left, right in product("abcdefghijklmnopqrstuvwxyz", repeat=2):
            if len(tokens) >= n_vocab:
                break
            if left + right not in present:
                tokens.append(left + right)
                types.append(TYPE_NORMAL)
                scores.append(-5000.0 - len(tokens))
                present.add(left + right)
    return SpmVocab(tokens=tokens, scores=scores, token_types=types)
