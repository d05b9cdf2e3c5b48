"""Playing the kubelet: the control plane has none, so tests finish pods themselves."""

from __future__ import annotations

from datetime import datetime, timezone

from kubernetes import client

from controlplane import wait_for

__all__ = ["play_kubelet", "wait_for"]


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
