"""A run's children are its own by UID (issue 23): never another run's object of the same name, never
a pod that only carries a Job's labels, never an object being deleted; names that cannot collide
across runs; a child gone while its stage runs is recreated, running the recipe its attempt started with."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alignment_operator import observe
from alignment_operator.api import AlignmentRunStatus, StageStatus, parse_run
from alignment_operator.reconcile import (
    CreateStage, DeleteChild, Event, ObservedChild, Refusal, RequeueAfter, attempt_run, reconcile, stage_hash,
)
from alignment_operator.identity import child_name
from alignment_operator.render.manifests import RenderContext, build_stage
from alignment_operator.render.recipe import stage_dir
from alignment_trainer import outcome

ROOT = Path(__file__).resolve().parents[2]
NOW = "2026-12-01T12:00:00Z"
RUN_UID = "0c5e1f2a-run-one"
RESULT = {"method": "sft", "checkpoint": "/w/sft/final", "train_loss": 1.5}


def ref(kind: str, name: str, uid: str) -> list[dict]:
    return [{"apiVersion": "x/v1", "kind": kind, "name": name, "uid": uid, "controller": True}]


def job(name: str = "tiny-sft-abc123", uid: str = "job-1", owner: str = RUN_UID, status: dict | None = None,
        **meta) -> dict:
    return {"kind": "Job", "metadata": {
        "name": name, "namespace": "ns", "uid": uid, "resourceVersion": "5", "creationTimestamp": "2026-12-01T10:00:00Z",
        "labels": {"alignment.dev/run": "tiny", "alignment.dev/stage": "sft"},
        "ownerReferences": ref("AlignmentRun", "tiny", owner), **meta},
        "spec": {"completions": 1}, "status": {"active": 1} if status is None else status}


def pod(name: str = "tiny-sft-abc123-x", owner_uid: str = "job-1", phase: str = "Running", **status) -> dict:
    return {"kind": "Pod", "metadata": {
        "name": name, "namespace": "ns", "uid": f"pod-{name}", "resourceVersion": "6",
        # Every label the Job controller sets, whoever made the pod.
        "labels": {"alignment.dev/run": "tiny", "alignment.dev/stage": "sft",
                   "batch.kubernetes.io/job-name": "tiny-sft-abc123", "batch.kubernetes.io/controller-uid": "job-1"},
        "ownerReferences": ref("Job", "tiny-sft-abc123", owner_uid)},
        "status": {"phase": phase, **status}}


def succeeded_pod(**kw) -> dict:
    return pod(phase="Succeeded", containerStatuses=[{"name": "trainer", "state": {"terminated": {
        "exitCode": 0, "reason": "Completed", "message": outcome.encode(RESULT), "finishedAt": "2026-12-01T10:05:00Z"}}}],
        **kw)


# ------------------------------------------------------------------------------------ observe: what is the run's

@pytest.mark.parametrize("objects, pods, state", [
    # its Job, running, with its pod
    ([job()], [pod()], "Running"),
    # its one-pod Job whose pod succeeded: done (the result is read from that pod)
    ([job()], [succeeded_pod()], "Succeeded"),
    # a pod with every label of the Job but made by someone else: it finishes nothing
    ([job()], [succeeded_pod(name="stray", owner_uid="someone-else")], "Running"),
    # its pod succeeded but is being deleted: not a success of the stage (the Job's own word is awaited)
    ([job()], [{**succeeded_pod(), "metadata": {**succeeded_pod()["metadata"], "deletionTimestamp": NOW}}], "Running"),
    # its Job is being deleted, even a complete one: it finishes nothing
    ([job(deletionTimestamp=NOW, status={"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})],
     [succeeded_pod()], "Deleting"),
])
def test_a_stage_child_and_its_pods_are_the_runs_by_uid(objects, pods, state):
    child = observe.children([observe.slim(o) for o in objects], [observe.slim(p) for p in pods], RUN_UID)["sft"]
    assert child.state == state
    assert child.uid == "job-1"
    assert (child.result == RESULT) == (state == "Succeeded")


def test_an_earlier_runs_job_of_the_same_name_is_not_a_child():
    """Delete and apply again: the new run (another UID) never sees the old run's succeeded Job."""
    old = job(uid="old-job", owner="uid-of-the-deleted-run",
              status={"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    assert observe.children([old], [succeeded_pod(owner_uid="old-job")], "uid-of-the-deleted-run")["sft"].state == \
        "Succeeded", "its own run would see it"
    assert observe.children([old], [succeeded_pod(owner_uid="old-job")], RUN_UID) == {}
    assert observe.children([job(owner="")], [], RUN_UID) == {} and observe.children([job()], [], "") == {}


def test_the_child_not_being_deleted_speaks_for_its_stage():
    going = job(uid="job-0", deletionTimestamp=NOW, creationTimestamp="2026-12-01T11:00:00Z",
                status={"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]})
    new = job(uid="job-1", creationTimestamp="2026-12-01T09:00:00Z")
    for order in ([going, new], [new, going]):
        child = observe.children(order, [pod()], RUN_UID)["sft"]
        assert (child.uid, child.state) == ("job-1", "Running")


def test_missing_names_the_running_stages_whose_child_is_not_observed():
    stages = [StageStatus(name="sft", phase="Succeeded"), StageStatus(name="dpo", phase="Running"),
              StageStatus(name="kto", phase="Suspended"), StageStatus(name="eval")]
    assert observe.missing(stages, {}) == ["dpo", "kto"]
    dpo = ObservedChild("dpo", "tiny-dpo-1", "Running")
    assert observe.missing(stages, {"dpo": dpo}) == ["kto"]


# ------------------------------------------------------------------------------------ names

def tiny(name: str, stages: list[str], uid: str | None = "u-1"):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"].update(name=name, namespace="ns", **({"uid": uid} if uid else {}))
    first = doc["spec"]["stages"][0]
    doc["spec"]["stages"] = [{**first, "name": s} for s in stages]
    return parse_run(doc)


def test_child_names_are_injective_across_runs_readable_and_dns_labels():
    a, b = tiny("a-b", ["x-sft"]), tiny("a-b-x", ["sft"])
    assert f"{a.metadata.name}-x-sft" == f"{b.metadata.name}-sft", "the names the issue found colliding"
    ctx = RenderContext()
    names_a = {o["metadata"]["name"] for o in build_stage(a, 0, ctx, "h")}
    names_b = {o["metadata"]["name"] for o in build_stage(b, 0, ctx, "h")}
    assert names_a and not names_a & names_b, (names_a, names_b)
    assert all(n.startswith("a-b-x-sft-") for n in names_a | names_b), "still readable"
    # their recipes (and checkpoints) stay apart too
    assert stage_dir("/w", a, "x-sft") != stage_dir("/w", b, "sft")
    long = tiny("r" * 63, ["s" * 40, "s" * 39 + "t"])
    names = {child_name(long, s.name, suffix) for s in long.spec.stages for suffix in ("", "-recipe", "-rdzv")}
    assert len(names) == 6 and all(len(n) <= 63 and n[0].isalnum() and n[-1].isalnum() for n in names), names


def test_a_run_applied_again_under_its_name_writes_to_a_new_directory():
    first, again = tiny("tiny", ["sft"], uid="11111111-aaaa"), tiny("tiny", ["sft"], uid="22222222-bbbb")
    assert stage_dir("/w", first, "sft") == "/w/ns/tiny/11111111/sft"
    assert stage_dir("/w", again, "sft") == "/w/ns/tiny/22222222/sft", "never the old run's final/"
    assert stage_dir("/w", tiny("tiny", ["sft"], uid=None), "sft") == "/w/ns/tiny/sft", "local runs: no UID"


# ------------------------------------------------------------------------------------ reconcile

def run_with(status: dict | None = None, **spec):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"].update(namespace="default", uid=RUN_UID, generation=1)
    doc["spec"].update(spec)
    if status is not None:
        doc["status"] = status
    return parse_run(doc)


def running_sft(run) -> dict:
    return AlignmentRunStatus(phase="Running", stages=[
        StageStatus(name="sft", phase="Running", job_name=child_name(run, "sft"), attempts=1, start_time=NOW,
                    spec_hash=stage_hash(run, 0), attempt_spec={"stage": run.spec.stages[0].wire(),
                                                                "model": run.spec.model.wire()}),
        StageStatus(name="dpo"), StageStatus(name="eval")]).wire()


def test_a_child_being_deleted_is_waited_for_then_recreated_counted():
    run = run_with()
    run = run_with(running_sft(run))
    going = ObservedChild("sft", child_name(run, "sft"), "Deleting", attempts=1, uid="job-1")
    out = reconcile(run, 1, {"sft": going}, NOW)
    assert [a for a in out.actions if not isinstance(a, Event)] == [RequeueAfter(5.0)], "nothing created yet"
    sft = out.status.stages[0]
    assert sft.phase == "Running" and "being deleted" in sft.message
    # gone (its DELETED event, or a resync's list, says so): a new one, counted, resuming
    out = reconcile(run_with(out.status.wire()), 1, {}, NOW)
    assert CreateStage(0, suspend=False) in out.actions
    assert [e.reason for e in out.actions if isinstance(e, Event)] == ["JobRecreated"]
    sft = out.status.stages[0]
    assert (sft.phase, sft.attempts, sft.reason) == ("Running", 2, "ChildRecreated")
    # its pod starts: attempts stay counted over both Jobs
    out = reconcile(run_with(out.status.wire()), 1, {"sft": ObservedChild("sft", sft.job_name, "Running", 1)}, NOW)
    assert out.status.stages[0].attempts == 2 and out.actions == []


@pytest.mark.parametrize("refusal, phase, counted, requeue", [
    # the earlier run's Job, left to the garbage collector: waited for, not counted
    (Refusal("Job", "tiny-sft-x", 409, "AlreadyExists", "Job tiny-sft-x belongs to an earlier AlignmentRun tiny",
             going=True), "Pending", 0, 5.0),
    # someone else's object of that name: refused like any refusal (counted, then the stage fails)
    (Refusal("Job", "tiny-sft-x", 409, "AlreadyExists", "Job tiny-sft-x already exists and is not this run's"),
     "Pending", 1, 5.0),
])
def test_a_409_on_create_never_adopts(refusal, phase, counted, requeue):
    run = run_with()
    out = reconcile(run, 1, {"sft": ObservedChild("sft", refusal.name, "Refused", kind="Job", refusal=refusal)}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.create_refusals) == (phase, counted)
    assert refusal.message in sft.message
    assert [a for a in out.actions if isinstance(a, RequeueAfter)] == [RequeueAfter(requeue)]
    assert not [a for a in out.actions if isinstance(a, (CreateStage, DeleteChild))]


# ------------------------------------------------------------------------------------ the attempt's recipe

def test_a_recreated_job_and_a_restarted_group_run_the_recipe_their_attempt_started_with():
    run = run_with()
    status = running_sft(run)
    edited = run.model_dump(mode="json", by_alias=True, exclude_none=True)
    edited["spec"]["stages"][0]["training"]["learningRate"] = 0.5
    edited["status"] = status
    edited["metadata"]["generation"] = 2
    edited_run = parse_run(edited)
    # The edit is reported as not applied ...
    out = reconcile(edited_run, 2, {"sft": ObservedChild("sft", "j", "Running", 1)}, NOW)
    assert next(c for c in out.status.conditions if c.type == "SpecRejected").status == "True"
    # ... the Job vanishes: the new one renders the pinned spec, not the edit
    out = reconcile(edited_run, 2, {}, NOW)
    assert CreateStage(0, suspend=False) in out.actions
    rendered = attempt_run(edited_run, out.status, 0)
    assert rendered.spec.stages[0].training.learning_rate == run.spec.stages[0].training.learning_rate != 0.5
    assert stage_hash(rendered, 0) == stage_hash(run, 0) == out.status.stages[0].spec_hash
    recipe = build_stage(rendered, 0, RenderContext(), stage_hash(rendered, 0))[0]["data"]["recipe.yaml"]
    assert "learning_rate: 0.5" not in recipe
    # an Indexed Job's group restart: failed -> Pending -> deleted -> created again, still the pinned spec
    st = AlignmentRunStatus.model_validate(out.status.wire())
    st.stages[0].phase, st.stages[0].previous_attempts = "Pending", 1
    again = dict(edited)
    again["status"] = st.wire()
    out = reconcile(parse_run(again), 2, {}, NOW)
    assert CreateStage(0, suspend=False) in out.actions
    assert attempt_run(edited_run, out.status, 0).spec.stages[0].training.learning_rate != 0.5
    # a retry is a new attempt: it takes the spec as it is then
    st.stages[0].phase = "Failed"
    again["status"] = st.wire()
    again["metadata"]["annotations"] = {"alignment.dev/retry": "1"}
    out = reconcile(parse_run(again), 2, {}, NOW)
    assert attempt_run(edited_run, out.status, 0).spec.stages[0].training.learning_rate == 0.5
    assert attempt_run(run, None, 0) is run


# ------------------------------------------------------------------------------------ kube: a 409 on create

def owned_cm(owner: list[dict] | None, **meta) -> dict:
    return {"kind": "ConfigMap", "metadata": {"name": "tiny-sft-abc123-recipe", "namespace": "ns", "uid": "cm-1",
                                              **({"ownerReferences": owner} if owner else {}), **meta},
            "data": {"recipe.yaml": "old"}}


@pytest.mark.parametrize("found, outcome", [
    # the run's own, saying what the spec says: nothing to do
    ({**owned_cm(ref("AlignmentRun", "tiny", RUN_UID)), "data": {"recipe.yaml": "new"}}, None),
    # the run's own, from a try whose Job was refused: replaced (delete preconditioned on its UID, create)
    (owned_cm(ref("AlignmentRun", "tiny", RUN_UID)), "replaced"),
    # left by an earlier run of the same name, which the garbage collector is deleting: waited for
    (owned_cm(ref("AlignmentRun", "tiny", "uid-of-the-deleted-run")), "going"),
    # being deleted: waited for
    (owned_cm(None, deletionTimestamp=NOW), "going"),
    # someone else's (no controller, or another kind's): refused, never touched
    (owned_cm(None), "refused"),
    (owned_cm(ref("Deployment", "web", "d-1")), "refused"),
    # gone since the 409: the next try creates it
    (None, "going"),
])
def test_a_409_on_create_reads_the_object_and_refuses_what_the_run_does_not_control(monkeypatch, found, outcome):
    from alignment_operator import kube

    touched = []
    monkeypatch.setattr(kube, "_read", lambda kind, ns, name: found)
    monkeypatch.setattr(kube, "_ignore_gone", lambda fn, *a, **kw: touched.append(("delete", kw["body"].preconditions.uid)))
    monkeypatch.setattr(kube, "_api", lambda cls: type("Api", (), {"delete_namespaced_config_map": None})())
    monkeypatch.setattr(kube, "ensure_object", lambda obj: touched.append(("create", obj["metadata"]["name"])) or obj)
    ours = {**owned_cm(ref("AlignmentRun", "tiny", RUN_UID)), "data": {"recipe.yaml": "new"}}
    if outcome in (None, "replaced"):
        assert (kube._exists(ours) is None) == (outcome is None)
        assert touched == ([] if outcome is None else [("delete", "cm-1"), ("create", "tiny-sft-abc123-recipe")])
        return
    with pytest.raises(kube.ChildRefused) as refused:
        kube._exists(ours)
    r = refused.value.refusal
    assert (r.code, r.reason, r.going) == (409, "AlreadyExists", outcome == "going")
    assert touched == [], "never adopted, changed or deleted"
    if outcome == "refused":
        assert "is not this run's" in r.message and "never adopts, changes or deletes it" in r.message
    # the run's volume is not owned by the run (checkpoints outlive it): reused whoever made it
    assert kube._exists({"kind": "PersistentVolumeClaim", "metadata": {"name": "tiny-workspace", "namespace": "ns"}}) is None
