"""The only module that talks to the Kubernetes API server.

`observe_*` read, `ensure_*`/`apply_*`/`set_*`/`delete_*` write and are idempotent: creating
what exists is success (409) when it is the run's own (its controller ownerReference UID; another's
is refused, never adopted, changed or deleted), deleting what is gone is success (404; a delete
names the UID it means), status is replaced
with the resourceVersion it was computed from (optimistic concurrency). A create the server
refuses for what was sent (422, 403, 400, ...) raises ChildRefused with the server's words; a
status the server refuses raises StatusRefused; anything else (throttling, timeouts, server
errors, a connection refused) is raised as the client raised it, and `waiting_on` says what the
operator waits for (controller.py requeues the run with backoff and writes that on it). Every
request has a timeout (REQUEST_TIMEOUT): a server that stops answering cannot hold a worker.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from .api import GROUP, PLURAL, VERSION
from .reconcile import Refusal
from .identity import LABEL_RUN, LABEL_STAGE

log = logging.getLogger(__name__)
PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs")
JOBSET = ("jobset.x-k8s.io", "v1alpha2", "jobsets")
CUSTOM_CHILDREN = [(*JOBSET, "JobSet"), (*PYTORCHJOB, "PyTorchJob")]  # (group, version, plural, kind)


class Conflict(Exception):
    """The object changed since it was read (HTTP 409 on a write with its resourceVersion)."""


class ChildRefused(Exception):
    """The API server refused to create a child for what it is: invalid (422), forbidden by RBAC, an
    admission policy or a ResourceQuota (403), malformed (400), ... Sending it again at once would
    get the same answer; reconcile decides when to try again (a quota may free up) and when to stop."""

    def __init__(self, refusal: Refusal):
        super().__init__(f"{refusal.kind} {refusal.name}: {refusal.code} {refusal.reason}: {refusal.message}")
        self.refusal = refusal


class StatusRefused(Exception):
    """The API server refused a status write for what it holds (422 Invalid, 400): the operator's
    own bug or a CRD older than the operator; reported on the run, tried again with backoff."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class Waiting:
    """What a reconcile that raised waits for: a CamelCase reason, the server's words (no
    credentials), and how long the server asked us to wait (429/503 Retry-After)."""

    reason: str
    message: str
    retry_after: float | None = None


# 4xx answers that are not about the object sent: our own credentials (401), a namespace or CRD
# that is gone (404), exists already (409, success for a create), a timeout (408), throttling (429).
NOT_REFUSALS = (401, 404, 408, 409, 429)
_shared: client.ApiClient | None = None


def load_config(kubeconfig: str | None = None) -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig)


def _api(cls: type) -> Any:
    """`cls` (CoreV1Api, BatchV1Api, ...) over ONE ApiClient for the process: one connection pool
    (kept-alive TLS connections, thread-safe), not a new pool and TLS handshake per call."""
    global _shared
    if _shared is None:
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = 32  # more than the reconcile threads, so none waits for a socket
        _shared = _with_timeout(client.ApiClient(configuration))
    return cls(_shared)


REQUEST_TIMEOUT = (10, 60)  # seconds to connect, to read an answer; a call can still name its own


def _with_timeout(api: client.ApiClient) -> client.ApiClient:
    """The generated client sends no timeout unless a call names one (urllib3 then waits forever on
    a server that stopped answering): every request gets REQUEST_TIMEOUT by default."""
    request = api.rest_client.request

    def timed(method, url, *args, _request_timeout=None, **kwargs):
        return request(method, url, *args, _request_timeout=_request_timeout or REQUEST_TIMEOUT, **kwargs)
    api.rest_client.request = timed
    return api


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@lru_cache(maxsize=None)
def custom_resource_available(crd: str) -> bool:
    """Whether the cluster serves a CRD (e.g. jobsets.jobset.x-k8s.io); read once per process."""
    try:
        _api(client.ApiextensionsV1Api).read_custom_resource_definition(crd)
        return True
    except ApiException as e:
        if e.status in (403, 404):
            return False
        raise


def pytorchjob_available() -> bool:
    return custom_resource_available("pytorchjobs.kubeflow.org")


def jobset_available() -> bool:
    return custom_resource_available("jobsets.jobset.x-k8s.io")


def get_run(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _api(client.CustomObjectsApi).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


# ------------------------------------------------------------------------------------ observing

def _json(response: Any) -> Any:
    """A call made with _preload_content=False: the server's JSON as plain dicts (what a watch delivers)."""
    return json.loads(response.data)


def list_children(namespace: str, run: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's Jobs, JobSets and PyTorchJobs, and its pods, found by the run label (plain dicts)."""
    selector = f"{LABEL_RUN}={run}"
    objects = [{"kind": "Job", **j} for j in _json(_api(client.BatchV1Api).list_namespaced_job(
        namespace, label_selector=selector, _preload_content=False))["items"]]
    for group, version, plural, kind in CUSTOM_CHILDREN:
        if custom_resource_available(f"{plural}.{group}"):
            items = _api(client.CustomObjectsApi).list_namespaced_custom_object(
                group, version, namespace, plural, label_selector=selector)["items"]
            objects += [{"kind": kind, **o} for o in items]
    pods = [{"kind": "Pod", **p} for p in _json(_api(client.CoreV1Api).list_namespaced_pod(
        namespace, label_selector=selector, _preload_content=False))["items"]]
    return objects, pods


# ------------------------------------------------------------------------------------ acting

def ensure_object(obj: dict[str, Any]) -> dict[str, Any] | None:
    """Create `obj` unless it exists; the created object as the server returned it, None if it existed."""
    kind, ns = obj["kind"], obj["metadata"]["namespace"]
    custom = next((c for c in CUSTOM_CHILDREN if c[3] == kind), None)
    try:
        if custom is not None:
            created = _api(client.CustomObjectsApi).create_namespaced_custom_object(custom[0], custom[1], ns, custom[2], obj)
        else:
            create = {
                "Job": _api(client.BatchV1Api).create_namespaced_job,
                "ConfigMap": _api(client.CoreV1Api).create_namespaced_config_map,
                "Service": _api(client.CoreV1Api).create_namespaced_service,
                "PersistentVolumeClaim": _api(client.CoreV1Api).create_namespaced_persistent_volume_claim,
            }.get(kind)
            if create is None:
                raise ValueError(f"unexpected kind {kind}")
            created = {"kind": kind, **_json(create(ns, obj, _preload_content=False))}
    except ApiException as e:
        if e.status == 409:
            return _exists(obj)
        if isinstance(e.body, bytes):  # _preload_content=False: the server's message as text, not b'...'
            e.body = e.body.decode(errors="replace")
        if e.status is not None and 400 <= e.status < 500 and e.status not in NOT_REFUSALS:
            raise ChildRefused(_refusal(kind, obj["metadata"]["name"], e)) from None
        raise
    log.info("created %s %s/%s", kind, ns, obj["metadata"]["name"])
    _after(f"create:{kind}")
    return created


def _read(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    """One object as a plain dict, or None (a list by name: the operator may list its children, not get them)."""
    selector = f"metadata.name={name}"
    custom = _custom(kind)
    if custom is not None:
        items = _api(client.CustomObjectsApi).list_namespaced_custom_object(
            custom[0], custom[1], namespace, custom[2], field_selector=selector)["items"]
    else:
        lister = {"Job": _api(client.BatchV1Api).list_namespaced_job,
                  "ConfigMap": _api(client.CoreV1Api).list_namespaced_config_map,
                  "Service": _api(client.CoreV1Api).list_namespaced_service}[kind]
        items = _json(lister(namespace, field_selector=selector, _preload_content=False))["items"]
    return items[0] if items else None


def _exists(obj: dict[str, Any]) -> dict[str, Any] | None:
    """A create answered 409: what is there is either the run's own (None: nothing to do; a recipe
    ConfigMap of the run's that says something else is replaced) or not, and then it is never adopted,
    rewritten or deleted: ChildRefused, `going` when it is being deleted or belongs to an earlier run
    of the same name (the garbage collector removes it). The run's volume is not owned: reused."""
    kind, meta = obj["kind"], obj["metadata"]
    if kind == "PersistentVolumeClaim":
        return None
    found = _read(kind, meta["namespace"], meta["name"])
    if found is None:  # gone since: the next try creates it
        raise ChildRefused(Refusal(kind, meta["name"], 409, "AlreadyExists",
                                   f"{kind} {meta['name']} was being deleted", going=True))
    ours, theirs = _controller(obj), _controller(found) or None
    if theirs is not None and theirs.get("uid") == ours.get("uid"):
        if kind == "ConfigMap" and (found.get("data") or {}) != obj.get("data", {}):
            # The recipe of a retry (or of a try whose Job was refused) says what the spec says now.
            # Deleted and created (the operator's role has no update on ConfigMaps), only if still that one.
            _ignore_gone(_api(client.CoreV1Api).delete_namespaced_config_map, meta["name"], meta["namespace"],
                         body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=found["metadata"]["uid"])))
            log.info("replacing ConfigMap %s/%s: its recipe changed", meta["namespace"], meta["name"])
            return ensure_object(obj)
        return None
    owner = f"{theirs.get('kind')} {theirs.get('name')} (uid {theirs.get('uid')})" if theirs else "no controller"
    earlier = theirs is not None and theirs.get("kind") == ours.get("kind") and theirs.get("name") == ours.get("name")
    if found["metadata"].get("deletionTimestamp") or earlier:
        why = "is being deleted" if found["metadata"].get("deletionTimestamp") else \
            f"belongs to an earlier {owner}, which the garbage collector is deleting"
        raise ChildRefused(Refusal(kind, meta["name"], 409, "AlreadyExists",
                                   f"{kind} {meta['name']} {why}; the run creates its own once it is gone", going=True))
    raise ChildRefused(Refusal(kind, meta["name"], 409, "AlreadyExists", (
        f"{kind} {meta['name']} already exists and is not this run's (its controller: {owner}); the operator "
        f"never adopts, changes or deletes it: delete or rename it, or rename the run")))


def _refusal(kind: str, name: str, e: ApiException) -> Refusal:
    """The server's metav1.Status (code, reason, message), or what the client has when the body is not one."""
    try:
        status = json.loads(e.body or "")
    except ValueError:
        status = None
    if not isinstance(status, dict):
        status = {}
    return Refusal(kind=kind, name=name, code=int(status.get("code") or e.status),
                   reason=str(status.get("reason") or e.reason or ""),
                   message=str(status.get("message") or e.body or e.reason or ""))


def _custom(kind: str) -> tuple[str, str, str] | None:
    return next((c[:3] for c in CUSTOM_CHILDREN if c[3] == kind), None)


def set_suspend(namespace: str, name: str, kind: str, suspend: bool) -> None:
    if kind == "PyTorchJob":
        _api(client.CustomObjectsApi).patch_namespaced_custom_object(
            *PYTORCHJOB[:2], namespace, PYTORCHJOB[2], name, {"spec": {"runPolicy": {"suspend": suspend}}})
    elif kind == "JobSet":
        _api(client.CustomObjectsApi).patch_namespaced_custom_object(
            *JOBSET[:2], namespace, JOBSET[2], name, {"spec": {"suspend": suspend}})
    elif kind == "Job":
        _api(client.BatchV1Api).patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})
    else:
        raise ValueError(f"cannot suspend a {kind}")


def delete_child(namespace: str, name: str, kind: str, uid: str | None = None) -> None:
    """One stage child and its pods (foreground: a new child of the same name waits for them); with
    `uid`, only if it is still that object (a precondition: never another object of that name)."""
    body = client.V1DeleteOptions(propagation_policy="Foreground",
                                  preconditions=client.V1Preconditions(uid=uid) if uid else None)
    custom = _custom(kind)
    if custom is not None:
        _ignore_gone(_api(client.CustomObjectsApi).delete_namespaced_custom_object, custom[0], custom[1], namespace,
                     custom[2], name, body=body)
    elif kind == "Job":
        _ignore_gone(_api(client.BatchV1Api).delete_namespaced_job, name, namespace, body=body)
    else:
        raise ValueError(f"cannot delete a {kind}")


def delete_children(namespace: str, run: str, owner_uid: str | None = None) -> None:
    """Jobs (with their pods), JobSets, PyTorchJobs, Services and recipe ConfigMaps; never the volume.
    With `owner_uid`, only those the run of that UID controls (each delete preconditioned on the UID read)."""
    selector = f"{LABEL_RUN}={run},{LABEL_STAGE}"
    batch, core, api = _api(client.BatchV1Api), _api(client.CoreV1Api), _api(client.CustomObjectsApi)

    def owned(items: list[dict[str, Any]]) -> list[tuple[str, client.V1DeleteOptions]]:
        return [(o["metadata"]["name"], client.V1DeleteOptions(
            propagation_policy="Background", preconditions=client.V1Preconditions(uid=o["metadata"]["uid"])))
            for o in items if owner_uid is None or _controller(o).get("uid") == owner_uid]

    def listed(lister) -> list[dict[str, Any]]:
        return _json(lister(namespace, label_selector=selector, _preload_content=False))["items"]

    for name, body in owned(listed(batch.list_namespaced_job)):
        _ignore_gone(batch.delete_namespaced_job, name, namespace, body=body)
    for name, body in owned(listed(core.list_namespaced_service)):
        _ignore_gone(core.delete_namespaced_service, name, namespace, body=body)
    for name, body in owned(listed(core.list_namespaced_config_map)):
        _ignore_gone(core.delete_namespaced_config_map, name, namespace, body=body)
    for group, version, plural, _ in CUSTOM_CHILDREN:
        if custom_resource_available(f"{plural}.{group}"):
            items = api.list_namespaced_custom_object(group, version, namespace, plural, label_selector=selector)["items"]
            for name, body in owned(items):
                _ignore_gone(api.delete_namespaced_custom_object, group, version, namespace, plural, name, body=body)


def _controller(obj: dict[str, Any]) -> dict[str, Any]:
    """The object's controller ownerReference ({} when none)."""
    return next((r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")), {})


def failed_create_events(namespace: str, uids: list[str]) -> list[dict[str, Any]]:
    """The FailedCreate Events on these objects (observe.needs_events names them): a Job controller
    that cannot create pods (a missing service account or PriorityClass, a quota, Pod Security) says
    so only there. One list call, whatever the number of UIDs."""
    if not uids:
        return []
    wanted = set(uids)
    items = _json(_api(client.CoreV1Api).list_namespaced_event(
        namespace, field_selector="reason=FailedCreate", _preload_content=False))["items"]
    return [e for e in items if (e.get("involvedObject") or {}).get("uid") in wanted]


def _ignore_404(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except ApiException as e:
        if e.status != 404:
            raise


def _ignore_gone(fn, *args, **kwargs) -> None:
    """A delete of one object: gone already (404), or, with a UID precondition, another object now (409)."""
    try:
        fn(*args, **kwargs)
    except ApiException as e:
        if e.status not in (404, 409):
            raise


def replace_status(body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """Write status computed from `body` and return the run as stored; Conflict when the run
    changed meanwhile (the caller retries)."""
    meta = body["metadata"]
    obj = {"apiVersion": body["apiVersion"], "kind": body["kind"],
           "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                        "resourceVersion": meta["resourceVersion"]},
           "spec": body["spec"], "status": status}
    try:
        written = _api(client.CustomObjectsApi).replace_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], obj)
    except ApiException as e:
        if e.status == 409:
            raise Conflict(f"{meta['namespace']}/{meta['name']} changed") from None
        if e.status in (400, 422):
            raise StatusRefused(e.status, _server_words(e)) from None
        raise
    _after("write:status")
    return written


def emit_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    meta = body["metadata"]
    ts = datetime.now(timezone.utc)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
        involved_object=client.V1ObjectReference(
            api_version=body["apiVersion"], kind=body["kind"], name=meta["name"], namespace=meta["namespace"],
            uid=meta.get("uid"), resource_version=meta.get("resourceVersion")),
        type=type_, reason=reason, message=event_message(message), first_timestamp=ts, last_timestamp=ts, count=1,
        source=client.V1EventSource(component="alignment-operator"), reporting_component="alignment-operator")
    try:
        _api(client.CoreV1Api).create_namespaced_event(meta["namespace"], event)
    except Exception as e:  # noqa: BLE001 - an event lost is not worth failing a reconcile for
        log.warning("could not post event %s: %s", reason, getattr(e, "reason", None) or e)


EVENT_LIMIT = 1024  # what an Event's message holds


def event_message(message: str, limit: int = EVENT_LIMIT) -> str:
    """At most `limit` characters, keeping the head (what failed) and the END (a failure's error
    line comes last): the middle is cut."""
    if len(message) <= limit:
        return message
    head = min(200, limit // 4)
    return message[:head] + " … " + message[-(limit - head - 3):]


# ------------------------------------------------------------------------------------ fault injection

FAULT_ENV = "ALIGNMENT_FAULT"
FAULT_POINTS = ("create:PersistentVolumeClaim", "create:ConfigMap", "create:Service", "create:Job", "create:JobSet",
                "create:PyTorchJob", "write:status")


def _fault(value: str) -> str:
    """The write named by ALIGNMENT_FAULT=after:<point> ('' when unset); any other value is refused."""
    if not value:
        return ""
    point = value.removeprefix("after:")
    if point == value or point not in FAULT_POINTS:
        raise ValueError(f"{FAULT_ENV}={value!r}: expected after:<point>, a point one of {', '.join(FAULT_POINTS)}")
    return point


_FAULT = _fault(os.environ.get(FAULT_ENV, ""))


def _after(point: str) -> None:
    """For the tests of a killed operator (tests/cluster/test_api_faults.py): with
    ALIGNMENT_FAULT=after:<point>, this process kills itself with SIGKILL right after that write
    succeeded (the first one: an object that existed already is not a create), as an OOM kill or a
    lost node would. Inert unless set; the chart never sets it."""
    if point == _FAULT:
        log.critical("%s=after:%s: killing this process (SIGKILL)", FAULT_ENV, point)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------ errors

_SECRETS = re.compile(r"(?i)\b(authorization:\s*(?:bearer\s+|basic\s+)?|bearer\s+|token[=:]\s*|password[=:]\s*)[^\s'\",]+")


def _server_words(e: ApiException) -> str:
    """The metav1.Status message of an error answer, else its body or HTTP reason; one line."""
    body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else e.body
    try:
        status = json.loads(body or "")
    except ValueError:
        status = None
    said = status.get("message") if isinstance(status, dict) else None
    return " ".join(str(said or body or e.reason or "").split())


def _retry_after(e: ApiException) -> float | None:
    try:
        value = (e.headers or {}).get("Retry-After")
        return float(value) if value is not None else None
    except (TypeError, ValueError):  # an HTTP date: not worth parsing, the backoff applies
        return None


def waiting_on(exc: BaseException) -> Waiting:
    """What a reconcile that raised `exc` waits for. Never includes credentials: the server's
    message (a metav1.Status), the client's error class and words, with tokens masked."""
    if isinstance(exc, Conflict):
        return Waiting("Conflict", "the run kept changing while the operator wrote its status")
    if isinstance(exc, StatusRefused):
        return Waiting("StatusRefused", f"the API server refused the run's status ({exc.code}): {exc.message}")
    if isinstance(exc, ApiException):
        code = exc.status or 0
        words = _server_words(exc)
        if code == 429:
            reason = "Throttled"
        elif code == 408 or code == 504:
            reason = "ApiServerTimeout"
        elif code >= 500:
            reason = "ApiServerError"
        elif code == 0:
            reason = "ApiServerUnreachable"
        else:  # a 4xx on a call other than a create (those are ChildRefused): RBAC, a gone namespace, ...
            reason = "ApiRequestRefused"
        message = f"the API server answered {code} {exc.reason or ''}".rstrip() + (f": {words}" if words else "")
        return Waiting(reason, _mask(message), _retry_after(exc) if code in (429, 503) else None)
    if isinstance(exc, OSError) or _from_urllib3(exc):
        timeout = "timeout" in type(exc).__name__.lower() or "timed out" in str(exc).lower()
        return Waiting("ApiServerTimeout" if timeout else "ApiServerUnreachable",
                       _mask(f"no answer from the API server: {type(exc).__name__}: {exc}"))
    return Waiting("InternalError", _mask(f"{type(exc).__name__}: {exc}"))


def _from_urllib3(exc: BaseException) -> bool:
    """The HTTP library's own errors (no connection, a read timeout, a dropped connection): what
    the client raises when no answer came (urllib3 is its dependency, not ours)."""
    return any(c.__module__.split(".")[0] == "urllib3" for c in type(exc).__mro__)


def _mask(text: str) -> str:
    return _SECRETS.sub(lambda m: m.group(1) + "***", " ".join(text.split()))


# ------------------------------------------------------------------------------------ live progress

def review_token(token: str, audience: str) -> dict[str, Any]:
    """TokenReview of a bearer token for one audience: {authenticated, username, audiences, error}.
    The API server checks signature, expiry, audience and that the bound pod still exists."""
    review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[audience]))
    status = _api(client.AuthenticationV1Api).create_token_review(review).status
    user = status.user
    return {"authenticated": bool(status.authenticated), "username": user.username if user else None,
            "audiences": list(status.audiences or []), "error": status.error,
            "extra": dict(user.extra or {}) if user else {}}  # a bound token's pod-name and pod-uid


def patch_stage_progress(namespace: str, run: str, index: int, stage: str, progress: dict[str, Any],
                         summary: str, phase: str = "Running") -> bool:
    """Write one stage's live progress and the run's progress summary, only if status.stages[index]
    still is that stage and still in `phase` (a JSON patch whose `test` ops guard it); False if not."""
    base = f"/status/stages/{index}"
    patch = [{"op": "test", "path": f"{base}/name", "value": stage},
             {"op": "test", "path": f"{base}/phase", "value": phase},
             {"op": "add", "path": f"{base}/progress", "value": progress},
             {"op": "add", "path": "/status/progressSummary", "value": summary}]
    try:
        # A JSON patch: the generated patch_namespaced_custom_object_status sends merge-patch and
        # takes no content type before client 37, so the call names its own.
        _api(client.CustomObjectsApi).api_client.call_api(
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{run}/status", "PATCH",
            header_params={"Content-Type": "application/json-patch+json", "Accept": "application/json"},
            body=patch, auth_settings=["BearerToken"], response_type="object", _return_http_data_only=True)
        return True
    except ApiException as e:
        if e.status in (404, 409, 422):  # gone, or a test op failed: the stage moved on
            return False
        raise


# ------------------------------------------------------------------------------------ the progress endpoint's

def secret_keys(namespace: str, name: str) -> set[str] | None:
    """The key names of a Secret a run names (None: there is none of that name); its values are dropped
    unread. PermissionError when the operator may not read Secrets (the chart's rbac.checkSecrets: false)."""
    try:
        secret = _json(_api(client.CoreV1Api).read_namespaced_secret(name, namespace, _preload_content=False))
    except ApiException as e:
        if e.status == 404:
            return None
        if e.status == 403:
            raise PermissionError(f"may not get Secret {namespace}/{name}") from None
        raise
    return set(secret.get("data") or {}) | set(secret.get("stringData") or {})


def get_pod(namespace: str, name: str) -> dict[str, Any] | None:
    """One pod's metadata as a plain dict, or None (a list by name: the operator may list pods, not get them)."""
    items = _json(_api(client.CoreV1Api).list_namespaced_pod(
        namespace, field_selector=f"metadata.name={name}", _preload_content=False))["items"]
    return {"metadata": items[0]["metadata"]} if items else None


class SecretStore:
    """One Secret holding the progress endpoint's CA and certificate (progress_server.installation_tls):
    its data as bytes; create and replace return None when another replica got there first."""

    def __init__(self, namespace: str, name: str):
        self.namespace, self.name = namespace, name
        self._version: str | None = None

    def read(self) -> dict[str, bytes] | None:
        try:
            secret = _api(client.CoreV1Api).read_namespaced_secret(self.name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        self._version = secret.metadata.resource_version
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def _body(self, data: dict[str, bytes]) -> client.V1Secret:
        return client.V1Secret(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace, resource_version=self._version,
                                         labels={"app.kubernetes.io/managed-by": "alignment-operator"}),
            type="Opaque", data={k: base64.b64encode(v).decode() for k, v in data.items()})

    def create(self, data: dict[str, bytes]) -> dict[str, bytes] | None:
        return self._send(data, _api(client.CoreV1Api).create_namespaced_secret, self.namespace, self._body(data))

    def replace(self, data: dict[str, bytes]) -> dict[str, bytes] | None:
        return self._send(data, _api(client.CoreV1Api).replace_namespaced_secret, self.name, self.namespace,
                          self._body(data))

    def _send(self, data: dict[str, bytes], call, *args) -> dict[str, bytes] | None:
        """The write; `data` once done, None on 409 (it exists, or changed since read: another replica's is newer)."""
        try:
            sent = call(*args)
        except ApiException as e:
            if e.status == 409:
                return None
            raise
        self._version = sent.metadata.resource_version
        return data


def ensure_serving(obj: dict[str, Any], group: str, version: str, plural: str) -> dict[str, Any]:
    """promote.serve's object (a KServe InferenceService): created unless there; the object as it is now.
    Raises ApiException as the server answered (404: KServe's CRD is not installed)."""
    api, meta = _api(client.CustomObjectsApi), obj["metadata"]
    try:
        created = api.create_namespaced_custom_object(group, version, meta["namespace"], plural, obj)
        log.info("created %s %s/%s", obj["kind"], meta["namespace"], meta["name"])
        return created
    except ApiException as e:
        if e.status != 409:
            raise
    return api.get_namespaced_custom_object(group, version, meta["namespace"], plural, meta["name"])
