"""Who runs next: priority classes, deficit round robin between apps, preemption, prefill vs decode.

Requests wait in one queue per (class, app). Admission (getting a KV slot) goes to the highest class
with waiting work; within a class, apps take turns by deficit round robin on tokens: an app may start a
request while its deficit is positive, every token computed for it (prompt or generated) is charged to
it, and when no waiting app has credit left every waiting app gets `quantum` more. So an app that sends
twice the requests, or longer ones, gets the same tokens per second as a quieter app in its class, not
twice as many. When every slot is taken and a higher class waits, the most recently admitted request of
the lowest running class below it is preempted at the token boundary (its KV is parked, not lost).

Each step is one prefill chunk or one batched decode of every admitted, prefilled request. A prefill
goes first when its class is at least the highest decoding class (a new interactive request is not kept
behind background decoding); a lower-class prefill gets every other step, so it neither starves nor
holds up the classes above it for more than one chunk at a time.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict, deque
from typing import Literal

from llmos.arbiter.policy import Priority
from llmos.arbiter.request import Request

Step = tuple[Literal["prefill", "decode", "idle"], list[Request]]
MAX_DEBT_ROUNDS = 4  # an app returning after a busy spell carries at most this many quanta of debt


class Scheduler:
    def __init__(self, quantum: int = 256) -> None:
        self.quantum = quantum
        self.waiting: dict[Priority, OrderedDict[str, deque[Request]]] = {p: OrderedDict() for p in Priority}
        self.running: list[Request] = []  # admitted: holding a KV slot, prefilling or decoding
        self.deficit: dict[str, float] = defaultdict(float)
        self._lower_prefill_turn = False

    # -- queues -----------------------------------------------------------------------------------------
    def add(self, req: Request, front: bool = False) -> None:
        ring = self.waiting[req.priority]
        if req.app_id not in ring:
            ring[req.app_id] = deque()
            self.deficit[req.app_id] = max(self.deficit[req.app_id], -MAX_DEBT_ROUNDS * self.quantum)
        (ring[req.app_id].appendleft if front else ring[req.app_id].append)(req)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
            return
        ring = self.waiting[req.priority]
        q = ring.get(req.app_id)
        if q is not None and req in q:
            q.remove(req)
            if not q:
                self._leave_ring(ring, req.app_id)

    def _leave_ring(self, ring: OrderedDict[str, deque[Request]], app: str) -> None:
        del ring[app]
        self.deficit[app] = min(self.deficit[app], 0.0)  # DRR: no credit is saved while idle; debt is

    def queued(self) -> list[Request]:
        return [r for ring in self.waiting.values() for q in ring.values() for r in q]

    def charge(self, app: str, tokens: int) -> None:
        self.deficit[app] -= tokens

    # -- admission ----------------------------------------------------------------------------------------
    def next_waiting(self) -> Request | None:
        """The request that should get the next free slot (not removed from its queue)."""
        for prio in sorted(Priority, reverse=True):
            ring = self.waiting[prio]
            if not ring:
                continue
            if all(self.deficit[app] <= 0 for app in ring):  # a new round: everyone waiting gets a quantum
                rounds = min(int(-self.deficit[app] // self.quantum) + 1 for app in ring)
                for app in ring:
                    self.deficit[app] += rounds * self.quantum
            return next(q[0] for app, q in ring.items() if self.deficit[app] > 0)
        return None

    def admit(self, req: Request) -> None:
        ring = self.waiting[req.priority]
        q = ring[req.app_id]
        q.remove(req)
        ring.move_to_end(req.app_id)  # round robin: the next admission in this class tries other apps first
        if not q:
            self._leave_ring(ring, req.app_id)
        self.running.append(req)

    def victim_for(self, req: Request) -> Request | None:
        """A running request to preempt so `req` gets a slot: lowest class below `req`'s, newest first."""
        lower = [r for r in self.running if r.priority < req.priority]
        if not lower:
            return None
        return max(lower, key=lambda r: (-r.priority, r.arrived))

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        req.preemptions += 1
        self.add(req, front=True)  # it resumes before its app's later requests

    # -- the step ---------------------------------------------------------------------------------------
    def next_step(self) -> Step:
        prefilling = [r for r in self.running if r.prefilling]
        decoding = [r for r in self.running if not r.prefilling]
        if prefilling:
            first = max(prefilling, key=lambda r: (r.priority, -r.arrived))
            top_decoding = max((r.priority for r in decoding), default=None)
            if top_decoding is None or first.priority >= top_decoding or self._lower_prefill_turn:
                self._lower_prefill_turn = False
                return "prefill", [first]
            self._lower_prefill_turn = True
        if decoding:
            return "decode", decoding
        return "idle", []
