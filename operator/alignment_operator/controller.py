"""The cluster shell: for one run, observe its children, decide (reconcile, pure), act (kube.py,
idempotent). handlers.py feeds `cache` from the operator's watches and calls `reconcile_run` on
every event; kopf stays there.

A reconcile costs no read of the API server when the cache can answer: the run and its children
come from the watches, the objects this process created or wrote are put in at once. Only when
status says a stage has a child that the cache has not seen (the operator just started and that
watch has not listed yet, or the child was deleted) does it list the run's children.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from typing import Any

from . import kube, metrics, observe
from .api import AlignmentRunStatus, RunInvalid, parse_run
from .cache import Cache
from .reconcile import (
    CreateStage, DeleteChild, DeleteChildren, Event, ObservedChild, RequeueAfter, SetSuspend, attempt_run, condition,
    reconcile, stage_hash,
)
from .render.manifests import RenderContext, build_pvc, build_stage

log = logging.getLogger("alignment_operator")
_locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_context = RenderContext()
cache = Cache()
STATUS_TRIES = 3  # a conflicting status write means the run changed: recompute, this many times


class StatusKeptConflicting(Exception):
    """The run changed under every status write; the caller retries later."""


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


def reconcile_run(namespace: str, name: str) -> None:
    """Bring one run's children and status in line with its spec. Serialised per run."""
    with _locks[(namespace, name)], metrics.RECONCILE_SECONDS.time():
        try:
            for _ in range(STATUS_TRIES):
                try:
                    _reconcile_once(namespace, name)
                    return
                except kube.Conflict:
                    cache.forget_run(namespace, name)  # read it afresh
                    continue
            raise StatusKeptConflicting(f"{namespace}/{name}: status kept conflicting")
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise


def _reconcile_once(namespace: str, name: str) -> None:
    body = cache.run(namespace, name) or kube.get_run(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        metrics.observe_phase(namespace, name, None)
        return  # deleted: ownerReferences let the garbage collector remove the children
    generation = body["metadata"].get("generation")
    old_status = AlignmentRunStatus.model_validate(body.get("status") or {})
    try:
        run = parse_run(body, f"{namespace}/{name}")
    except RunInvalid as e:
        _reject(body, old_status, generation, str(e))
        return
    children, now = _children(namespace, name, body["metadata"].get("uid") or "", old_status), kube.now()
    outcome = reconcile(run, generation, children, now)
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
    new = outcome.status.wire()
    if new != old_status.wire():
        cache.put_run(kube.replace_status(body, new))
    metrics.observe_phase(namespace, name, outcome.status.phase)


def _children(namespace: str, name: str, uid: str, status: AlignmentRunStatus) -> dict[str, Any]:
    """The stages' children (what the run of `uid` controls) from the cache; from the API server when
    status names one it lacks. FailedCreate Events only for a child with no pod (observe.needs_events)."""
    objects, pods = cache.children(namespace, name)
    if observe.missing(status.stages, observe.children(objects, pods, uid)):
        objects, pods = kube.list_children(namespace, name)
        for obj in objects + pods:
            cache.put(obj)
    wanted = observe.needs_events(objects, pods, uid)
    return observe.children(objects, pods, uid, kube.failed_create_events(namespace, wanted) if wanted else [])


def _apply(action: Any, run: Any, body: dict[str, Any], status: AlignmentRunStatus) -> None:
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    if isinstance(action, CreateStage):
        run = attempt_run(run, status, action.index)  # the spec the stage's attempt started with
        pvc = build_pvc(run)
        objects = ([pvc] if pvc else []) + build_stage(
            run, action.index, _context, stage_hash(run, action.index), suspend=action.suspend)
        for obj in objects:
            created = kube.ensure_object(obj)
            if created is not None and created["kind"] in observe.OBSERVERS:
                cache.put(created)  # seen at once, before its watch event arrives
    elif isinstance(action, SetSuspend):
        kube.set_suspend(ns, action.name, action.kind, action.suspend)
    elif isinstance(action, DeleteChild):
        kube.delete_child(ns, action.name, action.kind, action.uid)
    elif isinstance(action, DeleteChildren):
        kube.delete_children(ns, name, body["metadata"].get("uid"))
    elif isinstance(action, Event):
        kube.emit_event(body, action.type, action.reason, action.message)
        metrics.TRANSITIONS.labels(action.reason).inc()
    elif isinstance(action, RequeueAfter):
        timer = threading.Timer(action.seconds, _safe_reconcile, args=(ns, name))
        timer.daemon = True
        timer.start()


def _safe_reconcile(namespace: str, name: str) -> None:
    try:
        reconcile_run(namespace, name)
    except Exception:  # noqa: BLE001 - a timer thread has nobody to raise to
        log.exception("requeued reconcile of %s/%s failed", namespace, name)


def _reject(body: dict[str, Any], old: AlignmentRunStatus, generation: int | None, message: str) -> None:
    """A stored run the models refuse (e.g. written under an older CRD): say so, change nothing else."""
    status, now = old.model_copy(deep=True), kube.now()
    # reconcile's condition builder: lastTransitionTime moves only on a flip, so rejecting the same
    # run again writes nothing (a fresh timestamp each time was a status write per event, forever).
    status.conditions = [c for c in status.conditions if c.type not in ("SpecRejected", "Stalled", "Reconciling")] + [
        condition(old.conditions, kind, value, "InvalidSpec", message[:4000] if value == "True" else "", now, generation)
        for kind, value in (("SpecRejected", "True"), ("Stalled", "True"), ("Reconciling", "False"))]
    if status.wire() != old.wire():
        kube.replace_status(body, status.wire())
        kube.emit_event(body, "Warning", "InvalidSpec", message)
