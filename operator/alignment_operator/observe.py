"""What a stage's child says, from the objects as the API server serves them (plain dicts from a
watch or a list): Job, JobSet or PyTorchJob, and its pods -> ObservedChild. Pure: no I/O.

The trainer's outcome comes back through the trainer container's termination message
(alignment_trainer.outcome); a pod that died before writing one leaves the kubelet's log tail
there instead (terminationMessagePolicy FallbackToLogsOnError), whose END holds the error.

What belongs to a run is decided by UID, never by name or label alone: a child is the run's when
its controller ownerReference is the run's UID, a pod is a child's when its controller is the
child (or, for a JobSet, one of the JobSet's Jobs). An object of the same name left by an earlier
run of the same name, or a pod that merely carries a Job's labels, is nobody's here. A child being
deleted is observed as Deleting, and its pods finish nothing.

Pods that cannot start say why (`Cause`): a container's waiting reason (ImagePullBackOff,
CreateContainerConfigError for a missing Secret or ConfigMap, ...), PodScheduled=False (not enough
GPUs, no node matches, a missing PVC claim), and the Job's FailedCreate Events (a missing service
account or PriorityClass, a quota, Pod Security), which the shell lists only for the children
`needs_events` names.
"""

from __future__ import annotations

import logging
from typing import Any

from alignment_trainer import outcome

from .reconcile import Cause, ObservedChild
from .identity import ANNOTATION_HASH, LABEL_STAGE
from .render.failure import failure_kind

log = logging.getLogger(__name__)
MESSAGE_LIMIT = 2000
CAUSE_LIMIT = 600  # of a waiting pod's or an Event's words (kept in memory per pod, then in status)
# Waiting reasons that are a pod on its way, not a cause.
ON_ITS_WAY = ("ContainerCreating", "PodInitializing")

def _true(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}


def terminated(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Terminated container states of the pods, oldest first."""
    states = [cs["state"]["terminated"] for pod in pods
              for cs in (pod.get("status") or {}).get("containerStatuses") or []
              if (cs.get("state") or {}).get("terminated")]
    return sorted(states, key=lambda t: t.get("finishedAt") or "")


def result(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trainer's result, from the newest container that exited 0 with one."""
    for t in reversed(terminated(pods)):
        if t.get("exitCode") == 0 and t.get("message"):
            said = outcome.decode(t["message"])
            if said is not None and "error" not in said:
                return said
            log.warning("termination message holds no result: %.200s", t["message"])
    return None


def failure(pods: list[dict[str, Any]], fallback: str) -> str:
    """The failed pod's own words: the trainer's outcome (reason, what to fix, its error line),
    else the kubelet's reason and the END of the log tail (where the error is)."""
    for t in reversed(terminated(pods)):
        code = t.get("exitCode")
        if code:
            said = outcome.decode(t.get("message"))
            if said is not None and "error" in said:
                return clip_keeping_end(outcome.describe(said, code))
            text = " ".join((t.get("message") or "").split())
            return clip_keeping_end(f"{t.get('reason') or 'Error'} (exit code {code}): {text or 'no message'}")
    return fallback


def clip_keeping_end(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """At most `limit` characters, keeping the head (reason, exit code) and the end (the error)."""
    if len(text) <= limit:
        return text
    colon = text.find(": ")
    head = text[:colon + 2] if 0 < colon < min(200, limit // 3) else ""
    return head + "…" + text[-(limit - len(head) - 1):]


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The UID of the object's controller (its ownerReference with controller: true)."""
    return next((r.get("uid") for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")), None)


def deleting(obj: dict[str, Any]) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def _active(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pods if not deleting(p) and (p.get("status") or {}).get("phase") in ("Pending", "Running", None)]


def started(pods: list[dict[str, Any]]) -> bool:
    """Whether a pod of the child has run its container (running now, or ended)."""
    return any((p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")
               or any((cs.get("state") or {}).keys() & {"running", "terminated"}
                      for cs in (p.get("status") or {}).get("containerStatuses") or [])
               for p in pods)


def cause(pods: list[dict[str, Any]], events: list[dict[str, Any]] = ()) -> Cause | None:
    """Why the child's pods are not running, in the words of whoever knows: a waiting container's reason
    and message (the kubelet), PodScheduled=False (the scheduler), else a FailedCreate Event (the Job
    controller: no pod could be created). None while they are only on their way."""
    for p in _active(pods):
        name, status = p["metadata"]["name"], p.get("status") or {}
        if any((cs.get("state") or {}).get("running") for cs in status.get("containerStatuses") or []):
            continue
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") and waiting["reason"] not in ON_ITS_WAY:
                text = f"pod {name}: {waiting['reason']}: {waiting.get('message') or 'no message'}"
                return Cause(waiting["reason"], clip_keeping_end(text, CAUSE_LIMIT))
        for c in status.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                reason = c.get("reason") or "Unschedulable"
                return Cause(reason, clip_keeping_end(f"pod {name}: {reason}: {c.get('message') or ''}", CAUSE_LIMIT))
    if not _active(pods):
        newest = max(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "", default=None)
        if newest is not None:
            what = newest.get("involvedObject") or {}
            text = f"{what.get('kind', 'Job')} {what.get('name', '')}: FailedCreate: {newest.get('message') or ''}"
            return Cause("FailedCreate", clip_keeping_end(text, CAUSE_LIMIT))
    return None


def _child(obj: dict[str, Any], kind: str, state: str, attempts: int, finished: str | None,
           message: str | None, pods: list[dict[str, Any]], suspended: bool,
           events: list[dict[str, Any]] = (), since: str | None = None, **extra: Any) -> ObservedChild:
    meta = obj["metadata"]
    if deleting(obj):
        state = "Deleting"  # whatever it says: it finishes nothing
    running = state in ("Running", "Pending")
    return ObservedChild(
        stage=meta["labels"][LABEL_STAGE], name=meta["name"], state=state, attempts=attempts, kind=kind,
        created=meta.get("creationTimestamp"), finished=finished, message=message,
        result=result(pods) if state == "Succeeded" else None,
        spec_hash=(meta.get("annotations") or {}).get(ANNOTATION_HASH), suspended=suspended, uid=meta.get("uid"),
        started=not running or started(pods), waiting=cause(pods, events) if running and not suspended else None,
        since=since or meta.get("creationTimestamp"), **extra)


def job(obj: dict[str, Any], pods: list[dict[str, Any]], events: list[dict[str, Any]] = ()) -> ObservedChild:
    s, spec = obj.get("status") or {}, obj.get("spec") or {}
    conds = _true(s)
    suspended = bool(spec.get("suspend"))
    message = finished = None
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        state = "Succeeded"
        finished = s.get("completionTime") or (conds.get("Complete") or conds["SuccessCriteriaMet"]).get(
            "lastTransitionTime")
    elif "Failed" in conds or "FailureTarget" in conds:
        c = conds.get("Failed") or conds["FailureTarget"]
        state, finished = "Failed", c.get("lastTransitionTime")
        message = failure(pods, f"{c.get('reason')}: {c.get('message')}")
    elif (spec.get("completions") or 1) == 1 and any((p.get("status") or {}).get("phase") == "Succeeded"
                                                       and not deleting(p) for p in pods):
        # A one-pod stage is done when its pod is: the Job controller batches pod updates (~1 s)
        # before it marks the Job Complete, and the next stage need not wait for that.
        ended = terminated(pods)
        state, finished = "Succeeded", ended[-1].get("finishedAt") if ended else None
    else:
        state = "Suspended" if suspended else "Running" if s.get("active") else "Pending"
    attempts = (s.get("failed") or 0) + (s.get("active") or 0) + (s.get("succeeded") or 0)
    # Several ranks in one Indexed Job (no JobSet, no PyTorchJob): it fails at its first failed rank
    # and the operator restarts the whole group; the Failed condition says whether that counts.
    group = spec.get("completionMode") == "Indexed" and (spec.get("completions") or 1) > 1
    failed = conds.get("Failed") or conds.get("FailureTarget") or {}
    # One pod: its podFailurePolicy ignores a disruption (the Job controller replaces the pod, not
    # counted); the operator counts them from the pods (a group's count as its restarts instead).
    count, last = (0, None) if group else disrupted(pods)
    return _child(obj, "Job", state, 1 if group and attempts else attempts, finished, message, pods, suspended,
                  events, s.get("startTime"), group=group, failure=failure_kind(failed.get("reason"), failed.get("message"))
                  if state == "Failed" else None, disruptions=count, disruption=last)


def disrupted(pods: list[dict[str, Any]]) -> tuple[int, str | None]:
    """How many of the pods were disrupted (preempted, evicted, drained: DisruptionTarget=True), and
    the last one's words."""
    hits = [(p["metadata"]["name"], c) for p in pods for c in (p.get("status") or {}).get("conditions") or []
            if c.get("type") == "DisruptionTarget" and c.get("status") == "True"]
    if not hits:
        return 0, None
    name, c = hits[-1]
    return len(hits), clip_keeping_end(f"pod {name}: {c.get('reason') or 'DisruptionTarget'}: {c.get('message') or ''}",
                                       CAUSE_LIMIT)


def jobset(obj: dict[str, Any], pods: list[dict[str, Any]], events: list[dict[str, Any]] = ()) -> ObservedChild:
    s = obj.get("status") or {}
    conds = _true(s)
    suspended = bool((obj.get("spec") or {}).get("suspend"))
    message = finished = None
    if "Completed" in conds:
        state, finished = "Succeeded", conds["Completed"].get("lastTransitionTime")
    elif "Failed" in conds:
        c = conds["Failed"]
        state, finished = "Failed", c.get("lastTransitionTime")
        message = failure(pods, f"{c.get('reason')}: {c.get('message')}")
    elif suspended:
        state = "Suspended"
    else:
        state = "Running" if any(r.get("active") for r in s.get("replicatedJobsStatus") or []) else "Pending"
    attempts = (s.get("restarts") or 0) + (1 if s else 0)  # every rank restarts together: one attempt each time
    count, last = jobset_disrupted(obj, pods)
    return _child(obj, "JobSet", state, attempts, finished, message, pods, suspended, events,
                  disruptions=count, disruption=last)


def jobset_disrupted(obj: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[int, str | None]:
    """A JobSet restarts every rank itself after a disruption (render's failurePolicy rule
    RestartJobSetAndIgnoreMaxRestarts), without counting it towards maxRestarts: its restarts less
    those that count are the disruptions, counted and capped by the operator as a Job's disrupted
    pods are. The words: the disrupted pod's, when it is still there (the restart deletes it)."""
    s = obj.get("status") or {}
    count = max(0, (s.get("restarts") or 0) - (s.get("restartsCountTowardsMax") or 0))
    if not count:
        return 0, None
    words = disrupted(pods)[1] or "a rank was disrupted (preempted, evicted or drained)"
    return count, f"JobSet {obj['metadata']['name']} restarted every rank ({words})"


def pytorchjob(obj: dict[str, Any], pods: list[dict[str, Any]], events: list[dict[str, Any]] = ()) -> ObservedChild:
    s = obj.get("status") or {}
    conds = _true(s)
    suspended = bool((obj.get("spec") or {}).get("runPolicy", {}).get("suspend"))
    masters = [p for p in pods if (p["metadata"].get("labels") or {}).get("training.kubeflow.org/replica-type")
               in ("master", "Master")]
    message = None
    if "Succeeded" in conds:
        state = "Succeeded"
    elif "Failed" in conds:
        state = "Failed"
        c = conds["Failed"]
        message = failure(masters or pods, f"{c.get('reason')}: {c.get('message')}")
    else:
        state = "Suspended" if suspended else "Running" if "Running" in conds else "Pending"
    attempts = sum(r.get("failed", 0) + r.get("active", 0) + r.get("succeeded", 0)
                   for r in (s.get("replicaStatuses") or {}).values())
    # Several ranks (Master + Workers, each restartPolicy Never): the training operator fails the
    # PyTorchJob at its first failed rank, and, as for an Indexed Job, the operator restarts the
    # whole group; the failed pods say whether that counts (see pod_failure_kind).
    replicas = sum((r or {}).get("replicas", 1) for r in ((obj.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values())
    group = replicas > 1
    return _child(obj, "PyTorchJob", state, 1 if group and attempts else attempts, s.get("completionTime"), message,
                  masters or pods, suspended, events, s.get("startTime"), group=group,
                  failure=pod_failure_kind(pods) if state == "Failed" else None)


def pod_failure_kind(pods: list[dict[str, Any]]) -> str:
    """For a child without a podFailurePolicy (a PyTorchJob), what its pods' ends mean, with the
    same answers as failure_kind: 'input' (a rank exited with FIX_INPUT), 'disruption' (a rank
    was preempted, evicted or drained: its DisruptionTarget condition), else 'failure'."""
    if any(t.get("exitCode") == outcome.FIX_INPUT for t in terminated(pods)):
        return "input"
    if any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
           for p in pods for c in (p.get("status") or {}).get("conditions") or []):
        return "disruption"
    return "failure"


OBSERVERS = {"Job": job, "JobSet": jobset, "PyTorchJob": pytorchjob}


def slim(obj: dict[str, Any]) -> dict[str, Any]:
    """Only what the functions above read of a child or a pod: what the operator keeps in memory
    per object (a Job's pod template or a pod's spec would be most of it)."""
    meta = obj["metadata"]
    kept_meta = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "labels", "creationTimestamp",
                                      "deletionTimestamp") if k in meta}
    if ANNOTATION_HASH in (meta.get("annotations") or {}):
        kept_meta["annotations"] = {ANNOTATION_HASH: meta["annotations"][ANNOTATION_HASH]}
    if meta.get("ownerReferences"):
        kept_meta["ownerReferences"] = [{k: r[k] for k in ("kind", "name", "uid", "controller") if k in r}
                                        for r in meta["ownerReferences"]]
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    if obj.get("kind") == "Pod":
        kept_status = {"phase": status.get("phase"), "containerStatuses": [
            {"state": _slim_state(cs.get("state") or {})} for cs in status.get("containerStatuses") or []
            if (cs.get("state") or {}).keys() & {"terminated", "running", "waiting"}]}
        stuck = [{"state": _slim_state(cs["state"])} for cs in status.get("initContainerStatuses") or []
                 if ((cs.get("state") or {}).get("waiting") or {}).get("reason") not in (None, *ON_ITS_WAY)]
        if stuck:  # an init container that cannot start (a PyTorchJob worker's): the pod's cause
            kept_status["initContainerStatuses"] = stuck
        kept = [c for c in status.get("conditions") or [] if c.get("type") == "DisruptionTarget"
                or (c.get("type") == "PodScheduled" and c.get("status") == "False")]
        if kept:
            kept_status["conditions"] = [{k: c[k] if k != "message" else c[k][-CAUSE_LIMIT:]
                                          for k in ("type", "status", "reason", "message") if k in c} for c in kept]
        return {"kind": "Pod", "metadata": kept_meta, "status": kept_status}
    kept_spec = {k: spec[k] for k in ("suspend", "completions", "completionMode") if k in spec}
    if "runPolicy" in spec:
        kept_spec["runPolicy"] = {"suspend": spec["runPolicy"].get("suspend")}
    if "pytorchReplicaSpecs" in spec:
        kept_spec["pytorchReplicaSpecs"] = {k: {"replicas": (v or {}).get("replicas", 1)}
                                            for k, v in spec["pytorchReplicaSpecs"].items()}
    return {"kind": obj.get("kind"), "metadata": kept_meta, "spec": kept_spec, "status": status}


def _slim_state(state: dict[str, Any]) -> dict[str, Any]:
    """A container state as observe reads it: terminated whole (the trainer's outcome), running as a
    fact, waiting as its reason and the end of its message."""
    if "terminated" in state:
        return {"terminated": state["terminated"]}
    if "running" in state:
        return {"running": {}}
    waiting = state.get("waiting") or {}
    return {"waiting": {k: waiting[k] if k != "message" else waiting[k][-CAUSE_LIMIT:]
                        for k in ("reason", "message") if k in waiting}}


def _owned(objects: list[dict[str, Any]], run_uid: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(the run's children, {uid: the child's uid} for them and the Jobs they control)."""
    top = [o for o in objects if run_uid and controller_uid(o) == run_uid and o.get("kind") in OBSERVERS]
    tree = {o["metadata"]["uid"]: o["metadata"]["uid"] for o in top}
    for o in objects:  # a JobSet's own Jobs: the JobSet speaks for the stage, their pods are its pods
        if controller_uid(o) in tree and o["metadata"].get("uid") not in tree:
            tree[o["metadata"]["uid"]] = tree[controller_uid(o)]
    return top, tree


def children(objects: list[dict[str, Any]], pods: list[dict[str, Any]], run_uid: str,
             events: list[dict[str, Any]] = ()) -> dict[str, ObservedChild]:
    """Each stage's child (Job, JobSet or PyTorchJob) that the run of `run_uid` controls, with the pods
    its controller-uid chain owns (a JobSet's: those of its Jobs) and, for a child with no pod,
    the FailedCreate Events on it or its Jobs. Objects the run does not control are not looked at.
    Two children for one stage (a new one while the old is being deleted): the one not being deleted."""
    top, tree = _owned(objects, run_uid)
    pods_of: dict[str, list[dict[str, Any]]] = {}
    for p in pods:
        owner = tree.get(controller_uid(p) or "")
        if owner is not None:
            pods_of.setdefault(owner, []).append(p)
    events_of: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        owner = tree.get((e.get("involvedObject") or {}).get("uid") or "")
        if owner is not None and e.get("reason") == "FailedCreate":
            events_of.setdefault(owner, []).append(e)
    out: dict[str, ObservedChild] = {}
    for obj in sorted(top, key=lambda o: (not deleting(o), o["metadata"].get("creationTimestamp") or "")):
        uid = obj["metadata"]["uid"]
        child = OBSERVERS[obj["kind"]](obj, pods_of.get(uid, []), events_of.get(uid, []))
        out[child.stage] = child  # the last: not being deleted, newest
    return out


def needs_events(objects: list[dict[str, Any]], pods: list[dict[str, Any]], run_uid: str) -> list[str]:
    """UIDs (the run's children and their Jobs) whose FailedCreate Events the shell should list: those of
    a child that is not finished, not suspended, and has no pod that could run (the Job controller
    could not create one, and says why only in Events)."""
    top, tree = _owned(objects, run_uid)
    with_pods = {tree[u] for p in _active(pods) if (u := controller_uid(p)) in tree}
    wanted = {o["metadata"]["uid"] for o in top if o["metadata"]["uid"] not in with_pods and not deleting(o)
              and OBSERVERS[o["kind"]](o, []).state in ("Running", "Pending")}
    return sorted(u for u, child in tree.items() if child in wanted)


def missing(status_stages: list[Any], observed: dict[str, ObservedChild]) -> list[str]:
    """Stages that status says have a child (Running or Suspended) which the observed children lack:
    gone (deleted by hand, or a deletion the watch missed) or not seen yet. A shell that only read its
    cache lists the run's children from the API server for these before deciding; if they are still
    missing there, reconcile recreates them."""
    return [s.name for s in status_stages if s.phase in ("Running", "Suspended") and s.name not in observed]
