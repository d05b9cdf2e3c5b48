"""(run, stage) -> the Kubernetes objects that run it. Pure: plain dicts in, plain dicts out.

One node: a batch/v1 Job running `accelerate launch`. Several nodes: a Kubeflow PyTorchJob
when that CRD is installed, else an Indexed Job plus a headless Service for rendezvous
(MASTER_ADDR = pod 0, NODE_RANK = the completion index). Every pod meets the restricted Pod
Security level, mounts the run's volume, the stage's recipe and a memory-backed /dev/shm, and
gets the HF token only through a secretKeyRef.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from alignment_trainer.launch import build_launch_command, launch_env

from ..api import AlignmentRun, StageSpec
from .recipe import JUDGE_API_KEY_ENV, build_recipe

RECIPE_DIR = "/etc/alignment"
TERMINATION_LOG = "/dev/termination-log"
RENDEZVOUS_PORT = 29500
MANAGED_BY = "alignment-operator"
LABEL_RUN = "alignment.dev/run"
LABEL_STAGE = "alignment.dev/stage"
ANNOTATION_HASH = "alignment.dev/stage-hash"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"


@dataclass(frozen=True)
class RenderContext:
    """What the operator knows that the run does not say (Helm values, the cluster's CRDs)."""

    trainer_image: str = "ghcr.io/alignment-operator/trainer:0.1.0"
    accelerate_config_dir: str = "/opt/alignment/accelerate"  # where the trainer image keeps them
    pytorchjob_available: bool = False
    run_as_user: int = 1000


def child_name(run: AlignmentRun, stage: str, suffix: str = "") -> str:
    """<run>-<stage>[-suffix], shortened with a hash to stay a 63-character DNS label."""
    name = f"{run.metadata.name}-{stage}{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def workspace_claim(run: AlignmentRun) -> str:
    return run.spec.storage.claim_name or f"{run.metadata.name}-workspace"


def labels(run: AlignmentRun, stage: str | None = None) -> dict[str, str]:
    out = {LABEL_RUN: run.metadata.name, "app.kubernetes.io/managed-by": MANAGED_BY}
    if stage is not None:
        out[LABEL_STAGE] = stage
    if run.spec.queue_name:
        out[KUEUE_QUEUE] = run.spec.queue_name
    return out


def owner_reference(run: AlignmentRun) -> dict[str, Any]:
    return {"apiVersion": run.api_version, "kind": run.kind, "name": run.metadata.name,
            "uid": (run.metadata.model_extra or {}).get("uid", ""), "controller": True,
            "blockOwnerDeletion": True}


def _meta(run: AlignmentRun, name: str, stage: str | None, owned: bool = True, **annotations: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": run.metadata.namespace or "default",
                            "labels": labels(run, stage)}
    if owned and (run.metadata.model_extra or {}).get("uid"):  # `alignctl render` has no uid to point at
        meta["ownerReferences"] = [owner_reference(run)]
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def build_pvc(run: AlignmentRun) -> dict[str, Any] | None:
    """The run's volume, when it asks for one. Not owned by the run: checkpoints outlive it."""
    tpl = run.spec.storage.volume_claim_template
    if tpl is None:
        return None
    spec: dict[str, Any] = {"accessModes": list(tpl.access_modes), "resources": {"requests": {"storage": str(tpl.size)}}}
    if tpl.storage_class_name:
        spec["storageClassName"] = tpl.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _meta(run, workspace_claim(run), None, owned=False), "spec": spec}


def build_recipe_configmap(run: AlignmentRun, index: int) -> dict[str, Any]:
    stage = run.spec.stages[index]
    recipe = build_recipe(run, index, run.spec.storage.mount_path, termination_message_path=TERMINATION_LOG)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(run, child_name(run, stage.name, "-recipe"), stage.name),
            "data": {"recipe.yaml": recipe.dump()}}


def _processes(stage: StageSpec) -> int:
    r = stage.resources
    return r.processes_per_node or r.gpus_per_node or 1


def _command(stage: StageSpec, ctx: RenderContext, machine_rank: str, master: str | None) -> list[str]:
    r = stage.resources
    return build_launch_command(f"{RECIPE_DIR}/recipe.yaml", stage.distributed, _processes(stage),
                                num_machines=r.nodes, machine_rank=machine_rank,
                                main_process_ip=master, main_process_port=RENDEZVOUS_PORT if master else None,
                                cpu=r.gpus_per_node == 0, config_dir=ctx.accelerate_config_dir)


def _env(run: AlignmentRun, stage: StageSpec) -> list[dict[str, Any]]:
    mount = run.spec.storage.mount_path
    env = [{"name": k, "value": v} for k, v in launch_env(cpu=stage.resources.gpus_per_node == 0).items()]
    env += [{"name": "HF_HOME", "value": f"{mount}/.cache/huggingface"},  # models downloaded once per volume
            {"name": "HOME", "value": "/tmp"}]
    token = run.spec.trainer.hf_token_secret_ref
    if token is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    judge = stage.eval.judge if stage.eval else None
    if judge is not None:
        ref = judge.api_key_secret_ref
        env.append({"name": JUDGE_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env + [dict(e) for e in run.spec.trainer.env]


def _resources(stage: StageSpec) -> dict[str, Any]:
    r = stage.resources
    limits: dict[str, Any] = {}
    if r.gpus_per_node:
        limits[r.gpu_resource] = r.gpus_per_node
    if r.cpu is not None:
        limits["cpu"] = str(r.cpu)
    if r.memory is not None:
        limits["memory"] = str(r.memory)
    return {"limits": limits, "requests": dict(limits)} if limits else {}


def build_pod_template(run: AlignmentRun, index: int, ctx: RenderContext, command: list[str],
                       extra_env: list[dict[str, Any]] = (), container_name: str = "trainer") -> dict[str, Any]:
    stage = run.spec.stages[index]
    t = run.spec.trainer
    container = {
        "name": container_name,
        "image": t.image or ctx.trainer_image,
        "imagePullPolicy": t.image_pull_policy,
        "command": command,
        "env": [*extra_env, *_env(run, stage)],
        "resources": _resources(stage),
        "volumeMounts": [
            {"name": "workspace", "mountPath": run.spec.storage.mount_path},
            {"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if t.env_from:
        container["envFrom"] = [dict(e) for e in t.env_from]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the trainer never talks to the API server
        "securityContext": {"runAsNonRoot": True, "runAsUser": ctx.run_as_user, "runAsGroup": ctx.run_as_user,
                            "fsGroup": ctx.run_as_user, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim(run)}},
            {"name": "recipe", "configMap": {"name": child_name(run, stage.name, "-recipe")}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(stage.resources.shared_memory)}},
        ],
    }
    for key, value in (("serviceAccountName", t.service_account_name), ("priorityClassName", t.priority_class_name),
                       ("affinity", t.affinity)):
        if value:
            pod[key] = value
    if t.node_selector:
        pod["nodeSelector"] = dict(t.node_selector)
    if t.tolerations:
        pod["tolerations"] = [dict(x) for x in t.tolerations]
    return {"metadata": {"labels": labels(run, stage.name)}, "spec": pod}


def build_stage(run: AlignmentRun, index: int, ctx: RenderContext, stage_hash: str,
                suspend: bool = False) -> list[dict[str, Any]]:
    """Every object a stage needs, in creation order: ConfigMap, (Service), Job or PyTorchJob."""
    stage = run.spec.stages[index]
    name = child_name(run, stage.name)
    objects = [build_recipe_configmap(run, index)]
    meta = _meta(run, name, stage.name, **{ANNOTATION_HASH: stage_hash})
    nodes = stage.resources.nodes
    if nodes > 1 and ctx.pytorchjob_available:
        # The training operator injects MASTER_ADDR, MASTER_PORT and RANK (the node's rank).
        cmd = _command(stage, ctx, "$(RANK)", "$(MASTER_ADDR)")
        template = build_pod_template(run, index, ctx, cmd, container_name="pytorch")
        replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
        if nodes > 1:
            replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "Never", "template": template}
        objects.append({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": meta, "spec": {
            "runPolicy": {"backoffLimit": stage.backoff_limit, "suspend": suspend, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas}})
        return objects
    job_spec: dict[str, Any] = {"backoffLimit": stage.backoff_limit, "suspend": suspend}
    if nodes == 1:
        template = build_pod_template(run, index, ctx, _command(stage, ctx, "0", None))
    else:
        service = child_name(run, stage.name, "-rdzv")
        master = f"{name}-0.{service}"
        rendezvous = [{"name": "MASTER_ADDR", "value": master}, {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
                      {"name": "NNODES", "value": str(nodes)},
                      {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
                          "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]
        template = build_pod_template(run, index, ctx, _command(stage, ctx, "$(NODE_RANK)", master), rendezvous)
        template["spec"]["subdomain"] = service
        job_spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
        objects.append({"apiVersion": "v1", "kind": "Service", "metadata": _meta(run, service, stage.name), "spec": {
            "clusterIP": "None", "publishNotReadyAddresses": True,
            "selector": {"batch.kubernetes.io/job-name": name},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}]}})
    job_spec["template"] = template
    objects.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec})
    return objects


def build_all(run: AlignmentRun, ctx: RenderContext) -> list[dict[str, Any]]:
    """What `alignctl render` prints: the volume and every stage's objects, as the operator creates them."""
    from ..reconcile import stage_hash

    pvc = build_pvc(run)
    out = [pvc] if pvc else []
    for i in range(len(run.spec.stages)):
        out += build_stage(run, i, ctx, stage_hash(run, i), suspend=run.spec.suspend or bool(run.spec.queue_name))
    return out
