"""promote.serve -> a KServe InferenceService for the promoted model. Pure (no I/O).

The Hugging Face runtime (modelFormat huggingface) reads the promoted stage's final/ from the run's
volume (storageUri pvc://<claim>/<path under the mount>); with GPUs its vLLM backend, without its
huggingface backend. Named after the run, labelled and owned by it (controller ownerReference): the
garbage collector deletes it with the run. Checked against KServe's own CRD in the tests (built from
its module by tools/k8s/build.sh).
"""

from __future__ import annotations

import posixpath
from typing import Any

from ..api import AlignmentRun
from ..identity import labels, owner_reference, workspace_claim

KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")


def inference_service(run: AlignmentRun, model: str) -> dict[str, Any]:
    serve = run.spec.promote.serve
    mount = run.spec.storage.mount_path.rstrip("/")
    path = posixpath.relpath(model, mount) if model.startswith(mount + "/") else model.lstrip("/")
    resources: dict[str, Any] = {}
    for key, value in (("cpu", serve.cpu), ("memory", serve.memory)):
        if value is not None:
            resources.setdefault("requests", {})[key] = str(value)
            resources.setdefault("limits", {})[key] = str(value)
    if serve.gpus:
        resources.setdefault("limits", {})[serve.gpu_resource] = str(serve.gpus)
        resources.setdefault("requests", {})[serve.gpu_resource] = str(serve.gpus)
    model_spec: dict[str, Any] = {
        "modelFormat": {"name": "huggingface"},
        "storageUri": f"pvc://{workspace_claim(run)}/{path}",
        "args": [f"--model_name={run.metadata.name}", f"--backend={'vllm' if serve.gpus else 'huggingface'}"],
    }
    if resources:
        model_spec["resources"] = resources
    return {
        "apiVersion": f"{KSERVE[0]}/{KSERVE[1]}", "kind": "InferenceService",
        "metadata": {"name": run.metadata.name, "namespace": run.metadata.namespace or "default",
                     "labels": labels(run), "ownerReferences": [owner_reference(run)]},
        "spec": {"predictor": {"model": model_spec}},
    }
