"""spec.promote under the operator, against a real API server (the kubelet played, as in test_operator.py):
the tiny run's eval reports preference_accuracy 0.85; a gate at 0.9 holds it (phase Held in `kubectl get`,
Promoted False, the gate's value in status.promotion), and the same run with the gate lowered to 0.6 (an
edit of spec.promote, no stage run again) is promoted: Succeeded, Promoted True, status.model the dpo model."""

from __future__ import annotations

import json
import time

import pytest

from kubelet import DPO, EVAL, SFT, apply_tiny, get_run, jobs, play_kubelet, result_message, wait_for, wait_phase

pytestmark = pytest.mark.cluster


def test_the_tiny_run_is_held_by_a_gate_it_misses_then_promoted_when_the_gate_is_met(cluster, operator, namespace):
    ns, api, started = namespace, cluster.api_client(), time.monotonic()
    apply_tiny(cluster, ns, promote={"gates": [{"metric": "preference_accuracy", "min": 0.9}]})
    for job, stage, metrics in ((SFT, "sft", {"train_loss": 1.0}), (DPO, "dpo", {"train_loss": 0.6}),
                                (EVAL, "eval", {"preference_accuracy": 0.85, "reward_margin": 0.4})):
        wait_for(f"the {stage} Job", lambda: job in jobs(api, ns), timeout=60)
        play_kubelet(api, ns, job, 0, result_message(stage, **metrics))
    run = wait_phase(api, ns, "Held")
    p = run["status"]["promotion"]
    assert (p["verdict"], p["stage"], p["evalStage"]) == ("Held", "dpo", "eval"), p
    assert [(g["value"], g["threshold"], g["passed"]) for g in p["gates"]] == [(0.85, 0.9, False)]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in run["status"]["conditions"]}
    assert conditions["Promoted"] == ("False", "GatesNotMet") and conditions["Stalled"] == ("True", "GatesNotMet")
    assert conditions["Ready"][0] == "False"
    table = cluster.kubectl("get", "alignmentruns", "-n", ns).stdout
    assert "Held" in table.splitlines()[1], table
    held_jobs = jobs(api, ns)

    cluster.kubectl("patch", "alignmentrun", "tiny", "-n", ns, "--type=merge",
                    "-p", json.dumps({"spec": {"promote": {"gates": [{"metric": "preference_accuracy", "min": 0.6}]}}}))
    run = wait_phase(api, ns, "Succeeded")
    p = run["status"]["promotion"]
    assert (p["verdict"], p["gates"][0]["passed"]) == ("Promoted", True), p
    conditions = {c["type"]: (c["status"], c["reason"]) for c in run["status"]["conditions"]}
    assert conditions["Promoted"] == ("True", "GatesPassed") and conditions["Ready"][0] == "True"
    assert run["status"]["model"] == p["model"] and p["model"].endswith("/dpo/final")
    assert jobs(api, ns) == held_jobs  # decided again from the eval's results: no stage ran again
    assert "Succeeded" in cluster.kubectl("get", "alignmentruns", "-n", ns).stdout
    print(f"\nissue 27 (gates under the operator, control plane): {time.monotonic() - started:.0f}s")


def test_a_promoted_run_gets_its_inference_service_checked_by_kserves_crd_owned_and_gone_with_it(
        cluster, crds, operator, namespace):
    from controlplane import binaries_dir
    from kubernetes import client

    crd = binaries_dir() / "kserve-crd.yaml"
    if not crd.is_file():
        pytest.fail(f"{crd} is missing: run tools/k8s/build.sh (KServe's CRD from its module)")
    cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.wait_established("inferenceservices.serving.kserve.io")
    ns, api, started = namespace, cluster.api_client(), time.monotonic()
    apply_tiny(cluster, ns, promote={"gates": [{"metric": "preference_accuracy", "min": 0.6}],
                                     "serve": {"cpu": "2", "memory": "4Gi"}})
    for job, stage, metrics in ((SFT, "sft", {"train_loss": 1.0}), (DPO, "dpo", {"train_loss": 0.6}),
                                (EVAL, "eval", {"preference_accuracy": 0.85})):
        wait_for(f"the {stage} Job", lambda: job in jobs(api, ns), timeout=60)
        play_kubelet(api, ns, job, 0, result_message(stage, **metrics))
    custom = client.CustomObjectsApi(api)
    isvc = wait_for("the InferenceService", lambda: next(iter(custom.list_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", ns, "inferenceservices")["items"]), None), timeout=60)
    # The operator creates the InferenceService, then writes status: wait for that write, not only the object.
    run = wait_for("status.promotion.serving", lambda: (r := get_run(api, ns, "tiny")) and
                   (r.get("status") or {}).get("promotion", {}).get("serving") and r, timeout=30)
    assert [(o["uid"], o["controller"]) for o in isvc["metadata"]["ownerReferences"]] == [(run["metadata"]["uid"], True)]
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "huggingface" and "--backend=huggingface" in model["args"]
    assert model["storageUri"].endswith("/dpo/final") and model["storageUri"].startswith("pvc://tiny-workspace/")
    assert run["status"]["promotion"]["serving"] == "tiny"
    # KServe reports it ready (played, as the kubelet is): the URL reaches status at the next reconcile.
    custom.patch_namespaced_custom_object_status("serving.kserve.io", "v1beta1", ns, "inferenceservices", "tiny", {
        "status": {"url": "http://tiny.test.example.com", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-06T10:00:00Z"}]}})
    cluster.kubectl("annotate", "alignmentrun", "tiny", "-n", ns, "example.com/touch=1")
    run = wait_for("the URL in status", lambda: (r := get_run(api, ns, "tiny"))["status"]["promotion"].get("url") and r,
                   timeout=60)
    assert run["status"]["promotion"]["url"] == "http://tiny.test.example.com"
    assert {c["type"]: c["status"] for c in run["status"]["conditions"]}["Serving"] == "True"
    cluster.kubectl("delete", "alignmentrun", "tiny", "-n", ns)
    wait_for("the InferenceService gone with the run", lambda: not custom.list_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", ns, "inferenceservices")["items"], timeout=60)
    print(f"\nissue 27 (promote.serve, KServe's CRD, control plane): {time.monotonic() - started:.0f}s")


def test_a_promoted_runs_export_job_is_created_owned_and_its_result_reaches_status(cluster, operator, namespace):
    from kubernetes import client

    from alignment_operator.identity import stage_child_name

    ns, api, started = namespace, cluster.api_client(), time.monotonic()
    cluster.kubectl("create", "secret", "generic", "s3", "-n", ns, "--from-literal=AWS_ACCESS_KEY_ID=test-key",
                    "--from-literal=AWS_SECRET_ACCESS_KEY=test-secret")
    apply_tiny(cluster, ns, objectStore={"endpointUrl": "http://minio.storage:9000", "credentialsSecretName": "s3"},
               promote={"gates": [{"metric": "preference_accuracy", "min": 0.6}],
                        "exports": [{"uri": "s3://exports/tiny"}]})
    for job, stage, metrics in ((SFT, "sft", {"train_loss": 1.0}), (DPO, "dpo", {"train_loss": 0.6}),
                                (EVAL, "eval", {"preference_accuracy": 0.85})):
        wait_for(f"the {stage} Job", lambda: job in jobs(api, ns), timeout=60)
        play_kubelet(api, ns, job, 0, result_message(stage, **metrics))
    export = stage_child_name("tiny", "promote", "-export")
    wait_for("the export Job", lambda: export in jobs(api, ns), timeout=60)
    run = wait_for("Exported pending", lambda: (r := get_run(api, ns, "tiny")) and any(
        c["type"] == "Exported" and c["reason"] == "ExportPending" for c in r["status"]["conditions"]) and r, timeout=30)
    body = client.BatchV1Api(api).read_namespaced_job(export, ns)
    assert [(o.uid, o.controller) for o in body.metadata.owner_references] == [(run["metadata"]["uid"], True)]
    result = {"uri": "s3://exports/tiny", "digest": "sha256:" + "ab" * 32, "bytes": 1234, "files": 5,
              "seconds": 1.5, "attempts": 1, "completed": "2026-12-06T10:00:00Z"}
    play_kubelet(api, ns, export, 0, json.dumps({"exports": [result]}))
    run = wait_for("Exported", lambda: (r := get_run(api, ns, "tiny")) and any(
        c["type"] == "Exported" and c["status"] == "True" for c in r["status"]["conditions"]) and r, timeout=60)
    assert run["status"]["promotion"]["exports"] == [result] and run["status"]["phase"] == "Succeeded"
    assert "test-secret" not in json.dumps(body.to_dict(), default=str)  # the key pair only through secretKeyRef
    print(f"\nissue 27 (promote.exports' Job, control plane): {time.monotonic() - started:.0f}s")
