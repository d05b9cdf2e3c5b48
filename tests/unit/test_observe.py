"""Children as the API server serves them (plain dicts from a watch) -> what reconcile observes;
and the watch-fed cache the controller reads instead of listing."""

from __future__ import annotations

import json

from alignment_operator import observe
from alignment_operator.cache import Cache
from alignment_trainer import outcome

LABELS = {"alignment.dev/run": "tiny", "alignment.dev/stage": "sft"}
RUN_UID = "run-uid-1"


def controlled_by(kind: str, name: str, uid: str) -> list[dict]:
    return [{"apiVersion": "x/v1", "kind": kind, "name": name, "uid": uid, "controller": True,
             "blockOwnerDeletion": True}]


def job(status: dict, name: str = "tiny-sft", rv: str = "10", **meta) -> dict:
    meta.setdefault("ownerReferences", controlled_by("AlignmentRun", "tiny", RUN_UID))
    return {"kind": "Job", "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "resourceVersion": rv,
                                        "labels": LABELS, "annotations": {"alignment.dev/stage-hash": "h1"},
                                        "creationTimestamp": "2026-12-01T10:00:00Z", **meta},
            "spec": {"completions": 1}, "status": status}


def pod(exit_code: int, message: str, phase: str, job_label: str = "batch.kubernetes.io/job-name",
        owner: str = "tiny-sft", owner_uid: str | None = None) -> dict:
    return {"kind": "Pod", "metadata": {"name": f"{owner}-x", "namespace": "ns", "uid": f"p-{owner}-{exit_code}",
                                        "resourceVersion": "11", "labels": {**LABELS, job_label: owner},
                                        "ownerReferences": controlled_by("Job", owner, owner_uid or f"uid-{owner}")},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message,
                "finishedAt": "2026-12-01T10:05:00Z"}}}]}}


def test_a_one_pod_stage_is_done_when_its_pod_is_with_the_trainers_result():
    result = {"method": "sft", "checkpoint": "/w/sft/final", "train_loss": 1.5}
    child = observe.children([job({"active": 1})], [pod(0, outcome.encode(result), "Succeeded")], RUN_UID)["sft"]
    assert (child.state, child.kind, child.attempts, child.result) == ("Succeeded", "Job", 1, result)
    assert (child.finished, child.spec_hash) == ("2026-12-01T10:05:00Z", "h1")


def test_a_failed_job_carries_the_trainers_outcome():
    said = outcome.failure("dataset d.jsonl split train: line 3: column 'messages' is missing", "DataError")
    failed = job({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                               "message": "...", "lastTransitionTime": "2026-12-01T10:06:00Z"}]})
    child = observe.children([failed], [pod(2, outcome.encode(said), "Failed")], RUN_UID)["sft"]
    assert child.state == "Failed" and child.finished == "2026-12-01T10:06:00Z"
    assert child.message.startswith("DataError (exit code 2; fix the dataset")
    assert child.message.endswith("line 3: column 'messages' is missing")


def test_a_log_tail_keeps_its_end_and_a_running_job_is_running():
    tail = "Traceback (most recent call last):\n" + "  frame\n" * 600 + "RuntimeError: NCCL timeout on rank 3"
    failed = job({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
    message = observe.children([failed], [pod(1, tail, "Failed")], RUN_UID)["sft"].message
    assert len(message) <= observe.MESSAGE_LIMIT and message.startswith("Error (exit code 1): ")
    assert message.endswith("RuntimeError: NCCL timeout on rank 3")
    assert observe.children([job({"active": 1})], [], RUN_UID)["sft"].state == "Running"
    assert observe.children([job({})], [], RUN_UID)["sft"].state == "Pending"


def test_a_jobset_speaks_for_its_stage_and_its_own_jobs_are_not_children():
    jobset = {"kind": "JobSet", "metadata": {"name": "tiny-sft", "namespace": "ns", "uid": "js", "labels": LABELS,
                                             "ownerReferences": controlled_by("AlignmentRun", "tiny", RUN_UID)},
              "spec": {}, "status": {"restarts": 2, "conditions": [
                  {"type": "Completed", "status": "True", "lastTransitionTime": "2026-12-01T11:00:00Z"}]}}
    inner = job({"active": 2}, name="tiny-sft-node-0", ownerReferences=controlled_by("JobSet", "tiny-sft", "js"))
    rank0 = pod(0, json.dumps({"checkpoint": "/w/sft/final"}), "Succeeded",
                job_label="jobset.sigs.k8s.io/jobset-name", owner="tiny-sft-node-0")
    child = observe.children([observe.slim(jobset), observe.slim(inner)], [observe.slim(rank0)], RUN_UID)["sft"]
    assert (child.kind, child.state, child.attempts, child.result) == ("JobSet", "Succeeded", 3,
                                                                       {"checkpoint": "/w/sft/final"})


def test_the_cache_keeps_the_newest_version_and_forgets_deleted_objects():
    cache = Cache()
    big = job({"active": 1}, rv="12")
    big["spec"]["template"] = {"spec": {"containers": [{"name": "trainer", "env": [{"name": "X", "value": "y" * 5000}]}]}}
    assert cache.put(big) == ("ns", "tiny")
    kept = cache.children("ns", "tiny")[0][0]
    assert "template" not in kept["spec"] and observe.job(kept, []) == observe.job(big, []), "kept what observe reads"
    cache.put(job({}, rv="9"))  # an older event arriving late changes nothing
    objects, _ = cache.children("ns", "tiny")
    assert [o["status"] for o in objects] == [{"active": 1}]
    cache.put(job({}, rv="13"), deleted=True)
    assert cache.children("ns", "tiny") == ([], [])
    assert cache.put({"kind": "Job", "metadata": {"name": "x", "namespace": "ns", "uid": "u"}}) is None
    cache.put_run({"metadata": {"name": "tiny", "namespace": "ns", "resourceVersion": "5"}, "spec": {}})
    cache.put_run({"metadata": {"name": "tiny", "namespace": "ns", "resourceVersion": "4"}, "spec": {"old": 1}})
    assert cache.run("ns", "tiny")["spec"] == {}
    cache.forget_run("ns", "tiny")
    assert cache.run("ns", "tiny") is None


def test_an_indexed_jobs_failure_is_a_group_failure_of_its_kind():
    failed = job({"failed": 1, "active": 1, "conditions": [{
        "type": "Failed", "status": "True", "reason": "PodFailurePolicy",
        "message": "Pod ns/tiny-dpo-1-x has condition DisruptionTarget matching FailJob rule at index 1"}]})
    failed["spec"].update(completionMode="Indexed", completions=2)
    child = observe.children([observe.slim(failed)], [], RUN_UID)["sft"]
    assert (child.group, child.failure, child.attempts) == (True, "disruption", 1)
    single = observe.children([job({"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]})], [], RUN_UID)["sft"]
    assert (single.group, single.failure) == (False, "failure")


def test_a_multi_rank_pytorchjobs_failure_is_a_group_failure_its_pods_classify():
    """The training operator fails a PyTorchJob (restartPolicy Never) at its first failed rank; the
    operator restarts every rank, counting it unless a pod was disrupted, never on FIX_INPUT."""
    def pytorchjob(workers: int) -> dict:
        obj = job({"replicaStatuses": {"Master": {"active": 1}, "Worker": {"failed": 1}},
                   "conditions": [{"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
                                   "message": "PyTorchJob ns/tiny-sft is failed because 1 Worker replica(s) failed."}]})
        obj["kind"] = "PyTorchJob"
        obj["spec"] = {"runPolicy": {"suspend": False}, "pytorchReplicaSpecs": {
            "Master": {"replicas": 1, "template": {"spec": {"containers": [{"name": "pytorch"}]}}},
            **({"Worker": {"replicas": workers, "template": {}}} if workers else {})}}
        return obj

    label = "training.kubeflow.org/job-name"
    killed = pod(137, "", "Failed", job_label=label)
    evicted = pod(143, "", "Failed", job_label=label)
    evicted["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]
    bad_input = pod(outcome.FIX_INPUT, "", "Failed", job_label=label)
    kinds = {}
    for what, p in {"killed": killed, "evicted": evicted, "bad input": bad_input}.items():
        child = observe.children([observe.slim(pytorchjob(1))], [observe.slim(p)], RUN_UID)["sft"]
        assert child.state == "Failed" and child.group and child.attempts == 1, child
        kinds[what] = child.failure
    assert kinds == {"killed": "failure", "evicted": "disruption", "bad input": "input"}
    alone = observe.children([observe.slim(pytorchjob(0))], [observe.slim(killed)], RUN_UID)["sft"]
    assert (alone.state, alone.group) == ("Failed", False)
