"""Who runs next: priority classes, deficit round robin between apps, preemption, prefill vs decode.

Requests wait in one queue per (class, app). Admission (getting a KV slot) goes to the highest class
with waiting work; within a class, apps take turns by deficit round robin on tokens: every token
computed for an app (prompt or generated) is charged to its deficit, and when no waiting app has credit
left, every active app of the class (waiting or running) gets `quantum` more; the waiting app with the
most credit goes next. An app is "active", and keeps its debt or credit, for as long as it has requests
in the system: an app with four requests running and none queued at this instant is still busy, and
resetting it the moment its queue empties would hand its share to whoever keeps a queue. So an app that
sends three times the requests, or longer ones, gets the same tokens per second as a quieter app in its
class, not three times as many.

When every slot is taken and a higher class waits, the most recently admitted request of the lowest
running class below it is preempted at the token boundary (its KV is parked, not lost); in the same
class, an app holding two or more slots more than the waiting app gives one up the same way.

Each step is one prefill chunk or one batched decode of every admitted, prefilled request. A prefill
goes first when its class is above every decoding class (a new interactive request is not kept behind
background decoding); otherwise prefill chunks and decode steps alternate, so a long prompt never holds
the apps already generating for more than one chunk at a time, and never starves either.

"An app" here is an account, (app id, uid): two users running the same app are two apps to share
between, so one user cannot take another's share by running the same program.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, defaultdict, deque
from typing import Literal

from llmos.arbiter.policy import Account, Priority
from llmos.arbiter.request import Request

Step = tuple[Literal["prefill", "decode", "idle"], list[Request]]
MAX_DEBT_ROUNDS = 4  # an app returning after a busy spell carries at most this many quanta of debt
MAX_CREDIT_ROUNDS = 4  # and an app running without waiting banks at most this much credit


class Scheduler:
    def __init__(self, quantum: int = 256) -> None:
        self.quantum = quantum
        self.waiting: dict[Priority, OrderedDict[Account, deque[Request]]] = {
            p: OrderedDict() for p in Priority
        }
        self.running: list[Request] = []  # admitted: holding a KV slot, prefilling or decoding
        self.deficit: dict[Account, float] = defaultdict(float)
        self._prefill_turn = False

    # -- queues -----------------------------------------------------------------------------------------
    def add(self, req: Request, front: bool = False) -> None:
        ring = self.waiting[req.priority]
        if req.account not in ring:
            ring[req.account] = deque()
            self.deficit[req.account] = max(self.deficit[req.account], -MAX_DEBT_ROUNDS * self.quantum)
        (ring[req.account].appendleft if front else ring[req.account].append)(req)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        else:
            ring = self.waiting[req.priority]
            q = ring.get(req.account)
            if q is not None and req in q:
                q.remove(req)
                if not q:
                    del ring[req.account]
        self._settle(req.account)

    def _active(self, prio: Priority) -> set[Account]:
        return set(self.waiting[prio]) | {r.account for r in self.running if r.priority == prio}

    def _settle(self, app: Account) -> None:
        """An app with nothing left in the system keeps its debt but not its credit (DRR's idle rule)."""
        if not any(app in ring for ring in self.waiting.values()) and all(
            r.account != app for r in self.running
        ):
            self.deficit[app] = min(self.deficit[app], 0.0)

    @property
    def has_waiting(self) -> bool:
        """Asked several times per step: no list is built (a ring is dropped when its app's queue empties)."""
        return any(self.waiting.values())

    def queued(self) -> list[Request]:
        return [r for ring in self.waiting.values() for q in ring.values() for r in q]

    def charge(self, app: Account, tokens: int) -> None:
        self.deficit[app] -= tokens

    # -- admission ----------------------------------------------------------------------------------------
    def next_waiting(self) -> Request | None:
        """The request that should get the next free slot (not removed from its queue)."""
        for prio in sorted(Priority, reverse=True):
            ring = self.waiting[prio]
            if not ring:
                continue
            if all(self.deficit[app] <= 0 for app in ring):  # a new round for every active app
                rounds = min(int(-self.deficit[app] // self.quantum) + 1 for app in ring)
                cap = MAX_CREDIT_ROUNDS * self.quantum
                for app in self._active(prio):
                    self.deficit[app] = min(self.deficit[app] + rounds * self.quantum, cap)
            # the most credit first; ties in ring order (apps served last are at the back)
            app = max(ring, key=lambda a: self.deficit[a])
            return ring[app][0]
        return None

    def next_admission(self, slot_free: bool) -> tuple[Request, Request | None] | None:
        """The request to admit now and the running one to preempt for it (None if a slot is free).

        With a free slot, deficit round robin picks. Without one, the first waiting request (highest
        class first, then the app holding the fewest slots) that `victim_for` finds a slot for."""
        first = self.next_waiting()
        if first is None or slot_free:
            return (first, None) if first is not None else None
        for prio in sorted(Priority, reverse=True):
            ring = self.waiting[prio]
            held = Counter(r.account for r in self.running if r.priority == prio)
            for app in sorted(ring, key=lambda a: held.get(a, 0)):
                victim = self.victim_for(ring[app][0])
                if victim is not None:
                    return ring[app][0], victim
        return None

    def admit(self, req: Request) -> None:
        ring = self.waiting[req.priority]
        q = ring[req.account]
        q.remove(req)
        ring.move_to_end(req.account)  # round robin: the next admission in this class tries other apps first
        if not q:
            del ring[req.account]
        req.admitted_at = time.monotonic()
        self.running.append(req)

    def victim_for(self, req: Request) -> Request | None:
        """A running request to preempt so `req` gets a slot, or None.

        First from a lower class (the lowest, most recently admitted). Else from `req`'s own class, if
        one app holds at least two more slots than `req`'s app: without this, an app that keeps many
        requests queued takes every slot the moment it frees (the other app's next request is a bus
        round trip away), and slot time, so tokens, follow the number of requests sent, not fairness.
        """
        lower = [r for r in self.running if r.priority < req.priority]
        if lower:
            return max(lower, key=lambda r: (-r.priority, r.admitted_at))
        same = [r for r in self.running if r.priority == req.priority]
        held = Counter(r.account for r in same)
        if not held:
            return None
        app, most = held.most_common(1)[0]
        if most < held.get(req.account, 0) + 2:
            return None
        return max((r for r in same if r.account == app), key=lambda r: r.admitted_at)

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
            if top_decoding is None or first.priority > top_decoding or self._prefill_turn:
                self._prefill_turn = False
                return "prefill", [first]
            self._prefill_turn = True
        if decoding:
            return "decode", decoding
        return "idle", []
