"""Shared-prefix cache: the KV of a prompt's opening tokens (template + system prompt), kept once.

Most first turns start the same way: the chat template's header and a system prompt (SmolLM2's template
even adds a default one). Their keys and values do not depend on what follows (attention is causal and
positions start at 0), so a new session copies them in and prefills only the rest.

Which tokens are "the prefix"? Not guessed from text: the messages are rendered twice with two different
final user turns, and the tokens the two renderings share are the prefix. That is exact for any template
and tokenizer (a BPE merge across the boundary just makes the shared part shorter), and the entry found
for a prompt is always checked token by token against it.

Entries belong to an owner (the arbiter's account, app id and uid) and serve only it: whether another
app's system prompt was cached would show in one's own timing, telling one app what another asked.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

PROBES = ("\x01 probe A", "\x02 probe B")
MIN_PREFIX = 16  # shorter prefixes are not worth a copy and an entry


class PrefixCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        # (owner, prefix tokens) -> its KV; least recently used first
        self.entries: OrderedDict[tuple[Hashable, tuple[int, ...]], np.ndarray] = OrderedDict()
        self._prefix_of: OrderedDict[str, list[int]] = OrderedDict()  # rendered-prefix memo
        self.hits = 0
        self.misses = 0

    def _matches(self, owner: Hashable, ids: list[int]) -> list[tuple[Hashable, tuple[int, ...]]]:
        return [
            key
            for key in self.entries
            if key[0] == owner and len(key[1]) < len(ids) and tuple(ids[: len(key[1])]) == key[1]
        ]

    def lookup(self, owner: Hashable, ids: list[int]) -> tuple[int, np.ndarray] | None:
        """`owner`'s longest cached prefix of `ids` shorter than `ids` (one token is left to prefill)."""
        found = self._matches(owner, ids)
        if not found:
            self.misses += 1
            return None
        best = max(found, key=lambda key: len(key[1]))
        self.hits += 1
        self.entries.move_to_end(best)
        return len(best[1]), self.entries[best]

    def longest(self, owner: Hashable, ids: list[int]) -> int:
        """How many tokens of `ids` `owner`'s best entry would give (no hit counted)."""
        return max((len(key[1]) for key in self._matches(owner, ids)), default=0)

    def wants(self, owner: Hashable, prefix: list[int]) -> bool:
        key = (owner, tuple(prefix))
        return self.max_entries > 0 and len(prefix) >= MIN_PREFIX and key not in self.entries

    def add(self, owner: Hashable, prefix: list[int], kv: np.ndarray) -> None:
        self.entries[(owner, tuple(prefix))] = kv
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def evict_one(self) -> int:
        """Drop the least recently used entry; the bytes freed (0 if empty)."""
        if not self.entries:
            return 0
        return int(self.entries.popitem(last=False)[1].nbytes)

    def clear(self) -> None:
        self.entries.clear()

    def nbytes(self) -> int:
        return sum(int(kv.nbytes) for kv in self.entries.values())

    def shared_prefix(
        self, messages: list[dict[str, str]], encode: Callable[[list[dict]], list[int]]
    ) -> list[int]:
        """The tokens every prompt with these messages before its last user turn starts with."""
        if not messages or messages[-1].get("role") != "user":
            return []
        head = messages[:-1]
        memo_key = json.dumps(head, sort_keys=True)
        if memo_key in self._prefix_of:
            self._prefix_of.move_to_end(memo_key)
            return self._prefix_of[memo_key]
        a, b = (encode([*head, {"role": "user", "content": p}]) for p in PROBES)
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        self._prefix_of[memo_key] = a[:n]
        while len(self._prefix_of) > 4 * max(self.max_entries, 1):
            self._prefix_of.popitem(last=False)
        return a[:n]
