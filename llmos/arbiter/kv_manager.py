"""KV memory outside the engine's slots: parked conversations, a global budget, swapping to disk.

A slot holds KV only while its request runs. When a session's turn ends its KV is copied out ("parked",
a few ms for 1k tokens) and the slot is freed, so sessions are not limited by slots. Parked KV counts
against one global budget together with the running slots and the shared-prefix cache. Over budget,
the least recently used parked session is compressed to int8 (per 16-token chunk) and written to disk;
its next prompt reads it back instead of re-running the prompt. Plain LRU rather than LLMS's LCTRU: with
recompute-free restore costing milliseconds either way, recency alone picks well (see docs).

A swap file that is missing or corrupt (checksummed) is not an error for the caller: the session's KV is
simply recomputed from its text, and the event is counted.

A swap file that cannot be written (a full or read-only disk) is not one either: the KV stays in memory,
over the budget, the failure is counted (`swap_failures`) and `swap_failing` stays set until a write
succeeds again. A full disk fails every swap-out of every request, so a pass stops at its first failed
write (each attempt costs a compression first) and the log gets one line, not one per attempt
(llmos.log_limit).
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
from llmos.log_limit import LimitedLog

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
        self.swap_failures = 0  # swap files that could not be written
        self.swap_failing = False  # the last write failed: parked KV over the budget stays in memory
        self._files = 0
        self.log = LimitedLog(log)
        where = swap.root if swap is not None else "disk"
        self._writes, self._reads, self._deletes = (
            f"swap {op} {where}" for op in ("writes to", "reads from", "deletes in")
        )

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
            self.log.failed(
                self._reads, f"{e}; recomputing its KV from the conversation instead", level=logging.WARNING
            )
            self.recomputed += 1
            return None
        finally:
            self._delete(entry.file_key)
        self.log.recovered(self._reads)
        self.restored_from_disk += 1
        return Restored(entry.ids, "disk", compressed=compressed)

    def drop(self, key: str) -> None:
        entry = self.parked.pop(key, None)
        if entry is not None and entry.kv is None:
            self._delete(entry.file_key)

    def _delete(self, file_key: str) -> None:
        """A swap file that cannot be deleted (a disk remounted read-only) only costs disk space until
        the daemon's directory is removed; it must not fail the turn or the session's close."""
        if self.swap is None:
            return
        try:
            self.swap.delete(file_key)
        except SwapFileError as e:
            self.log.failed(self._deletes, e, "The file stays until llmosd stops", level=logging.WARNING)
        else:
            self.log.recovered(self._deletes)

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
            self.swap_failures += 1
            self.swap_failing = True
            self.log.failed(self._writes, e, self._hint())
            return False
        entry.kv = None
        self.swapped_out += 1
        if self.swap_failing:
            self.swap_failing = False
            self.log.recovered(self._writes)
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
            if entry.kv is None or not entry.swappable:
                continue
            size = entry.resident_bytes
            if not self.swap_out(entry):  # the disk refuses: the next entry would only cost a compression
                break
            n, resident = n + 1, resident - size
        return n

    def swap_out_all(self) -> int:
        n = 0
        for entry in list(self.parked.values()):
            if entry.kv is None or not entry.swappable:
                continue
            if not self.swap_out(entry):
                break
            n += 1
        return n

    def stuck_bytes(self) -> int:
        """Parked KV in memory that should be on disk but is not, because swap writes fail."""
        if not self.swap_failing:
            return 0
        return sum(e.resident_bytes for e in self.parked.values() if e.swappable)

    def _hint(self) -> str:
        assert self.swap is not None
        return (
            f"The KV stays in memory, over [arbiter] kv_budget_mib ({self.budget_bytes >> 20} MiB): free "
            f"space in {self.swap.root}, set [arbiter] swap_dir to a larger disk, or raise kv_budget_mib "
            "(GetStatus: swap_failures, kv_over_budget_bytes)"
        )

    def by_app(self) -> dict[str, tuple[int, int]]:
        """app id -> (bytes in memory, bytes on disk) of its parked KV, all its users together."""
        out: dict[str, tuple[int, int]] = {}
        for e in self.parked.values():
            app = e.account[0]
            mem, disk = out.get(app, (0, 0))
            out[app] = (mem + e.resident_bytes, disk + (e.disk_bytes if e.kv is None else 0))
        return out
