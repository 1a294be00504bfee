"""KV memory: one pool of per-sequence slots, bound to the graph in place, grown on demand.

The pool is a single float32 array [layers, 2, slots, kv_heads, capacity + 1, head_dim]. GroupQueryAttention
reads `past_*` and writes `present_*` into the same memory, so no step copies the cache. Rows of one layer
are contiguous by slot, so a batch of sequences in slots a..b is one view.

Memory: the array is a plain anonymous mmap, so only the positions a sequence really fills become
resident. (Not `np.zeros`: numpy advises transparent huge pages for large arrays, and then touching the
first position of a head's 2 MiB region makes the whole region resident.) The capacity starts small and
doubles up to the context length when a sequence needs more, because onnxruntime's attention scratch
space grows with the capacity (tokens x heads x capacity floats), not with the positions in use.

One extra position per slot (capacity + 1) lets a batched decode step write a throw-away row into a slot
that only fills a gap in the batch, at that slot's current length, without ever running off its end.

Positions per slot are a multiple of 16, so every [layer, K|V, slot] block starts and ends on a page
boundary (16 positions x heads x head_dim x 4 bytes is a multiple of 4 KiB for any head_dim multiple of
16), so a free slot's pages can be handed back to the kernel (MADV_DONTNEED, `trim_free`). Not on every
release, though: the kernel zeroes every page it hands out again, ~20 ms for the 47 MB of a 1k-token
SmolLM2 context, which would be most of the cost of resuming a parked conversation. So a freed slot
stays warm, its pages are counted (`warm_free_bytes`), and the arbiter trims them when its memory budget
or memory pressure says so.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from llmos.errors import CapacityError, ContextOverflowError

GROWTH_ALIGN = 16  # capacities are multiples of this


@dataclass
class KVCache:
    """One sequence's share of the pool: its slot and how many positions hold valid keys/values."""

    pool: KVPool
    slot: int
    length: int = 0

    @property
    def capacity(self) -> int:
        """The most positions this sequence may ever hold (the context length)."""
        return self.pool.max_len

    def reserve(self, n_new: int) -> None:
        """Make room for `n_new` more positions; a prompt is never silently cut."""
        if self.length + n_new > self.capacity:
            raise ContextOverflowError(self.length + n_new, self.capacity, "sequence")
        self.pool.ensure(self.length + n_new)

    def truncate(self, length: int) -> None:
        """Forget positions >= length (the memory is overwritten by the next write)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a {self.length}-token cache to {length}")
        self.length = length

    def copy_from(self, other: KVCache) -> None:
        """Copy another sequence's valid positions into this slot (forking a conversation)."""
        n = other.length
        self.pool.data[:, :, self.slot, :, :n] = self.pool.data[:, :, other.slot, :, :n]
        self.length = n

    def nbytes(self) -> int:
        return self.length * self.pool.bytes_per_token

    def export(self, length: int | None = None) -> np.ndarray:
        """A compact copy of the first `length` positions: [layers, 2, kv_heads, length, head_dim]."""
        n = self.length if length is None else length
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot export {n} positions of a {self.length}-position cache")
        return np.ascontiguousarray(self.pool.data[:, :, self.slot, :, :n])

    def fill(self, n: int) -> np.ndarray:
        """Make this slot hold `n` positions and return their view, for the caller to write into."""
        self.length = 0
        self.reserve(n)
        self.length = n
        return self.pool.data[:, :, self.slot, :, :n]

    def load(self, kv: np.ndarray) -> None:
        """Replace this slot's contents with an exported copy (the inverse of `export`)."""
        n = kv.shape[3]
        expect = (self.pool.n_layer, 2, self.pool.n_head_kv, n, self.pool.head_dim)
        if kv.shape != expect:
            raise ValueError(f"KV of shape {kv.shape} does not fit this pool (expected {expect})")
        self.fill(n)[...] = kv

    def free(self) -> None:
        self.pool.release(self)


class KVPool:
    def __init__(
        self, n_layer: int, n_head_kv: int, head_dim: int, max_len: int, slots: int, initial_len: int = 1024
    ) -> None:
        if slots < 1 or max_len < 1:
            raise ValueError("a KV pool needs at least one slot and one position")
        self.n_layer, self.n_head_kv, self.head_dim = n_layer, n_head_kv, head_dim
        self.max_len, self.slots = max_len, slots
        self.bytes_per_token = n_layer * 2 * n_head_kv * head_dim * 4
        self.generation = 0  # bumped when the array is replaced, so bindings are redone
        self.capacity = 0
        self.data = self._allocate(min(max_len, max(initial_len, 1)))
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out the lowest slot first
        self._owners: dict[int, KVCache] = {}
        self._warm = [0] * slots  # positions each slot has held since its pages were last discarded

    def _allocate(self, capacity: int) -> np.ndarray:
        positions = -(-(capacity + 1) // GROWTH_ALIGN) * GROWTH_ALIGN
        shape = (self.n_layer, 2, self.slots, self.n_head_kv, positions, self.head_dim)
        self._map = mmap.mmap(-1, int(np.prod(shape)) * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.capacity = positions - 1
        self._block = self.n_head_kv * positions * self.head_dim * 4  # bytes of one [layer, kind, slot]
        return np.frombuffer(self._map, dtype=np.float32).reshape(shape)  # zero-filled by the kernel

    def _discard(self, slot: int) -> None:
        """Give a free slot's pages back to the kernel; they read as zeros when next touched."""
        if self._block % mmap.PAGESIZE:
            return  # an odd head_dim: blocks are not page-aligned, keep the pages (correct, just bigger)
        for lk in range(self.n_layer * 2):
            self._map.madvise(mmap.MADV_DONTNEED, (lk * self.slots + slot) * self._block, self._block)

    def ensure(self, length: int) -> None:
        """Grow the capacity to hold `length` positions, copying every live sequence across."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ContextOverflowError(length, self.max_len, "sequence")
        want = -(-max(2 * self.capacity, length) // GROWTH_ALIGN) * GROWTH_ALIGN
        old = self.data
        new = self._allocate(min(self.max_len, want))
        for slot, cache in self._owners.items():
            new[:, :, slot, :, : cache.length] = old[:, :, slot, :, : cache.length]
        self._warm = [c.length if (c := self._owners.get(s)) else 0 for s in range(self.slots)]
        self.data = new
        self.generation += 1

    def allocate(self) -> KVCache:
        if not self._free:
            raise CapacityError(f"all {self.slots} KV slots are in use")
        self._free.sort(reverse=True)
        cache = KVCache(self, self._free.pop())
        self._owners[cache.slot] = cache
        return cache

    def release(self, cache: KVCache) -> None:
        if self._owners.get(cache.slot) is cache:
            del self._owners[cache.slot]
            self._free.append(cache.slot)
            self._warm[cache.slot] = max(self._warm[cache.slot], cache.length)
            cache.length = 0

    def warm_free_bytes(self) -> int:
        """Memory still held by free slots (what `trim_free` would give back)."""
        return sum(self._warm[s] for s in self._free) * self.bytes_per_token

    def trim_free(self) -> int:
        """Hand the pages of every free slot back to the kernel; returns the bytes given back."""
        freed = self.warm_free_bytes()
        for s in self._free:
            if self._warm[s]:
                self._discard(s)
                self._warm[s] = 0
        return freed

    def occupant(self, slot: int) -> KVCache | None:
        return self._owners.get(slot)

    @property
    def in_use(self) -> int:
        return len(self._owners)

    def layer_view(self, layer: int, kind: int, first_slot: int, n_slots: int) -> np.ndarray:
        """[n_slots, kv_heads, capacity + 1, head_dim] contiguous view for binding (kind 0 = K, 1 = V)."""
        return self.data[layer, kind, first_slot : first_slot + n_slots]
