"""What the cluster tests do in place of a user and a kubelet: apply the tiny run, read it back,
and finish its pods (the control plane has no kubelet)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import yaml
from kubernetes import client

from alignment_operator.identity import stage_child_name
from controlplane import wait_for

__all__ = ["DPO", "EVAL", "SFT", "apply_tiny", "child", "column_of", "stage", "stage_output", "get_run", "jobs",
           "play_kubelet", "play_tiny_stages", "result_message", "wait_for", "wait_phase"]
ROOT = Path(__file__).resolve().parents[2]
SFT, DPO, EVAL = (stage_child_name("tiny", stage) for stage in ("sft", "dpo", "eval"))  # the tiny run's Jobs
child = stage_child_name  # child(run, stage[, "-recipe" | "-rdzv"]): a stage's Job (ConfigMap, Service) name


def stage_output(cluster, volume: Path, ns: str, run: str, stage: str) -> Path:
    """Where a stage of a run that exists writes on the volume: <ns>/<run>/<its UID's first 8>/<stage>."""
    uid = cluster.kubectl("get", "alignmentrun", run, "-n", ns, "-o", "jsonpath={.metadata.uid}").stdout.strip()
    assert uid, f"no AlignmentRun {ns}/{run}"
    return volume / ns / run / uid[:8] / stage


def apply_tiny(cluster, ns: str, **spec) -> dict:
    """examples/tiny-run.yaml, with `spec` fields replaced, applied into `ns`."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["spec"].update(spec)
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    return doc


def get_run(api: client.ApiClient, ns: str, name: str) -> dict:
    return client.CustomObjectsApi(api).get_namespaced_custom_object("alignment.dev", "v1alpha1", ns, "alignmentruns", name)


def wait_phase(api: client.ApiClient, ns: str, phases: str | set[str], run: str = "tiny", timeout: float = 60,
               interval: float = 0.2) -> dict:
    """The run once its status.phase is `phases` (one phase, or any of a set)."""
    wanted = {phases} if isinstance(phases, str) else phases
    return wait_for(" or ".join(sorted(wanted)), timeout=timeout, interval=interval, fn=lambda: (
        lambda r: r if r.get("status", {}).get("phase") in wanted else None)(get_run(api, ns, run)))


def stage(run: dict, name: str) -> dict:
    """The named stage's status; {} until the operator has written it (it creates the Job first and
    patches status when its handler returns, so a poll can fall between the two)."""
    return next((s for s in (run.get("status") or {}).get("stages", []) if s["name"] == name), {})


def column_of(table: str, name: str) -> str:
    """One column of `kubectl get`'s first row, cut where the header puts it."""
    header, row = table.splitlines()[:2]
    start = header.index(name)
    end = min((header.index(h, start + 1) for h in header[start + len(name):].split()[:1]), default=len(row))
    return row[start:end].strip()


def jobs(api: client.ApiClient, ns: str) -> dict[str, str]:
    """Job name -> uid (a recreated Job has a new uid)."""
    return {j.metadata.name: j.metadata.uid for j in client.BatchV1Api(api).list_namespaced_job(ns).items}


def result_message(stage: str, **metrics) -> str:
    """A termination message as the trainer writes one."""
    return json.dumps({"method": stage, "stage": stage, "checkpoint": f"/workspace/x/tiny/{stage}/final",
                       "global_step": 42, **metrics})


def play_kubelet(api: client.ApiClient, ns: str, job: str, exit_code: int, message: str) -> None:
    """Finish the Job's pod as a kubelet would: terminated container with a termination message."""
    core = client.CoreV1Api(api)
    pod = wait_for(f"a pod of {job}", lambda: next(iter(core.list_namespaced_pod(
        ns, label_selector=f"batch.kubernetes.io/job-name={job}").items), None))
    ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    container = pod.spec.containers[0]
    core.patch_namespaced_pod_status(pod.metadata.name, ns, {"status": {
        "phase": "Succeeded" if exit_code == 0 else "Failed",
        "containerStatuses": [{
            "name": container.name, "image": container.image, "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                     "message": message, "startedAt": ts, "finishedAt": ts}}}]}})


def play_tiny_stages(api: client.ApiClient, ns: str) -> None:
    """The tiny run's sft, dpo and eval Jobs, each once the operator made it, played to success."""
    for job, stage in ((SFT, "sft"), (DPO, "dpo"), (EVAL, "eval")):
        wait_for(f"the {stage} Job", lambda: job in jobs(api, ns), timeout=60)
        play_kubelet(api, ns, job, 0, result_message(stage, train_loss=1.0))
