"""The only module that talks to the Kubernetes API server.

`observe_*` read, `ensure_*`/`apply_*`/`set_*`/`delete_*` write and are idempotent: creating
what exists is success (409), deleting what is gone is success (404), status is replaced
with the resourceVersion it was computed from (optimistic concurrency).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from alignment_trainer import outcome

from .api import GROUP, PLURAL, VERSION
from .reconcile import ObservedChild
from .render.manifests import ANNOTATION_HASH, LABEL_RUN, LABEL_STAGE

log = logging.getLogger(__name__)
PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs")
MESSAGE_LIMIT = 2000


class Conflict(Exception):
    """The object changed since it was read (HTTP 409 on a write with its resourceVersion)."""


def load_config(kubeconfig: str | None = None) -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@lru_cache(maxsize=1)
def pytorchjob_available() -> bool:
    try:
        client.ApiextensionsV1Api().read_custom_resource_definition("pytorchjobs.kubeflow.org")
        return True
    except ApiException as e:
        if e.status in (403, 404):
            return False
        raise


def get_run(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


# ------------------------------------------------------------------------------------ observing

def _ts(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _terminated(pods: list[Any]) -> list[Any]:
    """Terminated trainer container states, newest last."""
    states = []
    for pod in pods:
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            if cs.state and cs.state.terminated:
                states.append(cs.state.terminated)
    return sorted(states, key=lambda t: t.finished_at or datetime.min.replace(tzinfo=timezone.utc))


def _result(pods: list[Any]) -> dict[str, Any] | None:
    for t in reversed(_terminated(pods)):
        if t.exit_code == 0 and t.message:
            said = outcome.decode(t.message)
            if said is not None and "error" not in said:
                return said
            log.warning("termination message holds no result: %.200s", t.message)
    return None


def _failure(pods: list[Any], fallback: str) -> str:
    """The failed pod's own words: the trainer's outcome (reason, what to fix, its error line),
    else the kubelet's reason and the END of the log tail (where the error is)."""
    for t in reversed(_terminated(pods)):
        if t.exit_code != 0:
            said = outcome.decode(t.message)
            if said is not None and "error" in said:
                return _tail(outcome.describe(said, t.exit_code))
            text = " ".join((t.message or "").split())
            return _tail(f"{t.reason or 'Error'} (exit code {t.exit_code}): {text or 'no message'}")
    return fallback


def _tail(text: str) -> str:
    """At most MESSAGE_LIMIT characters, keeping the head (reason, exit code) and the end (the error)."""
    if len(text) <= MESSAGE_LIMIT:
        return text
    head = text[:text.find(": ") + 2] if 0 < text.find(": ") < 200 else ""
    return head + "…" + text[-(MESSAGE_LIMIT - len(head) - 1):]


def _pods(namespace: str, selector: str) -> list[Any]:
    return client.CoreV1Api().list_namespaced_pod(namespace, label_selector=selector).items


def _observe_job(job: Any) -> ObservedChild:
    s = job.status
    conds = {c.type: c for c in (s.conditions or []) if c.status == "True"}
    name, ns = job.metadata.name, job.metadata.namespace
    pods = _pods(ns, f"batch.kubernetes.io/job-name={name}")
    suspended = bool(job.spec.suspend)
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        state, finished = "Succeeded", _ts(s.completion_time or conds.get("Complete", conds.get("SuccessCriteriaMet")).last_transition_time)
    elif "Failed" in conds or "FailureTarget" in conds:
        c = conds.get("Failed") or conds["FailureTarget"]
        state, finished = "Failed", _ts(c.last_transition_time)
    elif (job.spec.completions or 1) == 1 and any(p.status and p.status.phase == "Succeeded" for p in pods):
        # A one-pod stage is done when its pod is: the Job controller batches pod updates (~1 s)
        # before it marks the Job Complete, and the next stage need not wait for that.
        ended = _terminated(pods)
        state, finished = "Succeeded", _ts(ended[-1].finished_at) if ended else None
    else:
        state, finished = ("Suspended" if suspended else "Running" if s.active else "Pending"), None
    message = None
    if state == "Failed":
        c = conds.get("Failed") or conds["FailureTarget"]
        message = _failure(pods, f"{c.reason}: {c.message}")
    return ObservedChild(
        stage=job.metadata.labels[LABEL_STAGE], name=name, state=state,
        attempts=(s.failed or 0) + (s.active or 0) + (s.succeeded or 0),
        created=_ts(job.metadata.creation_timestamp), finished=finished, message=message,
        result=_result(pods) if state == "Succeeded" else None,
        spec_hash=(job.metadata.annotations or {}).get(ANNOTATION_HASH), suspended=suspended)


def _observe_pytorchjob(obj: dict[str, Any]) -> ObservedChild:
    meta, status = obj["metadata"], obj.get("status") or {}
    conds = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
    suspended = bool(obj["spec"].get("runPolicy", {}).get("suspend"))
    pods = _pods(meta["namespace"], f"training.kubeflow.org/job-name={meta['name']},"
                                    "training.kubeflow.org/replica-type=master")
    if "Succeeded" in conds:
        state = "Succeeded"
    elif "Failed" in conds:
        state = "Failed"
    else:
        state = "Suspended" if suspended else "Running" if "Running" in conds else "Pending"
    finished = _ts(status.get("completionTime"))
    attempts = sum((r.get("failed", 0) + r.get("active", 0) + r.get("succeeded", 0))
                   for r in status.get("replicaStatuses", {}).values())
    failed = conds.get("Failed", {})
    return ObservedChild(
        stage=meta["labels"][LABEL_STAGE], name=meta["name"], state=state, attempts=attempts, kind="PyTorchJob",
        created=meta.get("creationTimestamp"), finished=finished,
        message=_failure(pods, f"{failed.get('reason')}: {failed.get('message')}") if state == "Failed" else None,
        result=_result(pods) if state == "Succeeded" else None,
        spec_hash=meta.get("annotations", {}).get(ANNOTATION_HASH), suspended=suspended)


def observe_children(namespace: str, run: str) -> dict[str, ObservedChild]:
    """Each stage's Job or PyTorchJob, found by the run label."""
    selector = f"{LABEL_RUN}={run}"
    out = {}
    for job in client.BatchV1Api().list_namespaced_job(namespace, label_selector=selector).items:
        child = _observe_job(job)
        out[child.stage] = child
    if pytorchjob_available():
        items = client.CustomObjectsApi().list_namespaced_custom_object(
            *PYTORCHJOB[:2], namespace, PYTORCHJOB[2], label_selector=selector)["items"]
        for obj in items:
            child = _observe_pytorchjob(obj)
            out[child.stage] = child
    return out


# ------------------------------------------------------------------------------------ acting

def ensure_object(obj: dict[str, Any]) -> bool:
    """Create `obj` unless it exists; True when this call created it."""
    kind, ns = obj["kind"], obj["metadata"]["namespace"]
    try:
        if kind == "Job":
            client.BatchV1Api().create_namespaced_job(ns, obj)
        elif kind == "ConfigMap":
            client.CoreV1Api().create_namespaced_config_map(ns, obj)
        elif kind == "Service":
            client.CoreV1Api().create_namespaced_service(ns, obj)
        elif kind == "PersistentVolumeClaim":
            client.CoreV1Api().create_namespaced_persistent_volume_claim(ns, obj)
        elif kind == "PyTorchJob":
            client.CustomObjectsApi().create_namespaced_custom_object(*PYTORCHJOB[:2], ns, PYTORCHJOB[2], obj)
        else:
            raise ValueError(f"unexpected kind {kind}")
    except ApiException as e:
        if e.status == 409:
            return False
        raise
    log.info("created %s %s/%s", kind, ns, obj["metadata"]["name"])
    return True


def set_suspend(namespace: str, name: str, kind: str, suspend: bool) -> None:
    if kind == "PyTorchJob":
        client.CustomObjectsApi().patch_namespaced_custom_object(
            *PYTORCHJOB[:2], namespace, PYTORCHJOB[2], name, {"spec": {"runPolicy": {"suspend": suspend}}})
    elif kind == "Job":
        client.BatchV1Api().patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})
    else:
        raise ValueError(f"cannot suspend a {kind}")


def delete_child(namespace: str, name: str, kind: str) -> None:
    """One stage child and its pods (foreground: a new child of the same name waits for them)."""
    body = client.V1DeleteOptions(propagation_policy="Foreground")
    if kind == "PyTorchJob":
        _ignore_404(client.CustomObjectsApi().delete_namespaced_custom_object, *PYTORCHJOB[:2], namespace,
                    PYTORCHJOB[2], name, body=body)
    elif kind == "Job":
        _ignore_404(client.BatchV1Api().delete_namespaced_job, name, namespace, body=body)
    else:
        raise ValueError(f"cannot delete a {kind}")


def delete_children(namespace: str, run: str) -> None:
    """Jobs (with their pods), PyTorchJobs, Services and recipe ConfigMaps; never the volume."""
    selector = f"{LABEL_RUN}={run},{LABEL_STAGE}"
    body = client.V1DeleteOptions(propagation_policy="Background")
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    for job in batch.list_namespaced_job(namespace, label_selector=selector).items:
        _ignore_404(batch.delete_namespaced_job, job.metadata.name, namespace, body=body)
    for svc in core.list_namespaced_service(namespace, label_selector=selector).items:
        _ignore_404(core.delete_namespaced_service, svc.metadata.name, namespace)
    for cm in core.list_namespaced_config_map(namespace, label_selector=selector).items:
        _ignore_404(core.delete_namespaced_config_map, cm.metadata.name, namespace)
    if pytorchjob_available():
        api = client.CustomObjectsApi()
        for obj in api.list_namespaced_custom_object(*PYTORCHJOB[:2], namespace, PYTORCHJOB[2],
                                                     label_selector=selector)["items"]:
            _ignore_404(api.delete_namespaced_custom_object, *PYTORCHJOB[:2], namespace, PYTORCHJOB[2],
                        obj["metadata"]["name"])


def _ignore_404(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except ApiException as e:
        if e.status != 404:
            raise


def replace_status(body: dict[str, Any], status: dict[str, Any]) -> None:
    """Write status computed from `body`; Conflict when the run changed meanwhile (the caller retries)."""
    meta = body["metadata"]
    obj = {"apiVersion": body["apiVersion"], "kind": body["kind"],
           "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                        "resourceVersion": meta["resourceVersion"]},
           "spec": body["spec"], "status": status}
    try:
        client.CustomObjectsApi().replace_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], obj)
    except ApiException as e:
        if e.status == 409:
            raise Conflict(f"{meta['namespace']}/{meta['name']} changed") from None
        raise


def emit_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    meta = body["metadata"]
    ts = datetime.now(timezone.utc)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
        involved_object=client.V1ObjectReference(
            api_version=body["apiVersion"], kind=body["kind"], name=meta["name"], namespace=meta["namespace"],
            uid=meta.get("uid"), resource_version=meta.get("resourceVersion")),
        type=type_, reason=reason, message=message[:1024], first_timestamp=ts, last_timestamp=ts, count=1,
        source=client.V1EventSource(component="alignment-operator"), reporting_component="alignment-operator")
    try:
        client.CoreV1Api().create_namespaced_event(meta["namespace"], event)
    except ApiException as e:  # an event lost is not worth failing a reconcile for
        log.warning("could not post event %s: %s", reason, e.reason)
