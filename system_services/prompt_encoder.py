"""Long prompts are tokenized here: on threads, a few at a time, never on the event loop or the engine.

Tokenizing is linear in the text (~0.7 s and ~110 MB per 650 KB, the most a prompt can be and still
fit SmolLM2's context; see llmos.input_bounds). Done on the event loop it would stall every other caller
and the watchdog; done on the engine's thread, every other app's generation. Here it runs on a worker
thread with the GIL released (llmos.tokenizer encodes long texts that way), at most `concurrency` at once
so that peak memory is bounded whatever the number of callers, and the heap is trimmed afterwards so the
memory goes back to the system instead of staying in the daemon's RSS. Short prompts (the usual case)
skip all this: the engine's thread tokenizes them in well under a millisecond per KB.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from llmos.engine.memory import release_free_heap

T = TypeVar("T")

INLINE_BYTES = 16 * 1024  # up to this much text, tokenizing costs ~10 ms: not worth a thread hop
CONCURRENCY = 2  # long tokenizations at once (this many cores' worth; ~110 MB each at the largest)


class PromptEncoder:
    def __init__(self, concurrency: int = CONCURRENCY) -> None:
        self._slots = asyncio.Semaphore(concurrency)

    async def run(self, tokenize: Callable[[], T]) -> T:
        """`tokenize()`'s result, computed off the event loop (after waiting for a free slot)."""
        async with self._slots:
            return await asyncio.to_thread(_and_trim, tokenize)


def _and_trim(tokenize: Callable[[], T]) -> T:
    try:
        return tokenize()
    finally:
        release_free_heap()  # the tokenizer's scratch (offsets, token strings) is ~5x the ids it returns
