"""The cluster shell's work queue, in the shape of client-go's (controller-runtime reconciles from
one): events add a run's key; workers take keys one at a time; a key is never processed by two
workers at once, and a key added while it is processed is processed once more afterwards.

Delayed adds (a requeue, a backoff, a resync) wait in ONE heap served by the workers themselves:
no thread per requeue, one pending entry per key (the earliest wins). A key that failed is
added back after a per-key exponential backoff with jitter, capped, or after the server's
Retry-After when that is longer; a success forgets the key's failures. `drop` forgets a key
entirely (its run is gone): nothing of a deleted run stays in memory.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable


class Backoff:
    """Per-key exponential backoff with jitter: base * 2**(failures-1), times a factor in
    [1 - jitter, 1 + jitter], at most `cap` seconds; a longer Retry-After wins (up to `longest`)."""

    def __init__(self, base: float = 1.0, cap: float = 300.0, jitter: float = 0.2, longest: float = 3600.0,
                 rng: Callable[[], float] = random.random):
        self.base, self.cap, self.jitter, self.longest, self._rng = base, cap, jitter, longest, rng
        self._failures: dict[Hashable, int] = {}

    def when(self, key: Hashable, retry_after: float | None = None) -> float:
        """Seconds to wait before trying `key` again, counting one more failure."""
        n = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(self.cap, self.base * 2 ** min(n - 1, 32) * (1 + self.jitter * (2 * self._rng() - 1)))
        if retry_after is not None and retry_after > delay:
            delay = min(retry_after, self.longest)
        return delay

    def failures(self, key: Hashable) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    def __len__(self) -> int:
        return len(self._failures)


class WorkQueue:
    def __init__(self, backoff: Backoff | None = None, clock: Callable[[], float] = time.monotonic):
        self.backoff = backoff if backoff is not None else Backoff()
        self._clock = clock
        self._cond = threading.Condition()
        self._ready: deque[Hashable] = deque()
        self._dirty: set[Hashable] = set()        # in _ready, or to go back there when processed
        self._processing: set[Hashable] = set()
        self._due: dict[Hashable, float] = {}     # delayed keys: when (clock) they become ready
        self._heap: list[tuple[float, int, Hashable]] = []  # (due, seq, key); stale when _due differs
        self._seq = 0
        self._shut = False

    # ------------------------------------------------------------------------------ adding

    def add(self, key: Hashable) -> None:
        """Process `key` as soon as a worker is free (once, however often it is added meanwhile)."""
        with self._cond:
            self._add(key)

    def add_after(self, key: Hashable, seconds: float) -> None:
        """Process `key` in `seconds`, or earlier if it is already due earlier."""
        with self._cond:
            if seconds <= 0:
                self._add(key)
                return
            due = self._clock() + seconds
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, key))
            if len(self._heap) > 2 * len(self._due) + 64:  # superseded entries: rebuild
                self._heap = [(d, s, k) for d, s, k in self._heap if self._due.get(k) == d]
                heapq.heapify(self._heap)
            self._cond.notify_all()  # a sleeping worker's wait may now be too long

    def add_rate_limited(self, key: Hashable, retry_after: float | None = None) -> float:
        """`key` failed: process it again after its backoff. Returns the seconds chosen."""
        with self._cond:
            delay = self.backoff.when(key, retry_after)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        """`key` succeeded: its next failure starts the backoff again."""
        with self._cond:
            self.backoff.forget(key)

    def failures(self, key: Hashable) -> int:
        with self._cond:
            return self.backoff.failures(key)

    def drop(self, key: Hashable) -> None:
        """Forget `key` entirely (its run is deleted): no pending or delayed entry, no failures."""
        with self._cond:
            self.backoff.forget(key)
            self._due.pop(key, None)
            if key in self._dirty:
                self._dirty.discard(key)
                try:
                    self._ready.remove(key)
                except ValueError:
                    pass  # being processed: it will not be processed again

    def _add(self, key: Hashable) -> None:
        if self._shut or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._ready.append(key)
            self._cond.notify()

    # ------------------------------------------------------------------------------ taking

    def get(self, timeout: float | None = None) -> Hashable | None:
        """The next key to process (marked processing until `done`); None on shutdown or after
        `timeout` seconds with none ready (0: do not wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._shut:
                    return None
                self._promote()
                if self._ready:
                    key = self._ready.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                wait = self._heap[0][0] - self._clock() if self._heap else None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:  # added while it was processed: once more
                self._ready.append(key)
                self._cond.notify()

    def _promote(self) -> None:
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            due, _, key = heapq.heappop(self._heap)
            if self._due.get(key) == due:
                del self._due[key]
                self._add(key)

    def shut_down(self) -> None:
        with self._cond:
            self._shut = True
            self._cond.notify_all()

    # ------------------------------------------------------------------------------ sizes

    def sizes(self) -> dict[str, int]:
        """What the queue holds, per structure (all bounded by the keys in use)."""
        with self._cond:
            return {"ready": len(self._ready), "processing": len(self._processing), "delayed": len(self._due),
                    "heap": len(self._heap), "failures": len(self.backoff)}
