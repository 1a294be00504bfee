"""Draft tokens without a draft model: prompt lookup (n-gram matching) in the sequence's own tokens.

What apps ask an OS service for is mostly grounded - summaries and extractions that quote their
passage, rewrites and code edits that return most of their input, tool calls whose arguments copy the
request, conversations that repeat names. So when the last few tokens of a sequence occurred before, in
its prompt (which holds the session's earlier turns too) or in its own output, the tokens that followed
them then are a good guess for what follows now. The guess costs a dictionary lookup; the model checks
it (llmos/engine/speculative.py), so a wrong guess costs time, never correctness.

The index maps every n-gram (for each size in `sizes`) to the position just after its latest
occurrence that has a continuation. A position is indexed when the token at it arrives, so the
sequence's own suffix is never its own match. Tokens are only ever appended (rejected draft tokens
never reach the drafter), so the index needs no rollback.
"""

from __future__ import annotations

from collections.abc import Iterable

SIZES = (3, 2)  # longest match first: a 3-gram match predicts better than a 2-gram one; 1-grams are noise


class NgramDrafter:
    def __init__(self, tokens: Iterable[int] = (), sizes: tuple[int, ...] = SIZES) -> None:
        self.sizes = sizes
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        toks, index = self.tokens, self.index
        for t in tokens:
            p = len(toks)  # position of t: the n-grams ending just before it now have a continuation
            toks.append(t)
            for n in self.sizes:
                if p >= n:
                    index[tuple(toks[p - n : p])] = p

    def sync(self, prompt: list[int], output: list[int]) -> None:
        """Catch up with a sequence (prompt then output) that has grown by tokens not seen yet."""
        seen = len(self.tokens) - len(prompt)
        if seen < len(output):
            self.extend(output[seen:])

    def draft(self, k: int, tail: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Up to `k` tokens that followed the longest recent n-gram equal to the current suffix (of the
        tokens seen, then `tail`: tokens certain to come next, such as a grammar's forced ones)."""
        if k <= 0:
            return []
        suffix = self.tokens[-max(self.sizes) :] + list(tail)
        for n in self.sizes:
            if len(suffix) >= n and (p := self.index.get(tuple(suffix[-n:]))) is not None:
                return self.tokens[p : p + k]
        return []
