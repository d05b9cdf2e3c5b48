"""Issue 23 against a real API server, garbage collector and Job controller (the kubelet is played as
in test_operator.py): what is not the run's is never adopted, changed or deleted, and a run deleted
and applied again starts from its first stage."""

from __future__ import annotations

import time

import pytest
import yaml
from kubernetes import client

from kubelet import DPO, SFT, apply_tiny, get_run, jobs, play_tiny_stages, wait_for, wait_phase

pytestmark = pytest.mark.cluster


def test_a_run_deleted_and_applied_again_never_adopts_the_old_runs_jobs(cluster, operator, namespace):
    ns, api, started = namespace, cluster.api_client(), time.monotonic()
    doc = apply_tiny(cluster, ns)
    play_tiny_stages(api, ns)
    first = wait_phase(api, ns, "Succeeded")
    old = jobs(api, ns)
    # `kubectl delete -f tiny.yaml && kubectl apply -f tiny.yaml`
    cluster.kubectl("delete", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    apply_tiny(cluster, ns)
    new_sft = wait_for("the new run's own sft Job", lambda: (uid := jobs(api, ns).get(SFT)) and uid != old[SFT] and uid,
                       timeout=60)
    run = get_run(api, ns, "tiny")
    assert run["metadata"]["uid"] != first["metadata"]["uid"]
    owner = client.BatchV1Api(api).read_namespaced_job(SFT, ns).metadata.owner_references
    assert [(o.uid, o.controller) for o in owner] == [(run["metadata"]["uid"], True)], owner
    time.sleep(3)  # the old Jobs and pods the garbage collector has not removed yet would be seen by now
    run = get_run(api, ns, "tiny")
    assert [s["phase"] for s in run["status"]["stages"]] == ["Running", "Pending", "Pending"], run["status"]
    assert jobs(api, ns).get(DPO) in (None, old[DPO]), "no dpo of the new run before its sft trained"
    print(f"\nissue 23 (delete & apply again, control plane: a new sft Job {new_sft[:8]}, nothing adopted): "
          f"{time.monotonic() - started:.0f}s")


def test_an_object_of_a_childs_name_that_is_not_the_runs_is_never_touched(cluster, operator, namespace):
    ns, api, started = namespace, cluster.api_client(), time.monotonic()
    core = client.CoreV1Api(api)
    theirs = core.create_namespaced_config_map(ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=f"{SFT}-recipe"), data={"someone": "else's"}))
    apply_tiny(cluster, ns)
    run = wait_phase(api, ns, "Failed")
    sft = run["status"]["stages"][0]
    assert sft["createRefusals"] == 3 and sft["reason"] == "ChildRefused", sft
    assert f"ConfigMap {SFT}-recipe already exists and is not this run's (its controller: no controller)" in \
        sft["message"], sft["message"]
    after = core.read_namespaced_config_map(f"{SFT}-recipe", ns)
    assert (after.metadata.uid, after.data, after.metadata.owner_references) == (theirs.metadata.uid, {"someone": "else's"},
                                                                                  None)
    assert SFT not in jobs(api, ns)
    print(f"\nissue 23 (a ConfigMap of the recipe's name, not the run's: refused 3 times, untouched): "
          f"{time.monotonic() - started:.0f}s")
