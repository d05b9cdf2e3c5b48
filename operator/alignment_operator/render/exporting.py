"""promote.exports on a cluster: the Job that writes the promoted model to object storage. Pure (no I/O).

One Job per promoted model, owned by the run, running the trainer image's own export tool
(`python -m alignment_trainer.export SPEC`: write, verify, then mark complete, retrying a store that
stops answering; an hf:// export pushes to the Hub in one commit) with the run's volume mounted,
spec.objectStore's key pair through secretKeyRef (or the service account's identity) and, for the
Hub, trainer.hfTokenSecretRef's token. Its result (each URI, digest, bytes, time) comes back as its
pod's termination message; the cluster shell puts it in status.promotion.exports.
Its stage label, promote.export, is no DNS label, so it is never a stage's name.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from ..api import AlignmentRun
from ..identity import LABEL_STAGE, child_name, labels, owner_reference, workspace_claim
from .manifests import TERMINATION_LOG, RenderContext, object_store_env
from .recipe import stage_dir

EXPORT_STAGE = "promote.export"


def export_job_name(run: AlignmentRun) -> str:
    return child_name(run, "promote", "-export")


def export_spec(run: AlignmentRun, model: str, uris: list[str], evaluated_dir: str | None) -> dict[str, Any]:
    """What the export tool reads (both shells): the model, the `uris` to write (hf:// ones with their
    `private`), the store, and the card: the one in `evaluated_dir` (the directory of the eval entry that
    chose the model: its README.md has the results), listing every promote.exports URI."""
    store = run.spec.object_store
    exports = run.spec.promote.exports if run.spec.promote else []
    private = {x.uri: x.private for x in exports}
    card = posixpath.join(evaluated_dir, "README.md") if evaluated_dir else None
    return {"model": model,
            "exports": [{"uri": u, **({"private": private.get(u, True)} if u.startswith("hf://") else {})}
                        for u in uris],
            "object_store": {"endpoint_url": store.endpoint_url, "region": store.region} if store else {},
            "card": {"from": card, "uris": [x.uri for x in exports] or uris}}


def export_job(run: AlignmentRun, model: str, uris: list[str], ctx: RenderContext,
               evaluated_by: str | None = None) -> dict[str, Any]:
    """`evaluated_by`: the eval stage (entry) that chose the model; its card (README.md, with the results)
    is the one exported, listing every promote.exports URI."""
    evaluated_dir = stage_dir(run.spec.storage.mount_path, run, evaluated_by) if evaluated_by else None
    spec = {**export_spec(run, model, uris, evaluated_dir), "termination_message_path": TERMINATION_LOG}
    t = run.spec.trainer
    token = t.hf_token_secret_ref if any(u.startswith("hf://") for u in uris) else None
    container = {
        "name": "export", "image": t.image or ctx.trainer_image, "imagePullPolicy": t.image_pull_policy,
        "command": ["python", "-m", "alignment_trainer.export", json.dumps(spec)],
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"}, *object_store_env(run),
                *([{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}}]
                  if token else [])],
        "volumeMounts": [{"name": "workspace", "mountPath": run.spec.storage.mount_path, "readOnly": True}],
        "terminationMessagePath": TERMINATION_LOG, "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never", "automountServiceAccountToken": False, "containers": [container],
        "securityContext": {"runAsNonRoot": True, "runAsUser": ctx.run_as_user, "runAsGroup": ctx.run_as_user,
                            "fsGroup": ctx.run_as_user, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim(run)}}],
    }
    for key, value in (("serviceAccountName", t.service_account_name), ("priorityClassName", t.priority_class_name)):
        if value:
            pod[key] = value
    meta_labels = {**labels(run), LABEL_STAGE: EXPORT_STAGE}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": export_job_name(run), "namespace": run.metadata.namespace or "default",
                         "labels": meta_labels, "ownerReferences": [owner_reference(run)]},
            "spec": {"backoffLimit": 2, "template": {"metadata": {"labels": meta_labels}, "spec": pod}}}
