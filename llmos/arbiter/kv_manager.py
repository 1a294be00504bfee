"""KV memory outside the engine's slots: parked conversations, a global budget, swapping to disk.

A slot holds KV only while its request runs. When a session's turn ends its KV is copied out ("parked",
a few ms for 1k tokens) and the slot is freed, so sessions are not limited by slots. Parked KV counts
against one global budget together with the running slots and the shared-prefix cache. Over budget,
the least recently used parked session is compressed to int8 (per 16-token chunk) and written to disk;
its next prompt reads it back instead of re-running the prompt. Plain LRU rather than LLMS's LCTRU: with
recompute-free restore costing milliseconds either way, recency alone picks well (see docs).

A swap file that is missing or corrupt (checksummed) is not an error for the caller: the session's KV is
simply recomputed from its text, and the event is counted.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from llmos.arbiter.kv_codec import CompressedKV, compress, decompress
from llmos.arbiter.policy import Account
from llmos.arbiter.swap_store import SwapStore
from llmos.engine.kv_cache import KVCache
from llmos.errors import SwapFileError

log = logging.getLogger("llmos.kv")


@dataclass(eq=False)
class ParkedKV:
    key: str
    account: Account  # (app id, uid) whose KV this is
    ids: list[int]  # the tokens whose keys/values this holds
    kv: np.ndarray | None  # [layers, 2, kv_heads, len(ids), head_dim] while in memory
    swappable: bool = True  # a preempted request's KV stays in memory: it resumes soon
    file_key: str = ""  # its swap file's name (keys are D-Bus paths, not file names)
    disk_bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def resident_bytes(self) -> int:
        return int(self.kv.nbytes) if self.kv is not None else 0


@dataclass
class Restored:
    ids: list[int]
    source: str  # "memory" or "disk"
    kv: np.ndarray | None = None  # from memory
    compressed: CompressedKV | None = None  # from disk: decompressed straight into the slot

    def into(self, cache: KVCache, n: int) -> None:
        """Put the first `n` positions into `cache`."""
        if self.kv is not None:
            cache.load(self.kv[:, :, :, :n])
            return
        assert self.compressed is not None
        decompress(self.compressed, out=cache.fill(len(self.ids)))
        cache.truncate(n)


class KVManager:
    def __init__(self, budget_bytes: int, swap: SwapStore | None) -> None:
        self.budget_bytes = budget_bytes
        self.swap = swap
        self.parked: OrderedDict[str, ParkedKV] = OrderedDict()  # least recently used first
        self.swapped_out = 0
        self.restored_from_disk = 0
        self.recomputed = 0  # swap files found missing or corrupt
        self._files = 0

    def park(
        self, key: str, account: Account, ids: list[int], kv: np.ndarray, swappable: bool = True
    ) -> None:
        self.drop(key)
        self._files += 1
        self.parked[key] = ParkedKV(key, account, list(ids), kv, swappable, file_key=f"kv-{self._files}")
        log.debug("parked %s: %d tokens", key, len(ids))

    def has(self, key: str) -> bool:
        return key in self.parked

    def take(self, key: str) -> Restored | None:
        """Remove and return a parked KV (read back from disk if swapped); None if there is none or its
        swap file is unusable, in which case the caller recomputes."""
        entry = self.parked.pop(key, None)
        if entry is None:
            return None
        if entry.kv is not None:
            return Restored(entry.ids, "memory", kv=entry.kv)
        assert self.swap is not None
        try:
            compressed, meta = self.swap.read(entry.file_key)
            if meta.get("ids") != entry.ids or compressed.length != len(entry.ids):
                raise SwapFileError(f"swap file for {key} holds other tokens than the session")
        except SwapFileError as e:
            log.warning("%s; recomputing its KV from the conversation instead", e)
            self.recomputed += 1
            return None
        finally:
            self.swap.delete(entry.file_key)
        self.restored_from_disk += 1
        return Restored(entry.ids, "disk", compressed=compressed)

    def drop(self, key: str) -> None:
        entry = self.parked.pop(key, None)
        if entry is not None and entry.kv is None and self.swap is not None:
            self.swap.delete(entry.file_key)

    def resident_bytes(self) -> int:
        return sum(e.resident_bytes for e in self.parked.values())

    def swap_out(self, entry: ParkedKV) -> bool:
        if entry.kv is None or not entry.swappable or self.swap is None:
            return False
        t0 = time.perf_counter()
        try:
            meta = {"ids": entry.ids, "owner": entry.key}
            entry.disk_bytes = self.swap.write(entry.file_key, compress(entry.kv), meta)
        except SwapFileError as e:  # a full or read-only disk: keep the KV in memory, over budget, say so
            log.error("cannot swap %s out: %s", entry.key, e)
            return False
        entry.kv = None
        self.swapped_out += 1
        ms = 1e3 * (time.perf_counter() - t0)
        log.debug("swapped %s (%d tokens) out in %.1f ms", entry.key, len(entry.ids), ms)
        return True

    def enforce(self, other_bytes: int) -> int:
        """Swap least recently used parked KV out until parked + `other_bytes` fits the budget; returns
        how many entries went to disk."""
        n, resident = 0, self.resident_bytes()
        for entry in list(self.parked.values()):
            if resident + other_bytes <= self.budget_bytes:
                break
            size = entry.resident_bytes
            if self.swap_out(entry):
                n, resident = n + 1, resident - size
        return n

    def swap_out_all(self) -> int:
        return sum(self.swap_out(e) for e in list(self.parked.values()))

    def by_app(self) -> dict[str, tuple[int, int]]:
        """app id -> (bytes in memory, bytes on disk) of its parked KV, all its users together."""
        out: dict[str, tuple[int, int]] = {}
        for e in self.parked.values():
            app = e.account[0]
            mem, disk = out.get(app, (0, 0))
            out[app] = (mem + e.resident_bytes, disk + (e.disk_bytes if e.kv is None else 0))
        return out
