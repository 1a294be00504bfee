"""Automatic prefix reuse for stateless clients: a finished request's KV is kept for its own account.

An OpenAI- or Ollama-style client sends the whole conversation every turn, so turn N's prompt starts
with turn N-1's prompt and answer. Keeping each finished request's KV (without a session of its own)
parked under its account lets the next request that starts with the same tokens copy it in and compute
only the rest, as vLLM's automatic prefix caching and llama.cpp's prompt cache do.

Only for the same account, (app id, uid), never across apps or users: whether another app's prompt
was cached shows in timing, which would tell one app what another asked. At most `per_account`
entries an account (least recently used dropped first); they are ordinary parked KV, so the global
budget covers them and, over it, they go to disk with every other idle KV. An entry is taken when used
(the request parks its own, longer, KV when it ends), so a conversation holds one entry, not one a turn.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from llmos.arbiter.kv_manager import KVManager
from llmos.arbiter.policy import Account

MIN_REUSE = 16  # fewer shared tokens are not worth a copy (the shared-prefix cache has the same floor)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class AutoPrefix:
    def __init__(self, kv: KVManager, per_account: int) -> None:
        self.kv = kv
        self.per_account = per_account
        self._keys: dict[Account, OrderedDict[str, None]] = {}
        self._n = 0
        self.hits = 0
        self.tokens = 0  # prompt tokens not computed thanks to it

    def best(self, account: Account, ids: list[int], better_than: int) -> tuple[str, int] | None:
        """The account's entry sharing the longest prefix with `ids` (more than `better_than` tokens and
        at least MIN_REUSE), and how many tokens it shares."""
        found: tuple[str, int] | None = None
        keys = self._keys.get(account, OrderedDict())
        for key in list(keys):
            entry = self.kv.parked.get(key)
            if entry is None:  # dropped by someone else (unload, pressure): forget it
                del keys[key]
                continue
            n = common_prefix(entry.ids, ids)
            if n >= MIN_REUSE and n > max(better_than, found[1] if found else 0):
                found = (key, n)
        return found

    def used(self, account: Account, key: str, tokens: int) -> None:
        self._keys.get(account, OrderedDict()).pop(key, None)
        self.hits += 1
        self.tokens += tokens

    def remember(self, account: Account, ids: list[int], kv: np.ndarray) -> None:
        if self.per_account <= 0 or len(ids) < MIN_REUSE:
            return
        keys = self._keys.setdefault(account, OrderedDict())
        self._n += 1
        key = f"auto-{self._n}"
        self.kv.park(key, account, ids, kv)
        keys[key] = None
        while len(keys) > self.per_account:
            old, _ = keys.popitem(last=False)
            self.kv.drop(old)

    def clear(self) -> None:
        for keys in self._keys.values():
            for key in keys:
                self.kv.drop(key)
        self._keys.clear()
