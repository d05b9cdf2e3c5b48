"""Issue 23 on the real node: a run's children are its own by UID, pods that cannot start say why,
and a Job deleted while nobody watched is recreated and resumes.

- must-show 4: a finished run deleted and applied again trains from its first stage (never the old
  run's succeeded Job or final/); a stray pod with the Job's labels never finishes a stage; runs
  `a-b` (stage `x-sft`) and `a-b-x` (stage `sft`), whose Jobs were both `a-b-x-sft`, both succeed
  with their own recipes.
- must-show 5: a nonexistent image, a missing HF token Secret (named before any pod, issue 28), a
  missing ConfigMap, an unschedulable GPU request, a missing claim and a missing service account:
  each stage's message names the cause within 60 s;
  with startDeadlineSeconds the stage fails with it.
- must-show 6: the operator down (no watch), a Running stage's Job deleted: the next operator
  recreates it (counted) and the new pod resumes from the checkpoint.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from controlplane import wait_for
from kubelet import child, get_run, jobs, stage_output
from node import image_ref
from realnode import (complete_checkpoints, events, one_stage_run, prepare_volume, running_pod, start_operator,
                      wait_checkpoint, wait_phase)

pytestmark = [pytest.mark.cluster, pytest.mark.node, pytest.mark.timeout(1200)]


def sft_only(name: str, epochs: int = 1, stage: str = "sft", cpu: int = 2, **training) -> dict:
    """examples/tiny-run.yaml's SFT alone, one epoch (a few seconds of training on the tiny model)."""
    doc = one_stage_run(name, "sft")
    sft = doc["spec"]["stages"][0]
    sft["name"] = stage
    sft["training"].update(epochs=epochs, **training)
    sft["resources"]["cpu"] = cpu
    return doc


def apply(plane, ns: str, doc: dict) -> None:
    plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))


def start_event(plane, ns: str, pod: str) -> dict:
    return next(e for e in events(plane.kubectl("logs", "-n", ns, pod).stdout) if e["event"] == "start")


def test_a_run_applied_again_trains_anew_and_a_stray_pod_finishes_nothing(real, restricted_ns, tmp_path):
    ns, plane, started = restricted_ns, real.plane, time.monotonic()
    api = plane.api_client()
    volume = prepare_volume(real, ns, "again")
    doc = sft_only("again")
    job = child("again", "sft")
    operator = start_operator(real, ns, tmp_path)
    try:
        apply(plane, ns, doc)
        first = wait_phase(real, ns, "again", {"Succeeded", "Failed"}, timeout=600)
        assert first["status"]["phase"] == "Succeeded", json.dumps(first["status"], indent=1)
        old_job = jobs(api, ns)[job]
        # `kubectl delete -f r.yaml && kubectl apply -f r.yaml`: the old Job is still there (the
        # garbage collector removes it in the background) when the new run looks for its own.
        plane.kubectl("delete", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
        apply(plane, ns, doc)
        new_uid = wait_for("the new run", timeout=30, fn=lambda: (
            lambda r: r["metadata"]["uid"] if r["metadata"]["uid"] != first["metadata"]["uid"] else None)(
                get_run(api, ns, "again")))
        new_job = wait_for("the new run's own Job", timeout=120, interval=0.5,
                           fn=lambda: (uid := jobs(api, ns).get(job)) and uid != old_job and uid)
        # A pod made by someone else, labelled with the run, the stage and the Job's name, that
        # "succeeds" at once with a result of its own. (Not with the Job's controller-uid, its
        # selector: the Job controller would adopt such a pod, which then is the Job's own.)
        fake = json.dumps({"method": "sft", "checkpoint": "/fake/final", "train_loss": 0.001})
        stray = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stray", "labels": {
            "alignment.dev/run": "again", "alignment.dev/stage": "sft", "batch.kubernetes.io/job-name": job,
            "job-name": job}},
            "spec": {"restartPolicy": "Never", "securityContext": {
                "runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{"name": "trainer", "image": image_ref("trainer"), "imagePullPolicy": "IfNotPresent",
                                "command": ["python", "-c", f"open('/dev/termination-log', 'w').write({fake!r})"],
                                "securityContext": {"allowPrivilegeEscalation": False,
                                                    "capabilities": {"drop": ["ALL"]}}}]}}
        plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(stray))
        wait_for("the stray pod to succeed", timeout=120, interval=0.5, fn=lambda: json.loads(plane.kubectl(
            "get", "pod", "stray", "-n", ns, "-o", "json").stdout)["status"].get("phase") == "Succeeded")
        time.sleep(2)  # the operator has seen the stray pod's events
        during = get_run(api, ns, "again")["status"]
        second = wait_phase(real, ns, "again", {"Succeeded", "Failed"}, timeout=600)
        pods = json.loads(plane.kubectl("get", "pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={job}",
                                        "-o", "json").stdout)["items"]
        trained = [p["metadata"]["name"] for p in pods
                   if any(r.get("uid") == new_job for r in p["metadata"].get("ownerReferences") or [])]
        said = start_event(plane, ns, trained[0])
        log = (tmp_path / "operator.log").read_text()
    finally:
        operator.stop()
    wall = time.monotonic() - started
    assert during["stages"][0]["phase"] != "Succeeded", during  # the stray pod finished nothing
    status = second["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    sft = status["stages"][0]
    assert sft["checkpoint"] != "/fake/final" and status["model"] == sft["checkpoint"], status
    assert f"/{new_uid[:8]}/sft/final" in sft["checkpoint"], (sft["checkpoint"], new_uid)
    assert first["status"]["model"] != status["model"], "the old run's final/ is not the new run's model"
    assert said.get("resume_from") is None, said  # trained from its first step, not resumed from the old run
    assert (stage_output(plane, volume, ns, "again", "sft") / "final" / "config.json").is_file()
    assert "stray" not in trained, trained
    print(f"\nissue 23 must-show 4 (delete & apply again: a new Job trained from step 0; a stray pod with the "
          f"Job's labels finished nothing; waited for the old Job: {'belongs to an earlier' in log}): {wall:.0f}s")


def test_runs_whose_old_names_collided_both_succeed_with_their_own_recipes(real, restricted_ns, tmp_path):
    ns, plane, started = restricted_ns, real.plane, time.monotonic()
    for run in ("a-b", "a-b-x"):
        prepare_volume(real, ns, run)
    # One core each, so the two run side by side on the 2-core node; different recipes.
    runs = {"a-b": sft_only("a-b", stage="x-sft", cpu=1, maxLength=96),
            "a-b-x": sft_only("a-b-x", stage="sft", cpu=1, maxLength=112)}
    operator = start_operator(real, ns, tmp_path)
    try:
        for doc in runs.values():
            apply(plane, ns, doc)
        done = {name: wait_phase(real, ns, name, {"Succeeded", "Failed"}, timeout=600) for name in runs}
        recipes = {name: yaml.safe_load(json.loads(plane.kubectl(
            "get", "configmap", child(name, doc["spec"]["stages"][0]["name"], "-recipe"), "-n", ns, "-o", "json"
        ).stdout)["data"]["recipe.yaml"]) for name, doc in runs.items()}
    finally:
        operator.stop()
    names = {child("a-b", "x-sft"), child("a-b-x", "sft")}
    assert len(names) == 2 and all(n.startswith("a-b-x-sft-") for n in names), names
    for name, run in done.items():
        assert run["status"]["phase"] == "Succeeded", (name, json.dumps(run["status"], indent=1))
    assert (recipes["a-b"]["training"]["max_length"], recipes["a-b-x"]["training"]["max_length"]) == (96, 112), recipes
    assert recipes["a-b"]["output_dir"] != recipes["a-b-x"]["output_dir"]
    assert done["a-b"]["status"]["model"] != done["a-b-x"]["status"]["model"]
    print(f"\nissue 23 must-show 4 (runs a-b/x-sft and a-b-x/sft, once both a-b-x-sft, each succeeded with its "
          f"own recipe): {time.monotonic() - started:.0f}s")


def test_pods_that_cannot_start_say_why_and_a_start_deadline_fails_the_stage(real, restricted_ns, tmp_path):
    ns, plane, started = restricted_ns, real.plane, time.monotonic()
    api = plane.api_client()

    def run(name: str, gpus: int = 0, **spec) -> dict:
        """A run whose pods never start: a tenth of a core each (the seven fit on the node beside each
        other; the cause is the one named, never "Insufficient cpu")."""
        doc = sft_only(name)
        doc["spec"]["stages"][0]["resources"] = {"gpusPerNode": gpus, "processesPerNode": 1, "cpu": "100m",
                                                 "memory": "256Mi", "sharedMemory": "64Mi"}
        doc["spec"].update(spec)
        if "claimName" not in doc["spec"]["storage"]:
            real.node.workspace(ns, name)  # a volume that binds: the cause is the one named, not the claim
        return doc

    nowhere = "127.0.0.1:1/nope/trainer:0"  # a registry that refuses at once (the node has no internet to wait on)
    cases = {  # run -> (its spec, the stage's reason, words of the cause)
        "image": (run("image", trainer={"image": nowhere}), ("ErrImagePull", "ImagePullBackOff"), nowhere),
        # A missing Secret is named before any pod is made (issue 28: the operator reads its key names),
        # so the run stays Pending; the kubelet's own refusal shows with a ConfigMap nothing checks first.
        "token": (run("token", trainer={"hfTokenSecretRef": {"name": "no-such-secret", "key": "token"}}),
                  ("SecretMissing",), "no-such-secret"),
        "config": (run("config", trainer={"envFrom": [{"configMapRef": {"name": "no-such-config"}}]}),
                   ("CreateContainerConfigError",), 'configmap "no-such-config" not found'),
        "gpus": (run("gpus", gpus=8), ("Unschedulable",), "nvidia.com/gpu"),
        "claim": (run("claim", storage={"claimName": "no-such-claim"}),
                  ("Unschedulable",), 'persistentvolumeclaim "no-such-claim" not found'),
        "account": (run("account", trainer={"serviceAccountName": "no-such-account"}),
                    ("FailedCreate",), 'serviceaccount "no-such-account" not found'),
    }
    cases["deadline"] = (run("deadline", startDeadlineSeconds=20, trainer={"image": nowhere}),
                         ("StartDeadlineExceeded",), nowhere)
    operator = start_operator(real, ns, tmp_path)
    seen: dict[str, tuple[float, dict]] = {}
    try:
        applied = time.monotonic()
        for doc, _, _ in cases.values():
            apply(plane, ns, doc)
        deadline = applied + 90
        while time.monotonic() < deadline and len(seen) < len(cases):
            for name, (_, reasons, words) in cases.items():
                status = get_run(api, ns, name).get("status") or {}
                stage = (status.get("stages") or [{}])[0]
                if name not in seen and stage.get("reason") in reasons and words in (stage.get("message") or ""):
                    seen[name] = (time.monotonic() - applied, status)
            time.sleep(1)
        last = {name: (get_run(api, ns, name).get("status") or {}) for name in cases}
    finally:
        operator.stop()
    missing = {name: (last[name].get("stages") or [{}])[0] for name in cases if name not in seen}
    assert not missing, json.dumps(missing, indent=1)
    for name, (after, status) in seen.items():
        stage = status["stages"][0]
        if name == "deadline":
            assert (status["phase"], stage["phase"]) == ("Failed", "Failed"), status
            assert stage["message"].startswith("not started within startDeadlineSeconds (20s): "), stage
            failed = next(c for c in status["conditions"] if c["type"] == "Failed")
            assert failed["reason"] == "StartDeadlineExceeded" and cases[name][2] in failed["message"], failed
        else:
            assert after <= 60, (name, after, stage)
            phase = "Pending" if name == "token" else "Running"  # nothing started: no Job, no pod
            assert (status["phase"], stage["phase"]) == (phase, phase), (name, status)
            reconciling = next(c for c in status["conditions"] if c["type"] == "Reconciling")
            assert reconciling["reason"] == stage["reason"] and cases[name][2] in reconciling["message"], reconciling
    times = ", ".join(f"{name} {after:.0f}s" for name, (after, _) in sorted(seen.items()))
    print(f"\nissue 23 must-show 5 (each stage's message named its pods' cause: {times}; the deadline "
          f"run failed StartDeadlineExceeded): {time.monotonic() - started:.0f}s")


def test_a_job_deleted_while_no_operator_watched_is_recreated_and_resumes(real, restricted_ns, tmp_path):
    ns, plane, started = restricted_ns, real.plane, time.monotonic()
    api = plane.api_client()
    volume = prepare_volume(real, ns, "gone")
    doc = sft_only("gone", epochs=4, saveSteps=10)  # 100 steps, a checkpoint every 10
    job = child("gone", "sft")
    operator = start_operator(real, ns, tmp_path)
    try:
        apply(plane, ns, doc)
        running_pod(real, ns, job)
        out = stage_output(plane, volume, ns, "gone", "sft")
        complete = lambda: complete_checkpoints(out)
        wait_checkpoint(real, ns, "gone", out)
        first = jobs(api, ns)[job]
        operator.proc.kill()  # no watch, no goodbye: the deletion below reaches no event handler
        operator.proc.wait()
        plane.kubectl("delete", "job", job, "-n", ns, "--cascade=foreground", "--wait=true", "--timeout=120s")
        newest = complete()[0]
        operator = start_operator(real, ns, tmp_path)  # its cache starts empty: the Job is just missing
        second = wait_for("a recreated Job", timeout=120, interval=0.5,
                          fn=lambda: (uid := jobs(api, ns).get(job)) and uid != first and uid)
        run = wait_phase(real, ns, "gone", {"Succeeded", "Failed"}, timeout=900)
        pods = [p for p in json.loads(plane.kubectl("get", "pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={job}",
                                                    "-o", "json").stdout)["items"]
                if any(r.get("uid") == second for r in p["metadata"].get("ownerReferences") or [])]
        log = plane.kubectl("logs", "-n", ns, pods[-1]["metadata"]["name"]).stdout
    finally:
        operator.stop()
    assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)
    stage = run["status"]["stages"][0]
    assert stage["attempts"] == 2, stage  # counted
    said = events(log)
    start = next(e for e in said if e["event"] == "start")
    resumed = int(start["resume_from"].rsplit("-", 1)[1]) if start.get("resume_from") else None
    assert resumed is not None and resumed <= newest, (start, newest)
    steps = [e["step"] for e in said if e["event"] == "progress"]
    assert steps and steps[0] > resumed and steps[-1] == 100, steps
    print(f"\nissue 23 must-show 6 (Job deleted with no operator watching; the next one recreated it, "
          f"resumed from checkpoint-{resumed}): {time.monotonic() - started:.0f}s")
