"""kopf registrations only: every event on a run, or on one of its Jobs, PyTorchJobs or pods,
re-reconciles that run (controller.reconcile_run: observe, decide, act)."""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from . import controller, metrics
from .api import GROUP, PLURAL, VERSION
from .render.manifests import LABEL_RUN

log = logging.getLogger("alignment_operator")


@kopf.on.startup()
def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.WARNING   # we post our own events
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = [1, 2, 5, 10]
    # No cluster scans (namespaces, CRDs): least-privilege RBAC refuses them, and we watch fixed resources.
    settings.scanning.disabled = True
    context = controller.configure()
    port = int(os.environ.get("ALIGNMENT_METRICS_PORT", "9090"))
    if port:
        metrics.serve(port)
    log.info("trainer image %s; PyTorchJob CRD %s", context.trainer_image,
             "installed" if context.pytorchjob_available else "absent")


def _reconcile(namespace: str, name: str) -> None:
    try:
        controller.reconcile_run(namespace, name)
    except controller.StatusKeptConflicting as e:
        raise kopf.TemporaryError(str(e), delay=2) from None


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_run(namespace: str, name: str, type: str, **_: Any) -> None:
    if type == "DELETED":
        metrics.observe_phase(namespace, name, None)
    else:
        _reconcile(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
def on_job(namespace: str, labels: dict[str, str], **_: Any) -> None:
    _reconcile(namespace, labels[LABEL_RUN])


@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels={LABEL_RUN: kopf.PRESENT})
def on_pytorchjob(namespace: str, labels: dict[str, str], **_: Any) -> None:
    _reconcile(namespace, labels[LABEL_RUN])


@kopf.on.event("", "v1", "pods", labels={LABEL_RUN: kopf.PRESENT})
def on_pod(namespace: str, labels: dict[str, str], **_: Any) -> None:
    _reconcile(namespace, labels[LABEL_RUN])
