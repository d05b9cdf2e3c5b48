"""The operator against the real control plane: a run driven through its stages to Succeeded.

There is no kubelet: the test plays it, completing each stage's pod with a termination message
the way the trainer writes one. Everything else is real: the API server (CRD schema, CEL,
Pod Security admission), the Job controller, the garbage collector, and the operator process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from kubelet import DPO, EVAL, SFT, apply_tiny, get_run, jobs, play_kubelet, result_message, wait_for, wait_phase
from operator_process import Operator

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restricted(cluster, namespace):
    """The test namespace, enforcing the restricted Pod Security level."""
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    return namespace


@pytest.fixture
def operator(cluster, crds, restricted, tmp_path):
    op = Operator(cluster.kubeconfig, restricted, tmp_path / "operator.log").start()
    yield op
    op.stop()


def test_run_goes_through_every_stage_to_succeeded(cluster, operator, restricted):
    ns, api = restricted, cluster.api_client()
    apply_tiny(cluster, ns)
    wait_for("the sft Job", lambda: SFT in jobs(api, ns))
    run = wait_phase(api, ns, "Running")
    assert run["status"]["currentStage"] == "sft" and run["status"]["progress"] == "0/3"
    pvc = client.CoreV1Api(api).read_namespaced_persistent_volume_claim("tiny-workspace", ns)
    assert not pvc.metadata.owner_references, "the volume outlives the run"

    play_kubelet(api, ns, SFT, 0, result_message("sft", train_loss=2.5, eval_loss=2.75))
    wait_for("the dpo Job", lambda: DPO in jobs(api, ns))
    # The Job is created first, the status written right after it.
    sft = wait_for("sft Succeeded in status", lambda: (st := get_run(api, ns, "tiny")["status"]["stages"][0])
                   ["phase"] == "Succeeded" and st)
    assert sft["metrics"]["train_loss"] == 2.5
    assert sft["checkpoint"] == "/workspace/x/tiny/sft/final"

    # Restart the operator in the middle: nothing is created twice.
    before = jobs(api, ns)
    operator.stop()
    operator.start()
    time.sleep(3)
    assert jobs(api, ns) == before

    play_kubelet(api, ns, DPO, 0, result_message("dpo", train_loss=0.4, **{"rewards/accuracies": 0.875}))
    wait_for("the eval Job", lambda: EVAL in jobs(api, ns))
    play_kubelet(api, ns, EVAL, 0, result_message("eval", preference_accuracy=0.9, perplexity=3.5))
    run = wait_phase(api, ns, "Succeeded")

    s = run["status"]
    assert s["progress"] == "3/3" and s["model"] == "/workspace/x/tiny/dpo/final"
    assert [st["phase"] for st in s["stages"]] == ["Succeeded"] * 3
    assert all(st["checkpoint"] and st["metrics"] for st in s["stages"])
    assert s["evaluation"]["preference_accuracy"] == 0.9
    assert s["observedGeneration"] == run["metadata"]["generation"]
    table = cluster.kubectl("get", "alignmentruns", "-n", ns).stdout
    assert table.split()[:7] == ["NAME", "PHASE", "STAGE", "PROGRESS", "MODEL", "GPU-H", "AGE"]
    assert "Succeeded" in table and "3/3" in table and "/workspace/x/tiny/dpo/final" in table
    reasons = [e.reason for e in client.CoreV1Api(api).list_namespaced_event(
        ns, field_selector="involvedObject.kind=AlignmentRun").items]
    assert reasons.count("StageStarted") == 3 and "RunSucceeded" in reasons
    scraped = operator.metrics()
    assert 'alignment_runs{phase="Succeeded"} 1.0' in scraped
    assert 'alignment_stage_transitions_total{reason="StageSucceeded"}' in scraped
    assert "alignment_reconcile_duration_seconds_count" in scraped


def trainer_failure_message(tmp_path: Path) -> str:
    """What the trainer itself writes to its termination message path for a dataset whose third
    row has no `messages` column (data is checked before any model loads, so none is needed)."""
    rows = [json.loads(line) for line in (ROOT / "examples/data/sft.jsonl").read_text().splitlines()[:5]]
    rows[2] = {"text": "no messages here"}
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    message = tmp_path / "termination-log"
    recipe.write_text(yaml.safe_dump({"method": "sft", "model": {"model_name_or_path": str(tmp_path / "no-model")},
                                      "datasets": [{"path": str(data)}], "output_dir": str(tmp_path / "out"),
                                      "termination_message_path": str(message)}))
    proc = subprocess.run([sys.executable, "-m", "alignment_trainer", str(recipe)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    return message.read_text()


def test_failed_stage_fails_the_run_with_the_trainers_own_message(cluster, operator, restricted, tmp_path):
    ns, api = restricted, cluster.api_client()
    written = trainer_failure_message(tmp_path)
    line = json.loads(written)["error"]
    assert "sft.jsonl" in line and "line 3" in line and "'messages'" in line
    stages = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())["spec"]["stages"]
    stages[0]["backoffLimit"] = 0
    apply_tiny(cluster, ns, stages=stages)
    wait_for("the sft Job", lambda: SFT in jobs(api, ns))
    play_kubelet(api, ns, SFT, 2, written)
    run = wait_phase(api, ns, "Failed")
    msg = run["status"]["stages"][0]["message"]
    assert msg.startswith("DataError (exit code 2; fix the dataset named here") and msg.endswith(line)
    cond = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert cond["status"] == "True" and cond["message"].endswith(line)
    time.sleep(1)
    assert DPO not in jobs(api, ns), "nothing runs after a failed stage"


def test_a_log_tail_message_keeps_its_last_line(cluster, operator, restricted):
    """A pod that died before writing its outcome: the kubelet's log tail (FallbackToLogsOnError)
    starts with 2 KiB of traceback; the status keeps the end, where the error is."""
    ns, api = restricted, cluster.api_client()
    stages = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())["spec"]["stages"]
    stages[0]["backoffLimit"] = 0
    apply_tiny(cluster, ns, stages=stages)
    wait_for("the sft Job", lambda: SFT in jobs(api, ns))
    traceback = "".join(f'  File "/opt/x/frame{i}.py", line {i}, in f{i}\n    call_{i}()\n' for i in range(40))
    last = "RuntimeError: NCCL communicator was aborted on rank 3"
    play_kubelet(api, ns, SFT, 1, f"Traceback (most recent call last):\n{traceback}{last}\n")
    msg = wait_phase(api, ns, "Failed")["status"]["stages"][0]["message"]
    assert len(traceback) > 2048 and msg.startswith("Error (exit code 1): ") and msg.endswith(last)


def test_the_retry_annotation_reruns_only_the_failed_stage(cluster, operator, restricted, tmp_path):
    ns, api = restricted, cluster.api_client()
    stages = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())["spec"]["stages"]
    stages[1]["backoffLimit"] = 0
    apply_tiny(cluster, ns, stages=stages)
    sft_uid = wait_for("the sft Job", lambda: jobs(api, ns).get(SFT))
    play_kubelet(api, ns, SFT, 0, result_message("sft", train_loss=2.5))
    failed_uid = wait_for("the dpo Job", lambda: jobs(api, ns).get(DPO))
    play_kubelet(api, ns, DPO, 2, trainer_failure_message(tmp_path))
    wait_phase(api, ns, "Failed")

    cluster.kubectl("annotate", "alignmentrun", "tiny", "-n", ns, "alignment.dev/retry=first")
    retried = wait_for("a new dpo Job", lambda: (uid := jobs(api, ns).get(DPO)) and uid != failed_uid and uid,
                       timeout=60)
    run = wait_phase(api, ns, "Running")
    assert run["status"]["retryRequest"] == "first"
    assert [s["phase"] for s in run["status"]["stages"]] == ["Succeeded", "Running", "Pending"]
    assert run["status"]["stages"][1]["attempts"] >= 1 and not run["status"]["stages"][1].get("message")
    assert jobs(api, ns)[SFT] == sft_uid, "the succeeded stage is not redone"
    play_kubelet(api, ns, DPO, 0, result_message("dpo", train_loss=0.4))
    wait_for("the eval Job", lambda: EVAL in jobs(api, ns))
    time.sleep(2)  # the same annotation again does nothing more
    assert jobs(api, ns)[DPO] == retried and jobs(api, ns)[SFT] == sft_uid
    reasons = [e.reason for e in client.CoreV1Api(api).list_namespaced_event(
        ns, field_selector="involvedObject.kind=AlignmentRun").items]
    assert reasons.count("StageRetried") == 1


def test_job_deleted_by_hand_is_recreated_and_deleting_the_run_removes_children(cluster, operator, restricted):
    ns, api = restricted, cluster.api_client()
    apply_tiny(cluster, ns)
    first = wait_for("the sft Job", lambda: jobs(api, ns).get(SFT))
    cluster.kubectl("delete", "job", SFT, "-n", ns, "--cascade=background")
    second = wait_for("a recreated sft Job", lambda: (uid := jobs(api, ns).get(SFT)) and uid != first and uid)
    assert second != first
    cluster.kubectl("delete", "alignmentrun", "tiny", "-n", ns)
    wait_for("children garbage-collected", lambda: not jobs(api, ns) and not client.CoreV1Api(api).list_namespaced_config_map(
        ns, label_selector="alignment.dev/run=tiny").items, timeout=60)
    assert client.CoreV1Api(api).read_namespaced_persistent_volume_claim("tiny-workspace", ns), "checkpoints stay"


def test_suspend_suspends_the_job_and_resume_unsuspends_it(cluster, operator, restricted):
    ns, api = restricted, cluster.api_client()
    apply_tiny(cluster, ns)
    wait_for("the sft Job", lambda: SFT in jobs(api, ns))
    cluster.kubectl("patch", "alignmentrun", "tiny", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    batch = client.BatchV1Api(api)
    wait_for("Job suspended", lambda: batch.read_namespaced_job(SFT, ns).spec.suspend)
    wait_phase(api, ns, "Suspended")
    cluster.kubectl("patch", "alignmentrun", "tiny", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for("Job resumed", lambda: not batch.read_namespaced_job(SFT, ns).spec.suspend)
    wait_phase(api, ns, "Running")


def test_rendered_objects_pass_server_validation_and_restricted_pod_security(cluster, crds, restricted, tmp_path):
    """Every example's Jobs, indexed Jobs + Services and PyTorchJobs, dry-run on the server."""
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        for pytorchjob in (False, True):
            doc = yaml.safe_load(example.read_text())
            doc["spec"]["stages"][0].setdefault("resources", {})["nodes"] = 2  # exercise multi-node too
            path = tmp_path / example.name
            path.write_text(yaml.safe_dump(doc))
            args = [sys.executable, "-m", "alignment_operator.cli", "render", str(path), "-n", restricted]
            rendered = subprocess.run(args + (["--pytorchjob"] if pytorchjob else []),
                                      check=True, capture_output=True, text=True).stdout
            out = cluster.kubectl("apply", "--dry-run=server", "-n", restricted, "-f", "-", input=rendered)
            assert "would violate PodSecurity" not in out.stderr, out.stderr
            kinds = {d["kind"] for d in yaml.safe_load_all(rendered)}
            assert ("PyTorchJob" in kinds) == pytorchjob and ("Service" in kinds) != pytorchjob


def test_ttl_after_finished_deletes_the_jobs_but_keeps_status_and_volume(cluster, operator, restricted):
    ns, api = restricted, cluster.api_client()
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["spec"]["stages"] = doc["spec"]["stages"][:1]  # one stage is enough to finish a run
    doc["spec"]["ttlSecondsAfterFinished"] = 2
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    wait_for("the sft Job", lambda: SFT in jobs(api, ns))
    play_kubelet(api, ns, SFT, 0, result_message("sft", train_loss=1.0))
    wait_phase(api, ns, "Succeeded")
    wait_for("Jobs deleted after the ttl", lambda: not jobs(api, ns), timeout=30)
    run = get_run(api, ns, "tiny")
    assert run["status"]["stages"][0]["checkpoint"] == "/workspace/x/tiny/sft/final", "status keeps the results"
    assert client.CoreV1Api(api).read_namespaced_persistent_volume_claim("tiny-workspace", ns)
