"""Prometheus metrics of the operator, served on ALIGNMENT_METRICS_PORT (default 9090)."""

from __future__ import annotations

from collections import Counter as _Tally

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RUNS = Gauge("alignment_runs", "AlignmentRuns by phase, as last reconciled", ["phase"])
TRANSITIONS = Counter("alignment_stage_transitions_total", "Stage transitions the operator acted on", ["reason"])
RECONCILE_ERRORS = Counter("alignment_reconcile_errors_total", "Reconciles that raised")
RECONCILE_SECONDS = Histogram("alignment_reconcile_duration_seconds", "Time to reconcile one run",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
PROGRESS_WRITES = Counter("alignment_progress_status_writes_total",
                          "Live-progress status writes (at most one per stage every 5 s)")
PROGRESS_REFUSED = Counter("alignment_progress_refused_total", "Progress pushes refused, by HTTP status", ["code"])
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")

_phase_of: dict[tuple[str, str], str] = {}


def observe_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a run's phase (None: the run is gone) and refresh the per-phase gauge."""
    if phase is None:
        _phase_of.pop((namespace, name), None)
    else:
        _phase_of[(namespace, name)] = phase
    tally = _Tally(_phase_of.values())
    for p in PHASES:
        RUNS.labels(p).set(tally.get(p, 0))


def serve(port: int) -> None:
    start_http_server(port)
