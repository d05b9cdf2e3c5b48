"""What the operator creates for a stage: Jobs, indexed Jobs + Service, PyTorchJobs, recipes."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from alignment_operator.api import parse_run
from alignment_operator.cli import main as alignctl
from alignment_operator.identity import child_name
from alignment_operator.render.failure import failure_kind
from alignment_operator.render.manifests import RenderContext, build_all, build_pvc, build_stage
from alignment_trainer.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]


def zephyr(**spec):
    doc = yaml.safe_load((ROOT / "examples" / "zephyr-run.yaml").read_text())
    doc["metadata"].update(namespace="ml", uid="uid-7")
    doc["spec"]["trainer"].update(hfTokenSecretRef={"name": "hf", "key": "token"}, nodeSelector={"pool": "h100"},
                                  priorityClassName="training")
    doc["spec"].update(spec)
    return parse_run(doc)


def job_of(objs, kind="Job"):
    return next(o for o in objs if o["kind"] == kind)


def test_single_node_job_is_restricted_gpu_job_with_recipe_and_volume():
    run = zephyr(queueName="team-a")
    objs = build_stage(run, 0, RenderContext(trainer_image="trainer:1"), "h1")
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job"]
    job = job_of(objs)
    meta, spec = job["metadata"], job["spec"]
    assert meta["name"] == child_name(run, "sft") and meta["name"].startswith("zephyr-7b-beta-sft-")
    assert meta["namespace"] == "ml"
    assert meta["labels"] == {"alignment.dev/run": "zephyr-7b-beta", "alignment.dev/stage": "sft",
                              "app.kubernetes.io/managed-by": "alignment-operator",
                              "kueue.x-k8s.io/queue-name": "team-a"}
    assert meta["ownerReferences"][0]["uid"] == "uid-7" and meta["ownerReferences"][0]["controller"] is True
    assert spec["backoffLimit"] == 2
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "trainer:1"
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 8, "memory": "512Gi"}
    assert c["command"][:3] == ["python", "-m", "alignment_trainer.launch"]
    assert "/opt/alignment/accelerate/zero3.yaml" in c["command"] and c["command"][-1] == "/etc/alignment/recipe.yaml"
    assert c["command"][c["command"].index("--num_processes") + 1] == "8"
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                    "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["restartPolicy"] == "Never"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "zephyr-7b-beta-workspace"}} in pod["volumes"]
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["priorityClassName"] == "training"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    token = next(e for e in c["env"] if e["name"] == "HF_TOKEN")
    assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}


def test_recipe_configmap_is_the_trainer_contract_and_chains_stages():
    run = zephyr()
    dpo_cm = build_stage(run, 1, RenderContext(), "h")[0]
    recipe = Recipe.model_validate(yaml.safe_load(dpo_cm["data"]["recipe.yaml"]))
    assert recipe.method == "dpo"
    assert recipe.model.model_name_or_path == "/workspace/ml/zephyr-7b-beta/uid-7/sft/final"
    assert recipe.ref_model == recipe.model.model_name_or_path
    assert (recipe.training.beta, recipe.training.learning_rate, recipe.training.max_prompt_length) == (0.01, 5e-7, 512)
    assert recipe.output_dir == "/workspace/ml/zephyr-7b-beta/uid-7/dpo"
    assert recipe.termination_message_path == "/dev/termination-log"
    assert recipe.datasets[0].path == "HuggingFaceH4/ultrafeedback_binarized"
    assert recipe.datasets[0].split == "train_prefs"
    ev = Recipe.model_validate(yaml.safe_load(build_stage(run, 2, RenderContext(), "h")[0]["data"]["recipe.yaml"]))
    assert ev.model.model_name_or_path.endswith("/dpo/final")
    assert ev.eval.reference_model.endswith("/sft/final"), "eval compares against what dpo started from"


def test_multi_node_without_pytorchjob_is_indexed_job_with_headless_service():
    run = zephyr()
    run.spec.stages[0].resources.nodes = 4
    objs = build_stage(run, 0, RenderContext(pytorchjob_available=False), "h")
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "Job"]
    svc, job = objs[1], objs[2]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{child_name(run, 'sft')}-0.{svc['metadata']['name']}"
    assert env["NNODES"]["value"] == "4"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    cmd = pod["containers"][0]["command"]
    assert cmd[cmd.index("--machine_rank") + 1] == "$(NODE_RANK)"
    assert cmd[cmd.index("--num_processes") + 1] == "32", "accelerate takes the total over all machines"


def test_multi_node_with_pytorchjob_crd_renders_master_and_workers():
    run = zephyr(suspend=True)
    run.spec.stages[0].resources.nodes = 2
    pj = job_of(build_stage(run, 0, RenderContext(pytorchjob_available=True), "h", suspend=True), "PyTorchJob")
    specs = pj["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    assert specs["Master"]["template"]["spec"]["containers"][0]["name"] == "pytorch"
    assert pj["spec"]["runPolicy"]["suspend"] is True
    cmd = specs["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--machine_rank") + 1] == "$(RANK)"


def test_cpu_stage_has_no_gpu_limit_and_volume_survives_the_run():
    run = parse_run(yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text()))
    job = job_of(build_stage(run, 0, RenderContext(), "h"))
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    cmd = c["command"]
    assert cmd[cmd.index("--mixed_precision") + 1] == "no" and {"name": "DS_ACCELERATOR", "value": "cpu"} in c["env"]
    pvc = build_pvc(run)
    assert "ownerReferences" not in pvc["metadata"], "checkpoints must outlive the run"


def test_names_stay_dns_labels():
    run = zephyr()
    run.metadata.name = "a" * 63
    name = child_name(run, "x" * 40, "-recipe")
    assert len(name) <= 63 and name != child_name(run, "x" * 39 + "y", "-recipe")


def test_alignctl_render_prints_every_object_and_no_secret(tmp_path, capsys):
    assert alignctl(["render", str(ROOT / "examples" / "zephyr-run.yaml"), "-n", "ml"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim"] + ["ConfigMap", "Job"] * 3
    assert all(d["metadata"]["namespace"] == "ml" for d in docs)
    objs = build_all(zephyr(), RenderContext())
    for obj in objs:
        for env in (obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])[0].get("env", [])):
            if env["name"] in ("HF_TOKEN", "JUDGE_API_KEY"):
                assert "value" not in env, "secrets only through secretKeyRef"


# ---------------------------------------------------------------- failure semantics (issue 13)

# What the Job controller writes on a podFailurePolicy match (kubernetes v1.37
# pkg/controller/job/pod_failure_policy.go), for the pods these Jobs run.
EXIT_2 = "Container trainer for pod ml/zephyr-7b-beta-sft-0-abcde failed with exit code 2 matching FailJob rule at index 0"
EVICTED = "Pod ml/zephyr-7b-beta-sft-0-abcde has condition DisruptionTarget matching FailJob rule at index 1"


def multi_node(nodes=2, **ctx):
    run = zephyr(queueName="team-a")
    run.spec.stages[0].resources.nodes = nodes
    run.spec.stages[0].backoff_limit = 3
    return run, build_stage(run, 0, RenderContext(**ctx), "h")


def test_single_node_job_fails_fast_on_exit_2_and_ignores_disruptions():
    job = job_of(build_stage(zephyr(), 0, RenderContext(), "h"))
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy Never"
    assert spec["podReplacementPolicy"] == "Failed", "a replacement starts only once the old pod is gone"
    assert spec["backoffLimit"] == 2
    fail, disruption = spec["podFailurePolicy"]["rules"]
    assert fail == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}}
    assert disruption == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    names = [c["name"] for c in spec["template"]["spec"]["containers"]]
    assert fail["onExitCodes"]["containerName"] in names, "the API server refuses a containerName not in the pod"


def test_indexed_multi_node_job_fails_as_a_group_for_the_operator_to_restart():
    _, objs = multi_node(4)
    spec = job_of(objs)["spec"]
    assert spec["completionMode"] == "Indexed" and spec["backoffLimit"] == 0, "one rank alone never restarts"
    assert spec["podReplacementPolicy"] == "Failed"
    assert [r["action"] for r in spec["podFailurePolicy"]["rules"]] == ["FailJob", "FailJob"]
    assert spec["podFailurePolicy"]["rules"][1]["onPodConditions"][0]["type"] == "DisruptionTarget"


def test_failure_kind_reads_the_job_controllers_messages():
    assert failure_kind("PodFailurePolicy", EXIT_2) == "input"
    assert failure_kind("PodFailurePolicy", EVICTED) == "disruption"
    assert failure_kind("BackoffLimitExceeded", "Job has reached the specified backoff limit") == "failure"
    assert failure_kind("PodFailurePolicy", EXIT_2.replace("exit code 2", "exit code 137")) == "failure"
    assert failure_kind(None, None) == "failure"


def test_multi_node_with_jobset_crd_renders_a_jobset_that_restarts_every_rank():
    run, objs = multi_node(4, jobset_available=True, pytorchjob_available=True)
    assert [o["kind"] for o in objs] == ["ConfigMap", "JobSet"], "JobSet first, no Service of our own"
    js = objs[1]
    assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    name = js["metadata"]["name"]
    assert name == child_name(run, "sft", limit=63 - 16) and js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    # Its Jobs carry the run's labels: the operator's Job watch selects on them, and the ranks' pods
    # (their controller is such a Job) reach the stage only through them (the result is rank 0's).
    (replicated,) = js["spec"]["replicatedJobs"]
    assert replicated["template"]["metadata"]["labels"] == js["metadata"]["labels"]
    policy = js["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 3, "other failures count up to the stage's backoffLimit"
    actions = [(r["action"], r.get("onJobFailureReasons")) for r in policy["rules"]]
    assert actions == [("RestartJobSetAndIgnoreMaxRestarts", ["PodFailurePolicy"]),
                       ("FailJobSet", ["PodFailurePolicy"]), ("RestartJobSet", None)]
    # The first rule whose reason and message pattern match acts (JobSet's failure_policy.go).
    def action(message):
        return next(r["action"] for r in policy["rules"]
                    if not r.get("onJobFailureMessagePatterns")
                    or any(re.search(p, message) for p in r["onJobFailureMessagePatterns"]))
    assert action(EVICTED) == "RestartJobSetAndIgnoreMaxRestarts"
    assert action(EXIT_2) == "FailJobSet"
    (rjob,) = js["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert rjob["replicas"] == 1 and job["completionMode"] == "Indexed" and job["completions"] == 4
    assert job["backoffLimit"] == 0 and job["podReplacementPolicy"] == "Failed"
    assert [r["action"] for r in job["podFailurePolicy"]["rules"]] == ["FailJob", "FailJob"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{name}-node-0-0.{name}", "JobSet's pod hostname in its subdomain"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert js["spec"]["network"]["enableDNSHostnames"] is True


def test_jobset_names_leave_room_for_jobsets_pod_names():
    run, _ = multi_node(12, jobset_available=True)
    run.metadata.name = "r" * 63
    js = job_of(build_stage(run, 0, RenderContext(jobset_available=True), "h"), "JobSet")
    longest_pod = f"{js['metadata']['name']}-node-0-11-abcde"  # JobSet's own webhook check
    assert len(longest_pod) <= 63, longest_pod
    assert js["metadata"]["name"] != child_name(run, "other", limit=63 - 16)


def test_pytorchjob_is_used_without_jobset():
    _, objs = multi_node(2, pytorchjob_available=True)
    assert [o["kind"] for o in objs] == ["ConfigMap", "PyTorchJob"]


def test_a_variable_the_run_sets_replaces_the_operators_own_once_in_every_kind_of_child():
    """trainer.env OMP_NUM_THREADS, HF_HOME: the run's value, one entry. JobSet's webhook refuses a pod
    template naming a variable twice (a live node's JobSet run failed ChildRefused on it)."""
    own = [{"name": "OMP_NUM_THREADS", "value": "1"}, {"name": "HF_HOME", "value": "/cache/hf"},
           {"name": "MY_FLAG", "value": "on"}]

    def containers(run, nodes, **ctx):
        run.spec.stages[0].resources.nodes = nodes
        run.spec.stages[0].resources.cpu = 16
        objs = build_stage(run, 0, RenderContext(**ctx), "h")
        child = next(o for o in objs if o["kind"] != "ConfigMap")
        pods = [child["spec"]["template"]] if child["kind"] == "Job" else (
            [r["template"]["spec"]["template"] for r in child["spec"]["replicatedJobs"]] if child["kind"] == "JobSet"
            else [r["template"] for r in child["spec"]["pytorchReplicaSpecs"].values()])
        return child["kind"], [c for p in pods for c in p["spec"]["containers"]]

    kinds = set()
    for nodes, ctx in ((1, {}), (2, {"jobset_available": True}), (2, {"pytorchjob_available": True})):
        _, plain = containers(zephyr(), nodes, **ctx)
        before = {e["name"]: e.get("value") for e in plain[0]["env"]}
        assert before["OMP_NUM_THREADS"] not in (None, "1") and before["HF_HOME"] != "/cache/hf", before
        run = zephyr()
        run.spec.trainer.env = own
        kind, rendered = containers(run, nodes, **ctx)
        kinds.add(kind)
        for container in rendered:
            names = [e["name"] for e in container["env"]]
            assert len(names) == len(set(names)), (kind, sorted(n for n in names if names.count(n) > 1))
            env = {e["name"]: e for e in container["env"]}
            assert (env["OMP_NUM_THREADS"]["value"], env["HF_HOME"]["value"], env["MY_FLAG"]["value"]) == (
                "1", "/cache/hf", "on"), kind
            assert "HF_TOKEN" in env and (kind != "JobSet" or "MASTER_ADDR" in env), kind  # the rest kept
    assert kinds == {"Job", "JobSet", "PyTorchJob"}
