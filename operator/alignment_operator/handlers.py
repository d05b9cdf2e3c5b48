"""kopf registrations only: every event on a run, or on one of its Jobs, JobSets, PyTorchJobs or
pods, goes into the controller's cache and, when it is news, puts the run's key on the
controller's work queue (controller.process: observe, decide, act, one worker per key). A handler
never reconciles itself: kopf forgets what an event handler raises."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable
from urllib.parse import urlparse

import kopf
from kopf._core.engines import peering as kopf_peering  # kopf 1.45 (constraints.txt): no public pause state

from . import controller, metrics, progress_server
from .api import GROUP, PLURAL, VERSION
from .identity import LABEL_RUN

log = logging.getLogger("alignment_operator")


@kopf.on.startup()
def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.WARNING   # we post our own events
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = [1, 2, 5, 10]
    settings.execution.max_workers = 4  # the handlers only fill the cache and the queue
    # kopf keeps one task, holding the object's latest body, per object with events queued; a
    # burst of a thousand runs (with their Jobs and pods) would hold them all at once. A bounded
    # number of such tasks that exit soon after their last event bounds the memory instead
    # (the watch streams wait meanwhile).
    settings.queueing.worker_limit = int(os.environ.get("ALIGNMENT_OBJECT_WORKERS", "100"))
    settings.queueing.idle_timeout = 0.3
    # No cluster scans (namespaces, CRDs): least-privilege RBAC refuses them, and we watch fixed resources.
    settings.scanning.disabled = True
    # kopf runs a startup that raised again 60 s later (a transient API error in configure's reads):
    # what an earlier try started, a bound port or the workers, is kept rather than started twice
    # (a second bind of our own port would fail every retry, and the operator never come up).
    endpoint = _once("progress", _serve_progress)
    port = int(os.environ.get("ALIGNMENT_METRICS_PORT", "9090"))
    if port:
        _once("metrics", lambda: _listen("ALIGNMENT_METRICS_PORT", port, lambda: metrics.serve(port)))
    context = controller.configure(progress_url=endpoint.url if endpoint else "",
                                   progress_ca=endpoint.ca_pem if endpoint else "")
    # Reconciles run in this many threads: enough to keep the API server busy, few enough not to
    # queue on it (a reconcile is mostly waiting on its writes).
    _once("workers", lambda: controller.start(int(os.environ.get("ALIGNMENT_WORKERS", "8"))))
    log.info("trainer image %s; PyTorchJob CRD %s", context.trainer_image,
             "installed" if context.pytorchjob_available else "absent")


_started: dict[str, Any] = {}


def _once(what: str, start: Callable[[], Any]) -> Any:
    """start() the first time only; its result after that."""
    if what not in _started:
        _started[what] = start()
    return _started[what]


def _listen(variable: str, port: int, serve: Callable[[], Any]) -> Any:
    """serve(); a port this process cannot listen on (another process holds it, or it needs
    privileges) stops the operator with the setting named, rather than retrying every minute
    while the liveness probe fails without a word."""
    try:
        return serve()
    except OSError as e:
        raise kopf.PermanentError(f"{variable}={port}: cannot listen on it ({e.strerror or e}); "
                                  f"choose a free port, or 0 for none") from e


def _serve_progress() -> progress_server.Endpoint | None:
    """The live-progress endpoint (progress_server's ALIGNMENT_PROGRESS_* variables), when configured."""
    port = int(os.environ.get("ALIGNMENT_PROGRESS_PORT", "8443"))
    url = os.environ.get("ALIGNMENT_PROGRESS_URL", "")
    if not port or not url:
        log.info("no live progress: ALIGNMENT_PROGRESS_PORT=%s, ALIGNMENT_PROGRESS_URL=%r", port, url)
        return None
    hostnames = [h for h in os.environ.get("ALIGNMENT_PROGRESS_HOSTNAMES", "").split(",") if h]
    endpoint, _ = _listen("ALIGNMENT_PROGRESS_PORT", port, lambda: progress_server.serve(
        port, url, os.environ.get("ALIGNMENT_PROGRESS_TLS_DIR") or None,
        hostnames or [urlparse(url).hostname or "localhost"]))
    return endpoint


# kopf pauses a replica while one of higher priority lives (peering) by stopping its watch streams,
# with a toggle per peering object that its peering handler turns on and off. The controller's
# workers read those toggles: a paused replica's requeues and resyncs wait instead of acting beside
# the replica that acts. The handler is kopf's own, wrapped (it is looked up when peering starts).
_kopf_peering_event = kopf_peering.process_peering_event
_toggles: set[int] = set()


async def _peering_event(*args: Any, conflicts_found: Any = None, **kwargs: Any) -> None:
    if conflicts_found is not None and id(conflicts_found) not in _toggles:
        _toggles.add(id(conflicts_found))
        controller.pause_when(conflicts_found.is_on)
    await _kopf_peering_event(*args, conflicts_found=conflicts_found, **kwargs)


kopf_peering.process_peering_event = _peering_event


@kopf.on.cleanup()
def _cleanup(**_: Any) -> None:
    controller.stop()


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_run(namespace: str, name: str, type: str, event: dict[str, Any], **_: Any) -> None:
    if type == "DELETED":
        controller.forget(namespace, name)
        progress_server.forget_run(namespace, name)  # the progress endpoint's state of its stages
    elif controller.cache.put_run(event["object"]):  # not the echo of the operator's own write
        controller.queue.add((namespace, name))


def _child_event(kind: str, type: str, event: dict[str, Any]) -> None:
    """Every child or pod event: into the cache, then its run's key on the queue (when it is news)."""
    obj = event["object"]
    key = controller.cache.put(obj if "kind" in obj else {"kind": kind, **obj}, deleted=type == "DELETED")
    if key is not None:
        controller.queue.add(key)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
def on_job(type: str, event: dict[str, Any], **_: Any) -> None:
    _child_event("Job", type, event)


@kopf.on.event("jobset.x-k8s.io", "v1alpha2", "jobsets", labels={LABEL_RUN: kopf.PRESENT})
def on_jobset(type: str, event: dict[str, Any], **_: Any) -> None:
    _child_event("JobSet", type, event)


@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels={LABEL_RUN: kopf.PRESENT})
def on_pytorchjob(type: str, event: dict[str, Any], **_: Any) -> None:
    _child_event("PyTorchJob", type, event)


@kopf.on.event("", "v1", "pods", labels={LABEL_RUN: kopf.PRESENT})
def on_pod(type: str, event: dict[str, Any], **_: Any) -> None:
    _child_event("Pod", type, event)
