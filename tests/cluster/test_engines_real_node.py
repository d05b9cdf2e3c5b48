"""The distributed-training engines for real, on the real node: the Kubeflow training operator
(PyTorchJob), the JobSet controller and Kueue, each built from its Go module and installed from
its own manifests (tests/cluster/engines.py). Through each, what a cluster does to a long run:

- a two-pod ZeRO-3 stage whose rank dies after a checkpoint restarts both ranks from it, once
  as a PyTorchJob and once as a JobSet (the operator picks the backend from the CRDs it finds);
- a run in a Kueue LocalQueue waits suspended while its ClusterQueue has no quota, and runs to
  Succeeded once the ClusterQueue's quota admits it.

Needs what tests/cluster/test_real_node.py needs (the node, the images, the engines from
tools/k8s/build.sh); ALIGNMENT_SKIP_NODE=1 skips it.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

import engines
from controlplane import wait_for
from kubelet import child, get_run, stage_output
from realnode import (assert_resumed, complete_checkpoints, prepare_volume, start_operator, tiny_run, two_rank_run,
                      wait_checkpoint, wait_phase)

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(1800)]


def pods(plane, ns: str, selector: str) -> list[dict]:
    return json.loads(plane.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json").stdout)["items"]


def children(plane, ns: str, plural: str) -> list[dict]:
    return json.loads(plane.kubectl("get", plural, "-n", ns, "-o", "json").stdout)["items"]


def kill_a_rank_after_a_checkpoint(real, ns: str, tmp_path, run: str, owner: str, victim: str,
                                   plural: str) -> tuple[dict, int, tuple[str, str]]:
    """Applies the two-rank run, deletes the `victim` pod once the stage has a complete checkpoint,
    and waits for the run to end. Returns (run, the newest checkpoint step at the kill, the uid of
    the stage's child (a `plural`) before the kill and at the end)."""
    plane = real.plane
    child_uid = lambda: next((c["metadata"]["uid"] for c in children(plane, ns, plural)), None)
    volume = prepare_volume(real, ns, run)
    operator = start_operator(real, ns, tmp_path)
    try:
        # 26 steps, a checkpoint every 5: the kill comes right after checkpoint-5, 20 steps before the end
        plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(two_rank_run(run, epochs=2, save_steps=5)))
        out = stage_output(plane, volume, ns, run, "sft")
        complete = lambda: complete_checkpoints(out)
        wait_checkpoint(real, ns, run, out)
        wait_for(f"two running ranks of {owner}", timeout=60, fn=lambda: len(
            [p for p in pods(plane, ns, owner) if p["status"].get("phase") == "Running"]) == 2)
        first = child_uid()
        rank = pods(plane, ns, f"{owner},{victim}")[0]["metadata"]["name"]
        plane.kubectl("delete", "pod", "-n", ns, rank, "--wait=false")
        killed_after = complete()[0]
        done = wait_phase(real, ns, run, {"Succeeded", "Failed"}, timeout=900)
    finally:
        operator.stop()
    return done, killed_after, (first, child_uid())


def test_a_killed_rank_of_a_pytorchjob_restarts_both_ranks_from_the_checkpoint(real, restricted_ns, tmp_path):
    """With the training operator installed the two-node stage is a PyTorchJob (Master + Worker,
    restartPolicy Never). Its Worker's pod is deleted after a checkpoint: the training operator
    fails the PyTorchJob, the operator counts one restart and creates it again, and both new ranks
    resume from that checkpoint (never the Worker alone into a Master still waiting in gloo)."""
    ns, plane, started = restricted_ns, real.plane, time.monotonic()
    engines.install(plane, "training-operator")
    owner = f"training.kubeflow.org/job-name={child('pkill', 'sft')}"
    run, killed_after, (before, after) = kill_a_rank_after_a_checkpoint(
        real, ns, tmp_path, "pkill", owner, "training.kubeflow.org/replica-type=worker", "pytorchjobs")
    assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)
    assert before and after and before != after  # the failed PyTorchJob went; a new one ran both ranks
    stage = run["status"]["stages"][0]
    assert stage["restarts"] == 1, stage
    ranks = pods(plane, ns, owner)
    assert sorted(p["metadata"]["labels"]["training.kubeflow.org/replica-type"] for p in ranks) == ["master", "worker"]
    # The Worker waited for the Master's DNS name in the init container our template makes
    # restricted-compliant (the namespace enforces `restricted`: the built-in one is refused).
    worker = next(p for p in ranks if p["metadata"]["labels"]["training.kubeflow.org/replica-type"] == "worker")
    assert [c["name"] for c in worker["spec"]["initContainers"]] == ["init-pytorch"], worker["spec"]
    master = next(p for p in ranks if p is not worker)
    resumed = assert_resumed(plane.kubectl("logs", "-n", ns, master["metadata"]["name"]).stdout, killed_after, stage)
    print(f"\nissue 13 (PyTorchJob: the Worker killed after checkpoint-{killed_after}; one counted restart, "
          f"both ranks resumed from checkpoint-{resumed}): {time.monotonic() - started:.0f}s")


def test_a_killed_rank_of_a_jobset_restarts_both_ranks_from_the_checkpoint(real, restricted_ns, tmp_path):
    """With the JobSet CRD installed (it wins over PyTorchJob) the stage is a JobSet of one Indexed
    Job. Rank 1's pod is deleted after a checkpoint: its Job fails at once (backoffLimit 0), the
    JobSet's failure policy restarts every rank (counted: the rule 'Failure', maxRestarts =
    backoffLimit), and the new ranks resume from the checkpoint. The JobSet is the same object
    throughout: its own restart counter says 1, and the stage's attempts say 2."""
    ns, plane, started = restricted_ns, real.plane, time.monotonic()
    engines.install(plane, "jobset")
    owner = f"jobset.sigs.k8s.io/jobset-name={child('jkill', 'sft', limit=48)}"
    run, killed_after, (before, after) = kill_a_rank_after_a_checkpoint(
        real, ns, tmp_path, "jkill", owner, "batch.kubernetes.io/job-completion-index=1", "jobsets")
    assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)
    assert before and before == after  # JobSet restarted its ranks itself: the operator recreated nothing
    stage = run["status"]["stages"][0]
    (jobset,) = children(plane, ns, "jobsets")
    assert jobset["status"]["restarts"] == 1, jobset["status"]
    assert stage["attempts"] == 2 and stage["jobName"] == child("jkill", "sft", limit=48), stage
    again = pods(plane, ns, f"{owner},jobset.sigs.k8s.io/restart-attempt=1")
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in again) == ["0", "1"]
    rank0 = next(p for p in again if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")
    resumed = assert_resumed(plane.kubectl("logs", "-n", ns, rank0["metadata"]["name"]).stdout, killed_after, stage)
    print(f"\nissue 13 (JobSet: rank 1 killed after checkpoint-{killed_after}; JobSet restart 1, both ranks "
          f"resumed from checkpoint-{resumed}): {time.monotonic() - started:.0f}s")


def cluster_queue(cpu: str, memory: str) -> dict:
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": "alignment"},
            "spec": {"namespaceSelector": {}, "resourceGroups": [{
                "coveredResources": ["cpu", "memory"],
                "flavors": [{"name": "default", "resources": [{"name": "cpu", "nominalQuota": cpu},
                                                              {"name": "memory", "nominalQuota": memory}]}]}]}}


def test_a_queued_run_waits_suspended_until_kueue_admits_it(real, restricted_ns, tmp_path):
    """spec.queueName: the stage Job starts suspended with Kueue's queue label; Kueue makes a
    Workload for it, which stays pending while the ClusterQueue's quota is zero (the run says it
    waits for Kueue, no pod runs); raising the quota lets Kueue admit it and unsuspend the Job, and
    the stage trains in a real pod to Succeeded."""
    ns, plane, started = restricted_ns, real.plane, time.monotonic()
    engines.install(plane, "kueue")
    volume = prepare_volume(real, ns, "queued")
    flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default"}}
    local = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
             "metadata": {"name": "team", "namespace": ns}, "spec": {"clusterQueue": "alignment"}}
    plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([flavor, cluster_queue("0", "0"), local]))
    doc = tiny_run("queued")
    doc["spec"]["queueName"] = "team"
    sft = doc["spec"]["stages"][0]
    sft["training"]["epochs"] = 1
    sft["resources"] = {**(sft.get("resources") or {}), "cpu": 1, "memory": "3Gi"}
    doc["spec"]["stages"] = [sft]
    api = plane.api_client()
    operator = start_operator(real, ns, tmp_path)
    try:
        plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
        workload = lambda: next(iter(json.loads(plane.kubectl("get", "workloads.kueue.x-k8s.io", "-n", ns, "-o", "json")
                                                .stdout)["items"]), None)
        pending = wait_for("Kueue's Workload for the stage Job, pending", timeout=120, fn=lambda: (
            lambda w: w if w and any(c["type"] == "QuotaReserved" and c["status"] == "False"
                                     for c in (w.get("status") or {}).get("conditions") or []) else None)(workload()))
        waiting = wait_for("the run waiting for Kueue", timeout=60, fn=lambda: (
            lambda r: r if "waiting for Kueue" in ((r.get("status") or {}).get("stages") or [{}])[0].get("message", "")
            else None)(get_run(api, ns, "queued")))
        time.sleep(5)  # a while with no quota: still nothing runs
        job = json.loads(plane.kubectl("get", "job", "-n", ns, child("queued", "sft"), "-o", "json").stdout)
        assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team"
        assert not pods(plane, ns, f"batch.kubernetes.io/job-name={child('queued', 'sft')}")
        assert get_run(api, ns, "queued")["status"]["stages"][0]["phase"] == "Suspended"
        plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(cluster_queue("2", "8Gi")))
        admitted_at = time.monotonic()
        run = wait_phase(real, ns, "queued", {"Succeeded", "Failed"}, timeout=600)
        admitted = workload()
    finally:
        operator.stop()
    assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)
    assert admitted["status"]["admission"]["clusterQueue"] == "alignment", admitted["status"]
    ran = pods(plane, ns, f"batch.kubernetes.io/job-name={child('queued', 'sft')}")
    assert ran and all(p["status"]["phase"] == "Succeeded" for p in ran)
    assert (stage_output(plane, volume, ns, "queued", "sft") / "final" / "config.json").is_file()
    assert pending["metadata"]["ownerReferences"][0]["name"] == child("queued", "sft")
    assert waiting["status"]["stages"][0]["phase"] == "Suspended"
    print(f"\nissue 13 (Kueue: pending with zero quota, admitted {time.monotonic() - admitted_at:.0f}s before "
          f"Succeeded after the quota rose): {time.monotonic() - started:.0f}s")
