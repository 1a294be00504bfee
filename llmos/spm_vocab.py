"""A `tokenizers` BPE that splits text exactly as llama.cpp's SentencePiece tokenizer (GGUF
`tokenizer.ggml.model = "llama"`: Gemma, Llama 2, Mistral) does, built from the GGUF's tokens and scores.

llama.cpp's SPM tokenizer (llm_tokenizer_spm) writes spaces as "▁" (and puts one in front when
`tokenizer.ggml.add_space_prefix`, after every special token too), starts from single characters, and
repeatedly merges the adjacent pair whose concatenation is a vocabulary entry with the highest score (the
leftmost of equals) until no adjacent pair is one; a character that is no entry becomes the `<0xXX>`
tokens of its UTF-8 bytes. That is BPE whose merge ranks follow the merged entry's score: every way of
cutting an entry into two entries is a merge, ranked by that entry's score (`spm_merges`), with byte
fallback. `tokenizers` splits special and user-defined tokens out first and normalizes each remaining
piece on its own, which is llama.cpp's fragment handling.

One difference is possible in principle: two *different* entries with the same score competing for
overlapping pairs are ordered by rank here and by position in llama.cpp. Real vocabularies give their
merge candidates distinct scores; tests/test_spm_tokenizer.py checks ids against llama.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

SPACE = "▁"  # U+2581, SentencePiece's visible space


def spm_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every (left, right) pair of entries whose concatenation is an entry, best-scored result first
    (ties: lower id, then shorter left part, so the order is deterministic)."""
    index = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, str, str]] = []
    for i, text in enumerate(tokens):
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in index and right in index:
                found.append((-float(scores[i]), i, cut, left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def byte_token(byte: int) -> str:
    return f"<0x{byte:02X}>"


def spm_tokenizer(
    tokens: Sequence[str], scores: Sequence[float], *, add_space_prefix: bool, unk: str | None
) -> HFTokenizer:
    """The BPE core (model, normalizer, decoder); the caller adds the special tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab,
        merges=spm_merges(tokens, scores),
        byte_fallback=all(byte_token(b) in vocab for b in range(256)),
        unk_token=unk,
        fuse_unk=False,
    )
    hf = HFTokenizer(bpe)
    steps = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(decode)
    return hf
