"""Pods that cannot start reach the stage's message, its reason and the Reconciling condition, named
by whoever knows (kubelet, scheduler, Job controller); startDeadlineSeconds fails such a stage (issue 23)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alignment_operator import observe
from alignment_operator.api import AlignmentRunStatus, StageStatus, parse_run
from alignment_operator.reconcile import (
    Cause, DeleteChild, Event, ObservedChild, RequeueAfter, reconcile, stage_hash,
)

ROOT = Path(__file__).resolve().parents[2]
RUN_UID = "run-1"
CREATED = "2026-12-01T10:00:00Z"


def job(status: dict | None = None, **spec) -> dict:
    return {"kind": "Job", "metadata": {
        "name": "tiny-sft-abc123", "namespace": "ns", "uid": "job-1", "creationTimestamp": CREATED,
        "labels": {"alignment.dev/run": "tiny", "alignment.dev/stage": "sft"},
        "ownerReferences": [{"kind": "AlignmentRun", "name": "tiny", "uid": RUN_UID, "controller": True}]},
        "spec": {"completions": 1, **spec}, "status": {"active": 1} if status is None else status}


def pending_pod(waiting: dict | None = None, scheduled: dict | None = None, phase: str = "Pending") -> dict:
    status: dict = {"phase": phase}
    if waiting is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"waiting": waiting}}]
    if scheduled is not None:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", **scheduled}]
    return {"kind": "Pod", "metadata": {
        "name": "tiny-sft-abc123-q7x2k", "namespace": "ns", "uid": "pod-1", "labels": {"alignment.dev/run": "tiny"},
        "ownerReferences": [{"kind": "Job", "name": "tiny-sft-abc123", "uid": "job-1", "controller": True}]},
        "status": status}


FAILED_CREATE = {"kind": "Event", "reason": "FailedCreate", "type": "Warning", "lastTimestamp": "2026-12-01T10:00:05Z",
                 "involvedObject": {"kind": "Job", "name": "tiny-sft-abc123", "uid": "job-1"},
                 "message": 'Error creating: pods "tiny-sft-abc123-" is forbidden: error looking up service account '
                            'ns/trainer: serviceaccount "trainer" not found'}


@pytest.mark.parametrize("pods, events, reason, words", [
    # an image that does not exist (kubelet: ErrImagePull, then ImagePullBackOff)
    ([pending_pod({"reason": "ImagePullBackOff", "message": 'Back-off pulling image "nope/trainer:0"'})], [],
     "ImagePullBackOff", 'Back-off pulling image "nope/trainer:0"'),
    ([pending_pod({"reason": "ErrImagePull", "message": "failed to resolve reference nope/trainer:0: not found"})], [],
     "ErrImagePull", "not found"),
    # hfTokenSecretRef (or a judge key) naming a Secret that is not there
    ([pending_pod({"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'})], [],
     "CreateContainerConfigError", 'secret "hf-token" not found'),
    # more GPUs than any node has, a nodeSelector no node matches, a claimName that does not exist
    ([pending_pod(scheduled={"reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient "
                                                                   "nvidia.com/gpu."})], [],
     "Unschedulable", "Insufficient nvidia.com/gpu"),
    ([pending_pod(scheduled={"reason": "Unschedulable", "message": "0/1 nodes are available: 1 node(s) didn't match "
                                                                   "Pod's node affinity/selector."})], [],
     "Unschedulable", "didn't match Pod's node affinity/selector"),
    ([pending_pod(scheduled={"reason": "Unschedulable", "message": '0/1 nodes are available: persistentvolumeclaim '
                                                                   '"nope" not found.'})], [],
     "Unschedulable", 'persistentvolumeclaim "nope" not found'),
    # an init container that cannot pull its image (a PyTorchJob worker's)
    ([{**pending_pod(), "status": {"phase": "Pending", "initContainerStatuses": [{"name": "init-pytorch", "state": {
        "waiting": {"reason": "ErrImagePull", "message": "pull access denied for nope/init"}}}],
        "containerStatuses": [{"name": "pytorch", "state": {"waiting": {"reason": "PodInitializing"}}}]}}], [],
     "ErrImagePull", "pull access denied for nope/init"),
    # no pod at all: the Job controller's FailedCreate (service account, PriorityClass, quota, Pod Security)
    ([], [FAILED_CREATE], "FailedCreate", 'serviceaccount "trainer" not found'),
])
def test_why_pods_do_not_start_is_read_from_whoever_knows(pods, events, reason, words):
    objects = [job({"active": len(pods)} if pods else {})]
    assert observe.needs_events(objects, pods, RUN_UID) == ([] if pods else ["job-1"])
    slim_pods = [observe.slim(p) for p in pods]
    child = observe.children([observe.slim(o) for o in objects], slim_pods, RUN_UID, events)["sft"]
    assert not child.started and child.waiting is not None
    assert child.waiting.reason == reason and words in child.waiting.message
    assert child.waiting.message.startswith("pod tiny-sft-abc123-q7x2k: " if pods else "Job tiny-sft-abc123: ")


def test_pods_on_their_way_or_running_say_nothing_wrong():
    on_its_way = pending_pod({"reason": "ContainerCreating"})
    child = observe.children([job()], [on_its_way], RUN_UID)["sft"]
    assert (child.started, child.waiting) == (False, None)
    running = {**on_its_way, "status": {"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]}}
    child = observe.children([job()], [observe.slim(running)], RUN_UID)["sft"]
    assert (child.started, child.waiting) == (True, None)
    assert observe.needs_events([job()], [on_its_way], RUN_UID) == []
    assert observe.needs_events([job(suspend=True)], [], RUN_UID) == [], "a suspended Job makes no pods on purpose"
    # An event on another object, or of another reason, is not this child's cause.
    other = {**FAILED_CREATE, "involvedObject": {"uid": "job-2"}}
    assert observe.children([job({})], [], RUN_UID, [other, {**FAILED_CREATE, "reason": "SuccessfulCreate"}])[
        "sft"].waiting is None


def test_a_long_waiting_message_is_kept_short_with_its_end_in_memory_and_status():
    pod = pending_pod({"reason": "CreateContainerConfigError", "message": "x" * 5000 + ' secret "hf" not found'})
    kept = observe.slim(pod)
    assert len(str(kept)) < 1200
    cause = observe.children([job()], [kept], RUN_UID)["sft"].waiting
    assert len(cause.message) <= observe.CAUSE_LIMIT and cause.message.endswith('secret "hf" not found')


# ------------------------------------------------------------------------------------ reconcile

NOW = "2026-12-01T10:00:40Z"   # 40 s after the Job was created


def run_with(deadline: int | None = None, run_deadline: int | None = None, status: dict | None = None):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"].update(namespace="default", uid=RUN_UID, generation=1)
    if deadline is not None:
        doc["spec"]["stages"][0]["startDeadlineSeconds"] = deadline
    if run_deadline is not None:
        doc["spec"]["startDeadlineSeconds"] = run_deadline
    run = parse_run(doc)
    doc["status"] = status or AlignmentRunStatus(phase="Running", stages=[
        StageStatus(name="sft", phase="Running", job_name="tiny-sft-abc123", spec_hash=stage_hash(run, 0),
                    start_time=CREATED, attempts=1), StageStatus(name="dpo"), StageStatus(name="eval")]).wire()
    return parse_run(doc)


PULL = Cause("ImagePullBackOff", 'pod tiny-sft-abc123-q7x2k: ImagePullBackOff: Back-off pulling image "nope"')


def waiting_child(cause: Cause | None = PULL, started: bool = False, **kw) -> ObservedChild:
    return ObservedChild("sft", "tiny-sft-abc123", "Running", 1, created=CREATED, uid="job-1", started=started,
                         waiting=cause, **kw)


def test_a_stage_whose_pods_cannot_start_says_why_and_stays_running():
    out = reconcile(run_with(), 1, {"sft": waiting_child()}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.reason) == ("Running", "ImagePullBackOff")
    assert sft.message == f"waiting: {PULL.message}"
    reconciling = next(c for c in out.status.conditions if c.type == "Reconciling")
    assert (reconciling.status, reconciling.reason) == ("True", "ImagePullBackOff")
    assert 'Back-off pulling image "nope"' in reconciling.message
    assert [(e.type, e.reason) for e in out.actions if isinstance(e, Event)] == [("Warning", "StageWaiting")]
    assert out.status.phase == "Running" and not [a for a in out.actions if isinstance(a, DeleteChild)]
    # the same cause again: no second Event, no change
    again = reconcile(run_with(status=out.status.wire()), 1, {"sft": waiting_child()}, NOW)
    assert again.actions == [] and again.status == out.status
    # its pod runs at last: the message goes
    started = reconcile(run_with(status=out.status.wire()), 1,
                        {"sft": ObservedChild("sft", "tiny-sft-abc123", "Running", 1, created=CREATED)}, NOW)
    assert (started.status.stages[0].message, started.status.stages[0].reason) == (None, None)
    assert next(c for c in started.status.conditions if c.type == "Reconciling").reason == "StageRunning"


@pytest.mark.parametrize("deadline, run_deadline, cause, failed", [
    (30, None, PULL, True),          # the stage's own deadline passed (40 s > 30 s)
    (None, 30, PULL, True),          # the run-wide default
    (60, 30, PULL, False),           # the stage's own wins over the default: 20 s left
    (30, None, None, True),          # nothing said why: it fails all the same, saying so
    (None, None, PULL, False),       # no deadline: it waits, saying why
])
def test_start_deadline_fails_a_stage_that_has_not_started_with_its_cause(deadline, run_deadline, cause, failed):
    out = reconcile(run_with(deadline, run_deadline), 1, {"sft": waiting_child(cause)}, NOW)
    sft = out.status.stages[0]
    if failed:
        assert (out.status.phase, sft.phase, sft.reason) == ("Failed", "Failed", "StartDeadlineExceeded")
        assert sft.message.startswith("not started within startDeadlineSeconds (30s): ")
        assert sft.message.endswith(PULL.message if cause else "no pod of it started, and none said why")
        failed_condition = next(c for c in out.status.conditions if c.type == "Failed")
        assert failed_condition.reason == "StartDeadlineExceeded" and (cause is None or PULL.message in failed_condition.message)
        # its pods go, giving back what they hold
        assert DeleteChild("sft", "tiny-sft-abc123", "Job", "job-1") in out.actions
        assert "StartDeadlineExceeded" in [e.reason for e in out.actions if isinstance(e, Event)]
    else:
        assert sft.phase == "Running" and sft.reason == "ImagePullBackOff"
        left = [a.seconds for a in out.actions if isinstance(a, RequeueAfter)]
        assert left == ([20.0] if deadline else []), "looked at again when the deadline falls"


def test_a_stage_that_started_once_is_never_failed_by_the_deadline():
    """A second pod stuck after the first trained (preempted, then no room) says why, and waits."""
    child = waiting_child(started=True)
    out = reconcile(run_with(10), 1, {"sft": child}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.reason) == ("Running", "ImagePullBackOff") and "startDeadlineSeconds" not in sft.message
    # a Job unsuspended later (Kueue) counts from its startTime, not its creation
    late = waiting_child(since="2026-12-01T10:00:35Z")
    assert reconcile(run_with(10), 1, {"sft": late}, NOW).status.stages[0].phase == "Running"


def test_a_stage_whose_pods_say_nothing_yet_is_looked_at_again_soon():
    out = reconcile(run_with(), 1, {"sft": waiting_child(None)}, NOW)
    assert out.status.stages[0].message is None
    assert out.actions == [RequeueAfter(15.0)], "FailedCreate is only in Events, which nothing watches"
