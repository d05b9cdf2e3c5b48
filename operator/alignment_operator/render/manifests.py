"""(run, stage) -> the Kubernetes objects that run it. Pure: plain dicts in, plain dicts out.

One node: a batch/v1 Job running `accelerate launch`. Several nodes: a JobSet when that CRD is
installed, else a Kubeflow PyTorchJob when that one is, else an Indexed Job plus a headless
Service for rendezvous (MASTER_ADDR = pod 0, NODE_RANK = the completion index). Every pod meets
the restricted Pod Security level, mounts the run's volume, the stage's recipe and a
memory-backed /dev/shm, and gets the HF token only through a secretKeyRef.

Failure semantics: render/failure.py (the failure policies every stage's Job or JobSet carries, and
what a Failed condition under them means).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignment_trainer.launch import build_launch_command, cpu_quantity, launch_env, threads_per_process

from ..api import AlignmentRun, StageSpec
from ..identity import ANNOTATION_HASH, child_name, labels, owner_reference, stage_hash, workspace_claim
from ..progress import audience, status_path
from .failure import job_failure_fields, jobset_failure_policy
from .recipe import JUDGE_API_KEY_ENV, build_recipe, reward_judges

RECIPE_DIR = "/etc/alignment"
PROGRESS_DIR = "/var/run/alignment/progress"  # the stage's progress token and the endpoint's CA
PROGRESS_TOKEN_SECONDS = 3600  # the kubelet renews the projected token before it expires
TERMINATION_LOG = "/dev/termination-log"
RENDEZVOUS_PORT = 29500
JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
JOBSET_REPLICATED_JOB = "node"  # pods are <jobset>-node-0-<rank>, reachable as such in the JobSet's subdomain
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@dataclass(frozen=True)
class RenderContext:
    """What the operator knows that the run does not say (Helm values, the cluster's CRDs)."""

    trainer_image: str = "ghcr.io/alignment-operator/trainer:0.1.0"
    accelerate_config_dir: str = "/opt/alignment/accelerate"  # where the trainer image keeps them
    pytorchjob_available: bool = False
    jobset_available: bool = False  # jobsets.jobset.x-k8s.io installed: multi-node stages render a JobSet
    run_as_user: int = 1000
    progress_url: str = ""  # the operator's progress endpoint (progress_server); "": pods push nothing
    progress_ca: str = ""   # PEM of the CA its certificate chains to


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


def build_recipe_configmap(run: AlignmentRun, index: int, ctx: RenderContext | None = None) -> dict[str, Any]:
    stage = run.spec.stages[index]
    recipe = build_recipe(run, index, run.spec.storage.mount_path, termination_message_path=TERMINATION_LOG)
    data = {"recipe.yaml": recipe.dump()}
    if ctx is not None and ctx.progress_url and ctx.progress_ca:
        data["progress-ca.crt"] = ctx.progress_ca
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(run, child_name(run, stage.name, "-recipe"), stage.name), "data": data}


def _progress(run: AlignmentRun, stage: StageSpec, ctx: RenderContext) -> tuple[list, list, list]:
    """(env, volume mounts, volumes) that let the trainer push live progress (progress.py):
    Kubeflow Trainer's KUBEFLOW_TRAINER_SERVER_* variables, a projected service-account token whose
    audience names this namespace and stage (no long-lived secret; the pod still mounts no API
    token), and the endpoint's CA from the stage's ConfigMap."""
    if not ctx.progress_url:
        return [], [], []
    ns, name = run.metadata.namespace or "default", child_name(run, stage.name)
    env = [{"name": "KUBEFLOW_TRAINER_SERVER_URL", "value": ctx.progress_url.rstrip("/") + status_path(ns, name)},
           {"name": "KUBEFLOW_TRAINER_SERVER_TOKEN", "value": f"{PROGRESS_DIR}/token"}]
    sources: list[dict[str, Any]] = [{"serviceAccountToken": {
        "audience": audience(ns, name), "expirationSeconds": PROGRESS_TOKEN_SECONDS, "path": "token"}}]
    if ctx.progress_ca:
        env.append({"name": "KUBEFLOW_TRAINER_SERVER_CA_CERT", "value": f"{PROGRESS_DIR}/ca.crt"})
        sources.append({"configMap": {"name": child_name(run, stage.name, "-recipe"),
                                      "items": [{"key": "progress-ca.crt", "path": "ca.crt"}]}})
    mounts = [{"name": "progress", "mountPath": PROGRESS_DIR, "readOnly": True}]
    return env, mounts, [{"name": "progress", "projected": {"sources": sources}}]


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
    # CPU threads: the pod's CPU (request and limit) divided by its processes; without one the
    # trainer bounds itself by its cgroup's quota at start (alignment_trainer.launch.bound_threads).
    cpus = cpu_quantity(stage.resources.cpu)
    threads = threads_per_process(_processes(stage), cpus) if cpus else None
    env = [{"name": k, "value": v}
           for k, v in launch_env(cpu=stage.resources.gpus_per_node == 0, threads=threads,
                                  world_size=stage.resources.nodes * _processes(stage)).items()]
    env += [{"name": "HF_HOME", "value": f"{mount}/.cache/huggingface"},  # models downloaded once per volume
            {"name": "HOME", "value": "/tmp"}]
    token = run.spec.trainer.hf_token_secret_ref
    if token is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    judge = stage.eval.judge if stage.eval else None
    if judge is not None:
        ref = judge.api_key_secret_ref
        env.append({"name": JUDGE_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    for name, reward_judge in reward_judges(stage):
        ref = reward_judge.api_key_secret_ref
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    env += _tracking_env(stage.tracking or run.spec.tracking)
    env += object_store_env(run)
    return env


def object_store_env(run: AlignmentRun) -> list[dict[str, Any]]:
    """spec.objectStore's key pair, each only through a secretKeyRef (unset: the service account's identity)."""
    store = run.spec.object_store
    if store is None or not store.credentials_secret_name:
        return []
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": store.credentials_secret_name, "key": key}}}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]


def _tracking_env(tracking) -> list[dict[str, Any]]:
    """Tracker credentials, each only through a secretKeyRef (MLflow's keys optional: basic auth or token)."""
    env = []
    if tracking.wandb is not None and tracking.wandb.api_key_secret_ref is not None:
        ref = tracking.wandb.api_key_secret_ref
        env.append({"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if tracking.mlflow is not None and tracking.mlflow.credentials_secret_name:
        name = tracking.mlflow.credentials_secret_name
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": name, "key": key, "optional": True}}}
                for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password"),
                                 ("MLFLOW_TRACKING_TOKEN", "token"))]
    return env


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


def _with_own_env(env: list[dict[str, Any]], own: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operator's variables, then the run's own (trainer.env); a name both set gets the run's
    value, once: the kubelet would keep the last of two, but JobSet's webhook refuses a template that
    names a variable twice (and the API server warns on a Job's)."""
    names = {e["name"] for e in own}
    return [e for e in env if e["name"] not in names] + [dict(e) for e in own]


def build_pod_template(run: AlignmentRun, index: int, ctx: RenderContext, command: list[str],
                       extra_env: list[dict[str, Any]] = (), container_name: str = "trainer") -> dict[str, Any]:
    stage = run.spec.stages[index]
    t = run.spec.trainer
    progress_env, progress_mounts, progress_volumes = _progress(run, stage, ctx)
    container = {
        "name": container_name,
        "image": t.image or ctx.trainer_image,
        "imagePullPolicy": t.image_pull_policy,
        "command": command,
        "env": _with_own_env([*extra_env, *progress_env, *_env(run, stage)], t.env),
        "resources": _resources(stage),
        "volumeMounts": [
            {"name": "workspace", "mountPath": run.spec.storage.mount_path},
            {"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *progress_mounts,
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
        "automountServiceAccountToken": False,  # the trainer never talks to the API server (its progress token
                                                # is a projected one only the operator accepts)
        "securityContext": {"runAsNonRoot": True, "runAsUser": ctx.run_as_user, "runAsGroup": ctx.run_as_user,
                            "fsGroup": ctx.run_as_user, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim(run)}},
            {"name": "recipe", "configMap": {"name": child_name(run, stage.name, "-recipe")}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(stage.resources.shared_memory)}},
            *progress_volumes,
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


# ---------------------------------------------------------------------------- stages

def _rendezvous_env(master: str, nodes: int) -> list[dict[str, Any]]:
    return [{"name": "MASTER_ADDR", "value": master}, {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
            {"name": "NNODES", "value": str(nodes)},
            {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}]


def _jobset(run: AlignmentRun, index: int, ctx: RenderContext, meta: dict[str, Any],
            suspend: bool) -> dict[str, Any]:
    """A JobSet of one Indexed Job (a pod per node); JobSet's headless Service names the pods."""
    stage = run.spec.stages[index]
    nodes = stage.resources.nodes
    # JobSet refuses names whose pods (<jobset>-node-0-<rank>-xxxxx) would pass 63 characters.
    meta = {**meta, "name": child_name(run, stage.name, limit=63 - len(f"-{JOBSET_REPLICATED_JOB}-0--xxxxx")
                                       - len(str(nodes - 1)))}
    name = meta["name"]
    master = f"{name}-{JOBSET_REPLICATED_JOB}-0-0.{name}"
    template = build_pod_template(run, index, ctx, _command(stage, ctx, "$(NODE_RANK)", master),
                                  _rendezvous_env(master, nodes))
    job = {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
           **job_failure_fields("trainer", 0, "FailJob"), "template": template}
    return {"apiVersion": JOBSET_API_VERSION, "kind": "JobSet", "metadata": meta, "spec": {
        "suspend": suspend,
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "failurePolicy": jobset_failure_policy(stage.backoff_limit),
        # The run's labels on the JobSet's Jobs too: the operator watches Jobs by its run label, and a
        # stage's pods (whose controller is such a Job) are the JobSet's only through them.
        "replicatedJobs": [{"name": JOBSET_REPLICATED_JOB, "replicas": 1,
                            "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": job}}]}}


def build_stage(run: AlignmentRun, index: int, ctx: RenderContext, stage_hash: str,
                suspend: bool = False) -> list[dict[str, Any]]:
    """Every object a stage needs, in creation order: ConfigMap, (Service), Job, JobSet or PyTorchJob."""
    stage = run.spec.stages[index]
    name = child_name(run, stage.name)
    objects = [build_recipe_configmap(run, index, ctx)]
    meta = _meta(run, name, stage.name, **{ANNOTATION_HASH: stage_hash})
    nodes = stage.resources.nodes
    if nodes > 1 and ctx.jobset_available:
        objects.append(_jobset(run, index, ctx, meta, suspend))
        return objects
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
    if nodes == 1:
        template = build_pod_template(run, index, ctx, _command(stage, ctx, "0", None))
        job_spec: dict[str, Any] = job_failure_fields("trainer", stage.backoff_limit, "Ignore")
    else:
        service = child_name(run, stage.name, "-rdzv")
        master = f"{name}-0.{service}"
        template = build_pod_template(run, index, ctx, _command(stage, ctx, "$(NODE_RANK)", master),
                                      _rendezvous_env(master, nodes))
        template["spec"]["subdomain"] = service
        # Any rank's failure fails the Job; the operator restarts the group (see the module doc).
        job_spec = {**job_failure_fields("trainer", 0, "FailJob"),
                    "completionMode": "Indexed", "completions": nodes, "parallelism": nodes}
        objects.append({"apiVersion": "v1", "kind": "Service", "metadata": _meta(run, service, stage.name), "spec": {
            "clusterIP": "None", "publishNotReadyAddresses": True,
            "selector": {"batch.kubernetes.io/job-name": name},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}]}})
    job_spec["suspend"] = suspend
    job_spec["template"] = template
    objects.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec})
    return objects


def build_all(run: AlignmentRun, ctx: RenderContext) -> list[dict[str, Any]]:
    """What `alignctl render` prints: the volume and every stage's objects, as the operator creates them."""
    pvc = build_pvc(run)
    out = [pvc] if pvc else []
    for i in range(len(run.spec.stages)):
        out += build_stage(run, i, ctx, stage_hash(run, i), suspend=run.spec.suspend or bool(run.spec.queue_name))
    return out
