"""What a stage's child says, from the objects as the API server serves them (plain dicts from a
watch or a list): Job, JobSet or PyTorchJob, and its pods -> ObservedChild. Pure: no I/O.

The trainer's outcome comes back through the trainer container's termination message
(alignment_trainer.outcome); a pod that died before writing one leaves the kubelet's log tail
there instead (terminationMessagePolicy FallbackToLogsOnError), whose END holds the error.
"""

from __future__ import annotations

import logging
from typing import Any

from alignment_trainer import outcome

from .reconcile import ObservedChild
from .render.manifests import ANNOTATION_HASH, LABEL_STAGE, failure_kind

log = logging.getLogger(__name__)
MESSAGE_LIMIT = 2000

# The label that ties a pod to its child, per kind (set by the Job controller, JobSet, Kubeflow).
POD_OWNER_LABEL = {
    "Job": "batch.kubernetes.io/job-name",
    "JobSet": "jobset.sigs.k8s.io/jobset-name",
    "PyTorchJob": "training.kubeflow.org/job-name",
}


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


def clip_keeping_end(text: str) -> str:
    """At most MESSAGE_LIMIT characters, keeping the head (reason, exit code) and the end (the error)."""
    if len(text) <= MESSAGE_LIMIT:
        return text
    colon = text.find(": ")
    head = text[:colon + 2] if 0 < colon < 200 else ""
    return head + "…" + text[-(MESSAGE_LIMIT - len(head) - 1):]


def _child(obj: dict[str, Any], kind: str, state: str, attempts: int, finished: str | None,
           message: str | None, pods: list[dict[str, Any]], suspended: bool, **extra: Any) -> ObservedChild:
    meta = obj["metadata"]
    return ObservedChild(
        stage=meta["labels"][LABEL_STAGE], name=meta["name"], state=state, attempts=attempts, kind=kind,
        created=meta.get("creationTimestamp"), finished=finished, message=message,
        result=result(pods) if state == "Succeeded" else None,
        spec_hash=(meta.get("annotations") or {}).get(ANNOTATION_HASH), suspended=suspended, **extra)


def job(obj: dict[str, Any], pods: list[dict[str, Any]]) -> ObservedChild:
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
                                                       for p in pods):
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
    return _child(obj, "Job", state, 1 if group and attempts else attempts, finished, message, pods, suspended,
                  group=group, failure=failure_kind(failed.get("reason"), failed.get("message"))
                  if state == "Failed" else None)


def jobset(obj: dict[str, Any], pods: list[dict[str, Any]]) -> ObservedChild:
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
    return _child(obj, "JobSet", state, attempts, finished, message, pods, suspended)


def pytorchjob(obj: dict[str, Any], pods: list[dict[str, Any]]) -> ObservedChild:
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
                  masters or pods, suspended, group=group,
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
        kept_meta["ownerReferences"] = [{"kind": r.get("kind"), "name": r.get("name")} for r in meta["ownerReferences"]]
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    if obj.get("kind") == "Pod":
        kept_status = {"phase": status.get("phase"), "containerStatuses": [
            {"state": {"terminated": cs["state"]["terminated"]}} for cs in status.get("containerStatuses") or []
            if (cs.get("state") or {}).get("terminated")]}
        disrupted = [c for c in status.get("conditions") or [] if c.get("type") == "DisruptionTarget"]
        if disrupted:
            kept_status["conditions"] = [{"type": c["type"], "status": c.get("status")} for c in disrupted]
        return {"kind": "Pod", "metadata": kept_meta, "status": kept_status}
    kept_spec = {k: spec[k] for k in ("suspend", "completions", "completionMode") if k in spec}
    if "runPolicy" in spec:
        kept_spec["runPolicy"] = {"suspend": spec["runPolicy"].get("suspend")}
    if "pytorchReplicaSpecs" in spec:
        kept_spec["pytorchReplicaSpecs"] = {k: {"replicas": (v or {}).get("replicas", 1)}
                                            for k, v in spec["pytorchReplicaSpecs"].items()}
    return {"kind": obj.get("kind"), "metadata": kept_meta, "spec": kept_spec, "status": status}


def children(objects: list[dict[str, Any]], pods: list[dict[str, Any]]) -> dict[str, ObservedChild]:
    """Each stage's child (Job, JobSet or PyTorchJob) with the pods it owns, by stage name."""
    out = {}
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if any(ref.get("kind") in ("JobSet", "PyTorchJob") for ref in obj["metadata"].get("ownerReferences") or []):
            continue  # a JobSet's own Jobs: the JobSet speaks for the stage
        label = POD_OWNER_LABEL[kind]
        owned = [p for p in pods if (p["metadata"].get("labels") or {}).get(label) == name]
        child = OBSERVERS[kind](obj, owned)
        out[child.stage] = child
    return out
