"""The controller's work queue: one worker per key, deduplicated adds, one heap for every delayed
add, per-key exponential backoff with jitter and Retry-After, nothing kept of a dropped key."""

from __future__ import annotations

import threading
import time

from alignment_operator.workqueue import Backoff, WorkQueue


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def drain(q: WorkQueue) -> list:
    keys = []
    while (key := q.get(timeout=0)) is not None:
        keys.append(key)
        q.done(key)
    return keys


def test_a_key_added_many_times_is_processed_once():
    q = WorkQueue()
    for _ in range(5):
        q.add("a")
    q.add("b")
    assert drain(q) == ["a", "b"]
    assert drain(q) == []


def test_a_key_added_while_it_is_processed_waits_for_done_then_runs_once_more():
    q = WorkQueue()
    q.add("a")
    assert q.get(timeout=0) == "a"
    q.add("a")
    q.add("a")
    assert q.get(timeout=0) is None, "never two workers on one key"
    q.done("a")
    assert q.get(timeout=0) == "a"
    q.done("a")
    assert q.get(timeout=0) is None


def test_delayed_adds_wait_in_one_heap_and_the_earliest_wins():
    threads = threading.active_count()  # (other tests in this process may have left threads running)
    clock = Clock()
    q = WorkQueue(clock=clock)
    q.add_after("a", 30)
    q.add_after("a", 10)   # earlier: replaces
    q.add_after("a", 60)   # later: ignored
    assert q.sizes()["delayed"] == 1 and drain(q) == []
    clock.t += 9.9
    assert drain(q) == []
    clock.t += 0.2
    assert drain(q) == ["a"]
    clock.t += 100
    assert drain(q) == [], "the superseded entries never fire"
    assert q.sizes()["heap"] == 0 and threading.active_count() <= threads  # no thread per requeue


def test_many_requeues_of_one_key_keep_the_heap_small():
    clock = Clock()
    q = WorkQueue(clock=clock)
    for i in range(10_000):
        q.add_after("a", 10_000 - i)  # each one earlier: a new heap entry
    assert q.sizes()["delayed"] == 1 and q.sizes()["heap"] <= 2 * 1 + 64 + 1


def test_backoff_doubles_with_jitter_up_to_its_cap_and_success_forgets_it():
    b = Backoff(base=1, cap=60, jitter=0.2, rng=lambda: 1.0)  # the top of the jitter band
    assert [round(b.when("k"), 2) for _ in range(8)] == [1.2, 2.4, 4.8, 9.6, 19.2, 38.4, 60, 60]
    low = Backoff(base=1, cap=60, jitter=0.2, rng=lambda: 0.0)
    assert [round(low.when("k"), 2) for _ in range(3)] == [0.8, 1.6, 3.2]
    assert b.failures("k") == 8 and b.failures("other") == 0
    b.forget("k")
    assert b.when("k") == 1.2


def test_retry_after_wins_when_longer_than_the_backoff():
    b = Backoff(base=1, cap=60, jitter=0.0)
    assert b.when("k", retry_after=30) == 30
    assert b.when("k", retry_after=0.5) == 2, "a shorter Retry-After does not shorten the backoff"
    assert b.when("k", retry_after=10**9) == 3600, "bounded"


def test_a_failed_key_comes_back_after_its_backoff():
    clock = Clock()
    q = WorkQueue(Backoff(base=2, cap=60, jitter=0.0), clock=clock)
    assert q.add_rate_limited("a") == 2 and q.add_rate_limited("a") == 4
    assert q.failures("a") == 2 and q.sizes()["delayed"] == 1, "one pending entry: the earliest"
    clock.t += 1.99
    assert drain(q) == []
    clock.t += 0.02
    assert drain(q) == ["a"]
    q.forget("a")
    assert q.failures("a") == 0


def test_dropping_a_key_leaves_nothing_of_it():
    clock = Clock()
    q = WorkQueue(clock=clock)
    q.add("a")
    q.add_rate_limited("b")
    q.add("c")
    q.drop("a")
    q.drop("b")
    clock.t += 1000
    assert drain(q) == ["c"]
    assert q.sizes() == {"ready": 0, "processing": 0, "delayed": 0, "heap": 0, "failures": 0}


def test_workers_block_until_a_delayed_key_is_due_then_take_it():
    q = WorkQueue()
    got = []
    worker = threading.Thread(target=lambda: got.append((q.get(), time.monotonic())))
    worker.start()
    t0 = time.monotonic()
    q.add_after("a", 0.3)
    worker.join(5)
    assert got and got[0][0] == "a" and got[0][1] - t0 >= 0.29
    q.shut_down()
    assert q.get() is None
