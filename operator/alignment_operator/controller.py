"""The cluster shell: for one run, observe its children, decide (reconcile, pure), act (kube.py,
idempotent), in the shape of controller-runtime. handlers.py feeds `cache` from the operator's
watches and adds the run's key to `queue`; `start` runs the workers that take keys from it, one
worker at a time per key (workqueue.py).

A reconcile ends in exactly one next step: done (its next event will bring it back), a requeue
when reconcile asked for one (a backoff, a ttl) or a resync is due, or, when anything raised, a
requeue after the key's rate-limited backoff (Retry-After honoured) with what the run waits for
written on it: condition Reconciling with the reason and the server's words, and one Warning
Event per stretch of failures. 4xx refusals of a create are not errors here: reconcile counts
them and fails the stage (kube.ChildRefused).

A reconcile costs no read of the API server when the cache can answer: the run and its children
come from the watches, the objects this process created or wrote are put in at once. It lists
the run's children when status names a child the cache lacks, when the run had finished (its
children are not kept), and every RESYNC_SECONDS while the run is active, so that a deletion
the watch missed (a disconnect, a re-list) is noticed.

Status is checked before it is written (api.status.writable): a non-finite number is left out
and a string cut to its schema's limit, with a note on the stage and an Event; a retry
annotation longer than status.retryRequest can hold is refused with a condition, never acted on.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from . import kube, metrics, observe, secret_refs
from .api import RETRY_ANNOTATION, AlignmentRunStatus, RunInvalid, parse_run
from .api.status import RETRY_REQUEST_MAX, writable
from .cache import Cache, Key
from .reconcile import (
    CreateStage, DeleteChild, DeleteChildren, Event, ObservedChild, RequeueAfter, SetSuspend, attempt_run, condition,
    reconcile, stage_hash,
)
from .render.manifests import RenderContext, build_pod_template, build_pvc, build_stage
from .workqueue import Backoff, WorkQueue

log = logging.getLogger("alignment_operator")
_context = RenderContext()
cache = Cache()
# A failed reconcile is tried again after 1, 2, 4, ... seconds (+-20%), at most BACKOFF_CAP apart: a
# webhook or API server that comes back is seen within that long, with no other event needed.
BACKOFF_CAP = float(os.environ.get("ALIGNMENT_BACKOFF_CAP_SECONDS", "20"))
queue = WorkQueue(Backoff(base=1.0, cap=BACKOFF_CAP))
STATUS_TRIES = 3  # a conflicting status write means the run changed: recompute, this many times
RESYNC_SECONDS = float(os.environ.get("ALIGNMENT_RESYNC_SECONDS", "300"))  # per active run, +-10%
FINISHED = ("Succeeded", "Failed", "Held")  # Held: spec.promote's gates failed
_secrets_unreadable = False  # the operator may not read Secrets: said once in the log
_listed: dict[Key, float] = {}  # active runs: when (monotonic) their children were last listed
_workers: list[threading.Thread] = []
# kopf peering: while any of these says True another replica acts, and this one's workers take no key
# (kopf stops delivering events then; requeues and resyncs come from the queue, not from kopf).
_pauses: list[Callable[[], bool]] = []
PAUSED_POLL = 1.0  # seconds between looks at a key while paused


def configure(context: RenderContext | None = None, progress_url: str = "", progress_ca: str = "") -> RenderContext:
    """What rendering needs to know about this cluster; read once at start-up. progress_*: where
    stage pods push live progress (progress_server.serve), none when empty."""
    global _context
    _context = context or RenderContext(
        trainer_image=os.environ.get("ALIGNMENT_TRAINER_IMAGE", RenderContext.trainer_image),
        accelerate_config_dir=os.environ.get("ALIGNMENT_ACCELERATE_CONFIG_DIR", RenderContext.accelerate_config_dir),
        pytorchjob_available=kube.pytorchjob_available(),
        jobset_available=kube.jobset_available(),
        progress_url=progress_url, progress_ca=progress_ca,
    )
    return _context


# ---------------------------------------------------------------------------------- the workers

def start(workers: int) -> None:
    """`workers` threads taking keys from `queue` (enough to keep the API server busy, few enough
    not to queue on it: a reconcile is mostly waiting on its writes)."""
    for i in range(workers):
        thread = threading.Thread(target=_work, name=f"reconcile-{i}", daemon=True)
        thread.start()
        _workers.append(thread)


def stop() -> None:
    queue.shut_down()


def pause_when(paused: Callable[[], bool]) -> None:
    """Take no key while `paused()` says so (handlers.py registers kopf's peering toggles)."""
    _pauses.append(paused)


def _work() -> None:
    while (key := queue.get()) is not None:
        try:
            if any(paused() for paused in _pauses):
                queue.add_after(key, PAUSED_POLL)  # kept, not acted on: reconciled once resumed
            else:
                process(key)
        finally:
            queue.done(key)


def process(key: Key) -> None:
    """One reconcile of a run and its next step; never raises."""
    try:
        after = reconcile_run(*key)
    except Exception as e:  # noqa: BLE001 - whatever it was, the run gets a next step and says why
        if _deleted_under_it(key, e):
            log.info("%s/%s: deleted while it was reconciled; nothing left to do", *key)
            forget(*key)
            return
        _wait(key, e)
        return
    queue.forget(key)
    if after is not None:
        queue.add_after(key, after)


def forget(namespace: str, name: str) -> None:
    """The run is gone: nothing of it stays in memory."""
    cache.drop(namespace, name)
    queue.drop((namespace, name))
    _listed.pop((namespace, name), None)
    metrics.observe_phase(namespace, name, None)


def _deleted_under_it(key: Key, exc: Exception) -> bool:
    """A reconcile that failed on a 404 because the run itself is gone (deleted, or its namespace, while
    it ran: the status write answers 404): not an error and nothing to wait for. A 404 on anything
    else (a child, a ConfigMap it reads) leaves the run there, and is waited on as any other error."""
    if not isinstance(exc, kube.ApiException) or exc.status != 404:
        return False
    try:
        return kube.get_run(*key) is None
    except Exception:  # noqa: BLE001 - not known to be gone: waited on
        return False


def _wait(key: Key, exc: Exception) -> None:
    metrics.RECONCILE_ERRORS.inc()
    waiting = kube.waiting_on(exc)
    delay = queue.add_rate_limited(key, waiting.retry_after)
    tries = queue.failures(key)
    doing = getattr(exc, "doing", None)
    message = (f"waiting: {doing}: " if doing else "waiting: ") + waiting.message + \
        f"; trying again in {delay:.0f}s (try {tries})"
    if waiting.reason == "InternalError":
        log.error("%s/%s: %s", *key, message, exc_info=exc)
    else:
        log.warning("%s/%s: %s", *key, message)
    _report_waiting(key, waiting.reason, message, first=tries == 1)


def _report_waiting(key: Key, reason: str, message: str, first: bool) -> None:
    """Best effort: the run's status as it is, with condition Reconciling saying what it waits for
    (the API server may not take it: it is what failed); one Warning Event per stretch of failures."""
    try:
        body = cache.run(*key) or kube.get_run(*key)  # after a conflict the cache let it go
    except Exception:  # noqa: BLE001 - the API server is what failed
        body = None
    if body is None or body["metadata"].get("deletionTimestamp"):
        log.warning("%s/%s: %s (not written on the run: it could not be read)", *key, reason)
        return
    if first:
        kube.emit_event(body, "Warning", reason, message)
    try:
        old = AlignmentRunStatus.model_validate(body.get("status") or {})
        status = old.model_copy(deep=True)
        status.conditions = [c for c in old.conditions if c.type != "Reconciling"] + [
            condition(old.conditions, "Reconciling", "True", reason, message, kube.now(), old.observed_generation)]
        wire, _ = writable(status)
        cache.put_run(kube.replace_status(body, wire))
    except Exception as e:  # noqa: BLE001 - the requeue is in place; this was only the message
        log.warning("%s/%s: could not write what it waits for: %s", *key, kube.waiting_on(e).message)


@contextmanager
def _step(doing: str) -> Iterator[None]:
    """Name what the reconcile was doing on whatever it raises (the Reconciling message)."""
    try:
        yield
    except Exception as e:
        if not hasattr(e, "doing"):
            e.doing = doing  # type: ignore[attr-defined]
        raise


# ---------------------------------------------------------------------------------- one reconcile

def reconcile_run(namespace: str, name: str) -> float | None:
    """Bring one run's children and status in line with its spec. Returns the seconds after which
    to look again (None: at its next event). Raises what it could not get past (see process)."""
    with metrics.RECONCILE_SECONDS.time():
        for _ in range(STATUS_TRIES):
            try:
                return _reconcile_once(namespace, name)
            except kube.Conflict:
                cache.forget_run(namespace, name)  # read it afresh
        raise kube.Conflict(f"{namespace}/{name}: status kept conflicting")


def _reconcile_once(namespace: str, name: str) -> float | None:
    body = cache.run(namespace, name)
    cached = body is not None
    if body is None:
        with _step("reading the run"):
            body = kube.get_run(namespace, name)
        if body is not None:
            cache.put_run(body)
    if body is None or body["metadata"].get("deletionTimestamp"):
        forget(namespace, name)
        return None  # deleted: ownerReferences let the garbage collector remove the children
    generation = body["metadata"].get("generation")
    old_status = AlignmentRunStatus.model_validate(body.get("status") or {})
    try:
        run = parse_run(body, f"{namespace}/{name}")
    except RunInvalid as e:
        _reject(body, old_status, generation, str(e))
        return None
    refused_retry = _refuse_long_retry(run)
    children, now = _children(body, old_status), kube.now()
    outcome = reconcile(run, generation, children, now)
    lacking = _lacking_secrets(run, outcome)
    if lacking:  # no stage starts: the run waits, naming them
        outcome = reconcile(run, generation, children, now, lacking=lacking)
    if cached and any(isinstance(a, (DeleteChild, DeleteChildren)) for a in outcome.actions):
        _confirm_fresh(namespace, name, body)
    try:
        for action in outcome.actions:
            _apply(action, run, body, outcome.status)
    except kube.ChildRefused as e:
        # What the server said is an observation like a failed child: decide again with it (reconcile
        # counts the tries, waits or fails the stage). None of the first decision's events was sent:
        # a decision lists its events after its other actions (a CreateStage is the only one here).
        stage = run.spec.stages[action.index].name
        refused = ObservedChild(stage, e.refusal.name, "Refused", kind=e.refusal.kind, refusal=e.refusal)
        outcome = reconcile(run, generation, {**children, stage: refused}, now)
        log.warning("%s/%s stage %s: %s", namespace, name, stage,
                    next(s.message for s in outcome.status.stages if s.name == stage))
        for action in outcome.actions:
            _apply(action, run, body, outcome.status)
    status = outcome.status
    _serve(run, status)
    _export(run, status, children, old_status)
    if refused_retry:
        status.conditions.append(condition(old_status.conditions, "RetryRefused", "True", "RetryValueTooLong",
                                           refused_retry, now, generation))
    new, notes = writable(status)
    _note(new, notes)
    if new != old_status.wire():
        with _step("writing the run's status"):
            written = kube.replace_status(body, new)
        cache.put_run(written)
        if notes:
            kube.emit_event(body, "Warning", "StatusAdjusted", "status as the API server takes it: " + "; ".join(
                f"{_path(path)}: {note}" for path, note in notes))
        if refused_retry and not any(c.type == "RetryRefused" and c.message == refused_retry
                                     for c in old_status.conditions):
            kube.emit_event(body, "Warning", "RetryRefused", refused_retry)
    metrics.observe_phase(namespace, name, status.phase)
    exporting = any(c.type == "Exported" and c.status == "Unknown" for c in status.conditions)
    return _next_look(namespace, name, status.phase, outcome.actions, exporting)


def _confirm_fresh(namespace: str, name: str, body: dict[str, Any]) -> None:
    """A delete decided on the cache's copy of the run is made only if the API server has no newer one: the
    status write after it would fail on a stale copy (409), but the delete would stand. The progress endpoint
    patches status out of band, and a hang is decided on its clock: a watch event late under load made a
    healthy stage look silent. Conflict (read afresh, decide again) when the run changed."""
    with _step("reading the run before deleting a child"):
        fresh = kube.get_run(namespace, name)
    if fresh is None or fresh["metadata"].get("resourceVersion") != body["metadata"].get("resourceVersion"):
        raise kube.Conflict(f"{namespace}/{name} changed since the cache's copy: deciding again on the new one")


def _lacking_secrets(run: Any, outcome: Any) -> dict[str, list[str]]:
    """When a stage is about to start: the Secrets it and every stage still to start would read, and what
    of them is missing (their key names are read, never a value). {} when nothing is, or when the operator
    may not read Secrets (the chart's rbac.checkSecrets: false; the kubelet says it when a pod starts)."""
    global _secrets_unreadable
    starts = {a.index for a in outcome.actions if isinstance(a, CreateStage)}
    if not starts:
        return {}
    later = {i for i, st in enumerate(outcome.status.stages) if st.phase == "Pending"}
    ns = run.metadata.namespace or "default"
    uses = {run.spec.stages[i].name: secret_refs.secret_uses(
        build_pod_template(attempt_run(run, outcome.status, i), i, _context, [])["spec"])
        for i in sorted(starts | later)}
    keys: dict[str, set[str] | None] = {}
    try:
        for name in sorted({u.secret for used in uses.values() for u in used}):
            with _step(f"reading the key names of Secret {name}"):
                keys[name] = kube.secret_keys(ns, name)
    except PermissionError as e:
        if not _secrets_unreadable:
            log.warning("Secrets a run names are not checked before its stages start (%s): a missing one shows "
                        "when its pod cannot start (CreateContainerConfigError)", e)
        _secrets_unreadable = True
        return {}
    lacking = {stage: secret_refs.missing(used, keys, ns) for stage, used in uses.items()}
    return {stage: lines for stage, lines in lacking.items() if lines}


def _export(run: Any, status: AlignmentRunStatus, children: dict[str, Any], old: AlignmentRunStatus) -> None:
    """promote.exports: once promoted, one Job (render.exporting, owned by the run) exports the promoted model;
    its result (termination message) or failure goes to status.promotion.exports, and Exported is worded
    again from them (promotion.exported_condition)."""
    from .promotion import exported_condition, pending_exports
    from .render.exporting import EXPORT_STAGE, export_job
    from .api.status import ExportResult

    p = status.promotion
    pending = pending_exports(run, p)
    if not pending or not p.model:
        return
    child = children.get(EXPORT_STAGE)
    if child is None:
        obj = export_job(run, p.model, pending, _context, evaluated_by=p.evaluated_by)
        with _step(f"creating Job {obj['metadata']['name']}"):
            kube.ensure_object(obj)
        return
    if child.state == "Succeeded":
        results = [ExportResult.model_validate(r) for r in (child.result or {}).get("exports", [])]
    elif child.state == "Failed":
        error = (child.result or {}).get("error") or child.message or "the export Job failed"
        results = [ExportResult(uri=u, error=error) for u in pending]
    else:
        return
    done = {r.uri.rstrip("/") for r in results}
    p.exports = [e for e in p.exports if e.uri.rstrip("/") not in done] + results
    generation = (run.metadata.model_extra or {}).get("generation")
    status.conditions = [exported_condition(run, p, old, kube.now(), generation) if c.type == "Exported" else c
                         for c in status.conditions]


def _serve(run: Any, status: AlignmentRunStatus) -> None:
    """promote.serve: once promoted, the promoted model's InferenceService (created once, owned by the run),
    its name and, once KServe reports it, its URL in status.promotion; condition Serving says what is missing."""
    from .render.serving import KSERVE, inference_service

    p = status.promotion
    if run.spec.promote is None or run.spec.promote.serve is None or p is None or p.verdict != "Promoted" \
            or not p.model:
        return
    obj = inference_service(run, p.model)
    prior = next((c for c in (run.status.conditions if run.status else []) if c.type == "Serving"), None)
    try:
        with _step(f"creating InferenceService {obj['metadata']['name']}"):
            found = kube.ensure_serving(obj, *KSERVE)
    except kube.ApiException as e:
        why = "KServe's InferenceService CRD is not installed" if e.status == 404 else f"HTTP {e.status}: {e.reason}"
        status.conditions.append(condition([prior] if prior else [], "Serving", "False", "ServingRefused",
                                           f"InferenceService {obj['metadata']['name']}: {why}", kube.now(),
                                           (run.metadata.model_extra or {}).get("generation")))
        return
    p.serving = obj["metadata"]["name"]
    p.url = (found.get("status") or {}).get("url")
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in (found.get("status") or {}).get("conditions") or [])
    status.conditions.append(condition(
        [prior] if prior else [], "Serving", "True" if ready and p.url else "Unknown",
        "InferenceServiceReady" if ready and p.url else "InferenceServiceNotReady",
        f"InferenceService {p.serving}" + (f" at {p.url}" if p.url else ": waiting for KServe"),
        kube.now(), (run.metadata.model_extra or {}).get("generation")))


def _next_look(namespace: str, name: str, phase: str, actions: list[Any], exporting: bool = False) -> float | None:
    """The requeue reconcile asked for, or the resync of an active run, whichever comes first. A
    finished run keeps no children in memory; one whose export Job runs (Exported Unknown) is not
    finished yet: its Job's events and the resync bring its result into status."""
    after = [a.seconds for a in actions if isinstance(a, RequeueAfter)]
    if phase in FINISHED and not exporting:
        cache.finish(namespace, name)
        _listed.pop((namespace, name), None)
    else:
        after.append(RESYNC_SECONDS * random.uniform(0.9, 1.1))  # spread: runs applied together
    return min(after) if after else None


def _children(body: dict[str, Any], status: AlignmentRunStatus) -> dict[str, Any]:
    """The stages' children from the cache; from the API server when status names one it lacks,
    when the run had finished (the cache dropped them), or when the last list is RESYNC_SECONDS old
    (observe.children keeps only what the run's UID controls)."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid") or ""
    key, clock = (namespace, name), time.monotonic()
    objects, pods = cache.children(namespace, name)
    children = observe.children(objects, pods, uid)
    stale = clock - _listed.setdefault(key, clock) >= RESYNC_SECONDS
    if stale or cache.finished(namespace, name) or observe.missing(status.stages, children):
        with _step("listing the run's Jobs and pods"):
            objects, pods = kube.list_children(namespace, name)
        cache.replace_children(namespace, name, objects, pods)
        _listed[key] = clock
        children = observe.children(objects, pods, uid)
    wanted = observe.needs_events(objects, pods, uid)
    if wanted:  # a child without pods: the Job controller says why only in Events
        with _step("listing the FailedCreate Events of the run's Jobs"):
            events = kube.failed_create_events(namespace, wanted)
        children = observe.children(objects, pods, uid, events)
    return children


def _refuse_long_retry(run: Any) -> str | None:
    """A retry annotation status.retryRequest cannot hold is never acted on (acting on it every
    reconcile, as no status write could record it, deleted and recreated the stage without end):
    reconcile does not see it, and the returned message says why."""
    value = run.metadata.annotations.get(RETRY_ANNOTATION)
    if value is None or len(value) <= RETRY_REQUEST_MAX:
        return None
    run.metadata.annotations = {k: v for k, v in run.metadata.annotations.items() if k != RETRY_ANNOTATION}
    return (f"metadata.annotations[{RETRY_ANNOTATION}] is {len(value)} characters long; at most "
            f"{RETRY_REQUEST_MAX} are accepted (status.retryRequest records it): nothing was retried. "
            f"Set a shorter value, e.g. $(date +%s)")


def _note(wire: dict[str, Any], notes: list[tuple[tuple, str]]) -> None:
    """What writable() left out of a stage goes into that stage's message."""
    for path, note in notes:
        if len(path) > 2 and path[0] == "stages" and isinstance(path[1], int):
            stage = wire["stages"][path[1]]
            said = f"status left out {_path(path[2:])}: {note}"
            if said not in (stage.get("message") or ""):
                stage["message"] = f"{stage['message']}; {said}" if stage.get("message") else said


def _path(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _apply(action: Any, run: Any, body: dict[str, Any], status: AlignmentRunStatus) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    if isinstance(action, CreateStage):
        run = attempt_run(run, status, action.index)  # the spec the stage's attempt started with
        pvc = build_pvc(run)
        objects = ([pvc] if pvc else []) + build_stage(
            run, action.index, _context, stage_hash(run, action.index), suspend=action.suspend)
        for obj in objects:
            with _step(f"creating {obj['kind']} {obj['metadata']['name']}"):
                created = kube.ensure_object(obj)
            if created is not None and created["kind"] in observe.OBSERVERS:
                cache.put(created)  # seen at once, before its watch event arrives
    elif isinstance(action, SetSuspend):
        with _step(f"{'suspending' if action.suspend else 'resuming'} {action.kind} {action.name}"):
            kube.set_suspend(ns, action.name, action.kind, action.suspend)
    elif isinstance(action, DeleteChild):
        with _step(f"deleting {action.kind} {action.name}"):
            kube.delete_child(ns, action.name, action.kind, action.uid)
    elif isinstance(action, DeleteChildren):
        with _step("deleting the run's Jobs (ttlSecondsAfterFinished)"):
            kube.delete_children(ns, name, body["metadata"].get("uid"))
    elif isinstance(action, Event):
        kube.emit_event(body, action.type, action.reason, action.message)
        metrics.TRANSITIONS.labels(action.reason).inc()
    # RequeueAfter: the worker's next step (_next_look)


def _reject(body: dict[str, Any], old: AlignmentRunStatus, generation: int | None, message: str) -> None:
    """A stored run the models refuse (e.g. written under an older CRD): say so, change nothing else."""
    status, now = old.model_copy(deep=True), kube.now()
    # reconcile's condition builder: lastTransitionTime moves only on a flip, so rejecting the same
    # run again writes nothing (a fresh timestamp each time was a status write per event, forever).
    status.conditions = [c for c in status.conditions if c.type not in ("SpecRejected", "Stalled", "Reconciling")] + [
        condition(old.conditions, kind, value, "InvalidSpec", message[:4000] if value == "True" else "", now, generation)
        for kind, value in (("SpecRejected", "True"), ("Stalled", "True"), ("Reconciling", "False"))]
    if status.wire() != old.wire():
        with _step("writing the run's status"):
            cache.put_run(kube.replace_status(body, status.wire()))
        kube.emit_event(body, "Warning", "InvalidSpec", message)

