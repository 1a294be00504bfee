"""How much text can fit the context, known before any work is done on it.

Rendering a prompt and tokenizing it are linear in its size: about 0.7 s and a few hundred bytes of
memory per token for each MiB of text. Sizing that work by what a caller chose to send would let one
call take the service's memory and time (a 20 MiB prompt once peaked at 3 GB and stalled every other
caller for half a minute). So text is measured first, and refused by its size alone when it cannot fit:
every token stands for at most `max_token_bytes` bytes (the longest entry of the vocabulary, 81 for
SmolLM2), so a text of more than `context_length * max_token_bytes` bytes needs more tokens than the
context holds however it tokenizes. What passes is bounded by the context, not by the caller; a hard cap
bounds models with very long contexts too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from llmos.errors import ContextOverflowError, InputTooLargeError

HARD_CAP_BYTES = 4 << 20  # no one text, whatever the model, is worth more work than this


def text_bytes(text: str, limit: int) -> int:
    """UTF-8 size of `text`, or a number over `limit` as soon as that is certain (a character is at
    least one byte, so a text of more than `limit` characters is not encoded to be measured)."""
    if len(text) > limit:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


class InputBounds:
    def __init__(self, context_length: int, max_token_bytes: int, hard_cap: int = HARD_CAP_BYTES) -> None:
        self.context_length = context_length
        self.max_token_bytes = max(1, max_token_bytes)
        self.hard_cap = hard_cap
        self.max_bytes = min(context_length * self.max_token_bytes, hard_cap)

    def check_text(self, text: str, what: str) -> int:
        """The size of `text` in bytes if it might fit; else a named error saying which limit it is over."""
        size = text_bytes(text, self.max_bytes)
        if size > self.max_bytes:
            self._refuse(size, what)
        return size

    def check_messages(self, messages: Iterable[Mapping[str, Any]], what: str = "the conversation") -> int:
        """Every message's text, and all of it together (a conversation is one prompt)."""
        total = 0
        for m in messages:
            content = m.get("content")
            if isinstance(content, str):
                total += self.check_text(content, f"a {m.get('role', 'message')} message")
            if total > self.max_bytes:
                self._refuse(total, what)
        return total

    def _refuse(self, size: int, what: str) -> None:
        if size > self.hard_cap and self.hard_cap < self.context_length * self.max_token_bytes:
            raise InputTooLargeError(f"{what} is over {self.hard_cap:,} bytes, the most one text may be")
        at_least = -(-size // self.max_token_bytes)
        raise ContextOverflowError(
            at_least,
            self.context_length,
            what,
            message=(
                f"{what} is at least {size:,} bytes, which needs at least {at_least:,} tokens (no token "
                f"of this model stands for more than {self.max_token_bytes} bytes), but the context holds "
                f"{self.context_length:,}"
            ),
        )
