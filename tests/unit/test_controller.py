"""The cluster shell around reconcile, with kube.py stubbed: what it writes."""

from __future__ import annotations

from alignment_operator import controller, kube
from alignment_operator.api import AlignmentRunStatus


def test_rejecting_the_same_invalid_run_again_writes_nothing(monkeypatch):
    writes, events = [], []
    clock = iter(["2026-12-01T10:00:00Z", "2026-12-01T10:00:07Z"])
    monkeypatch.setattr(kube, "now", lambda: next(clock))
    monkeypatch.setattr(kube, "replace_status", lambda body, status: writes.append(status) or body)
    monkeypatch.setattr(kube, "emit_event", lambda body, *a: events.append(a))
    body = {"metadata": {"name": "r", "namespace": "ns"}}
    controller._reject(body, AlignmentRunStatus(), 3, "spec.stages[0].method: 'x' is not a method")
    assert len(writes) == 1 and len(events) == 1
    stalled = next(c for c in writes[0]["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["lastTransitionTime"] == "2026-12-01T10:00:00Z"
    # The next event on the same run, seconds later: the same verdict, no write, no event.
    controller._reject(body, AlignmentRunStatus.model_validate(writes[0]), 3, "spec.stages[0].method: 'x' is not a method")
    assert len(writes) == 1 and len(events) == 1
