"""Prometheus metrics of the operator, served on ALIGNMENT_METRICS_PORT (default 9090).

GET /metrics on a bounded listener (listener.py: connection caps, timeouts, a per-client rate;
ALIGNMENT_METRICS_<LIMIT> overrides one); the text is made at most once a second, however many ask.
"""

from __future__ import annotations

import time
from collections import Counter as _Tally

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

RUNS = Gauge("alignment_runs", "AlignmentRuns by phase, as last reconciled", ["phase"])
TRANSITIONS = Counter("alignment_stage_transitions_total", "Stage transitions the operator acted on", ["reason"])
RECONCILE_ERRORS = Counter("alignment_reconcile_errors_total", "Reconciles that raised")
RECONCILE_SECONDS = Histogram("alignment_reconcile_duration_seconds", "Time to reconcile one run",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
PROGRESS_WRITES = Counter("alignment_progress_status_writes_total",
                          "Live-progress status writes (at most one per stage every 5 s)")
PROGRESS_REFUSED = Counter("alignment_progress_refused_total", "Progress pushes refused, by HTTP status", ["code"])
PROGRESS_REVIEWS = Counter("alignment_progress_token_reviews_total",
                           "TokenReviews the progress endpoint asked for (cache misses of well-formed tokens)")
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended", "Held")

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


METRICS_LIMITS = dict(max_connections=64, per_client=8, rate=5.0, burst=10.0)  # scrapes come every 15-60 s
_latest: tuple[float, bytes] = (-1.0, b"")


def exposition(clock=time.monotonic) -> bytes:
    """The registry's text, at most a second old."""
    global _latest
    now = clock()
    if now - _latest[0] >= 1.0:
        _latest = (now, generate_latest())
    return _latest[1]


async def _handle(request):
    from aiohttp import web

    if request.method != "GET" or request.path not in ("/metrics", "/"):
        return web.json_response({"error": "GET /metrics"}, status=404)
    return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def listener(port: int, host: str = "0.0.0.0"):
    from .listener import Limits, Listener

    return Listener("metrics", _handle, port, host, limits=Limits.from_env("ALIGNMENT_METRICS", **METRICS_LIMITS))


def serve(port: int, host: str = "0.0.0.0") -> int:
    """Serve /metrics on the operator's listener thread; returns the port."""
    from .listener import serve as start

    return start(listener(port, host))
