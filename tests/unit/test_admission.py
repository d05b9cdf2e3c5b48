"""Admission: what the API server or the kubelet would refuse only when a stage's pods are
created is refused when the run is, by `alignctl validate` here and by the CRD's schema and CEL
rules (tests/cluster/test_crd_server.py applies the same manifests to a real API server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alignment_operator.api import RunInvalid, parse_run
from alignment_operator.api import admission, corev1
from alignment_operator.cli import main as alignctl
from alignment_operator.crd import build_crd
from alignment_operator.render.manifests import RenderContext, build_stage

ROOT = Path(__file__).resolve().parents[2]
GOOD = ROOT / "tests/manifests/good/pod-settings.yaml"


def good() -> dict:
    return yaml.safe_load(GOOD.read_text())


def refusal(doc: dict) -> str:
    with pytest.raises(RunInvalid) as err:
        parse_run(doc)
    return str(err.value)


def with_trainer(**trainer) -> dict:
    doc = good()
    doc["spec"]["trainer"] = {**doc["spec"]["trainer"], **trainer}
    return doc


def test_every_core_v1_shape_the_pods_take_is_accepted_when_valid():
    run = parse_run(good())
    pod = build_stage(run, 0, RenderContext(), "h")[-1]["spec"]["template"]["spec"]
    assert pod["affinity"] == good()["spec"]["trainer"]["affinity"], "passed through unchanged"
    assert len(pod["tolerations"]) == 3


def test_secret_looking_plain_values_are_refused_without_echoing_them(capsys):
    for name in ("HF_TOKEN", "OPENAI_API_KEY", "WANDB_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
                 "DB_PASSWORD", "client_secret"):
        msg = refusal(with_trainer(env=[{"name": name, "value": "s3cr3t-value"}]))
        assert "spec.trainer.env[0].value: looks like a secret" in msg and "valueFrom.secretKeyRef" in msg, name
        assert "s3cr3t-value" not in msg, f"{name}: the refusal must not print the secret"
    bad = ROOT / "tests/manifests/bad/env-hf-token-plain-value.yaml"
    assert alignctl(["validate", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "hf_abcdefghijklmnop" not in out + err
    # Not secrets: an empty value, a valueFrom, names that merely contain the words.
    for env in ({"name": "HF_TOKEN", "value": ""}, {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
                {"name": "MAX_TOKENS", "value": "512"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}):
        parse_run(with_trainer(env=[env]))


@pytest.mark.parametrize("path,ok", [
    ("/workspace", True), ("/mnt/ckpt/run-1", True), ("/etc/alignment-data", True), ("/dev/shm2", True),
    ("workspace", False), ("/", False), ("/workspace/", False), ("/a/../etc", False), ("/a/./b", False),
    ("/etc", False), ("/etc/alignment", False), ("/etc/alignment/x", False), ("/dev", False),
    ("/dev/shm", False), ("/dev/shm/data", False), ("/dev/termination-log", False),
    ("/var/run/alignment/progress", False), ("/var/run", False), ("/opt/alignment", False),
    ("/opt/alignment/accelerate/zero3", False), ("/opt/models", True), ("/var/run/alignment-data", True),
])
def test_mount_path_is_absolute_and_clear_of_the_pods_own_mounts(path, ok):
    doc = good()
    doc["spec"]["storage"]["mountPath"] = path
    if ok:
        parse_run(doc)
    else:
        assert f"spec.storage.mountPath: {path!r}" in refusal(doc)


def test_reserved_mounts_are_the_renderers_own():
    ctx = RenderContext(progress_url="https://operator:8443", progress_ca="PEM")  # the progress token mounted too
    pod = build_stage(parse_run(good()), 0, ctx, "h")[-1]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["mountPath"] for m in container["volumeMounts"]} - {"/mnt/checkpoints"}
    assert mounts | {container["terminationMessagePath"], ctx.accelerate_config_dir} == set(admission.RESERVED_MOUNTS)


@pytest.mark.parametrize("image,ok", [
    ("trainer", True), ("trainer:0.1", True), ("ghcr.io/alignment-operator/trainer:0.1.0", True),
    ("localhost:5000/a/b__c/d-e.f:v1_2", True), ("[::1]:5000/trainer:1", True),
    ("trainer@sha256:" + "a" * 64, True), ("docker.io/library/python:3.12-slim@sha256:" + "0" * 64, True),
    ("Trainer:1", False), ("ghcr.io/a b/trainer", False), ("trainer:", False), ("trainer:-x", False),
    ("trainer@sha256:abc", False), ("/trainer", False), ("trainer:1 ", False), ("http://ghcr.io/trainer", False),
])
def test_image_reference_grammar(image, ok):
    doc = with_trainer(image=image)
    if ok:
        parse_run(doc)
    else:
        assert "spec.trainer.image:" in refusal(doc)


@pytest.mark.parametrize("value,ok", [
    (8, True), ("8", True), ("500m", True), ("1.5Gi", True), ("1e3", True), ("1E-3", True), (".5", True),
    (0, False), ("0", False), ("0.0Gi", False), (-1, False), ("-1Gi", False), ("16GB", False), ("1..2", False),
    ("Gi", False), ("16 Gi", False), (True, False), (1.5, False),
])
def test_quantities_are_kubernetes_quantities_above_zero(value, ok):
    doc = good()
    doc["spec"]["stages"][0]["resources"]["memory"] = value
    if ok:
        parse_run(doc)
    else:
        assert "spec.stages[0].resources.memory" in refusal(doc)


def test_extra_args_keys_are_checked_against_each_methods_trl_config():
    doc = good()
    doc["spec"]["stages"][0]["training"]["extraArgs"] = {"use_weighting": True}  # a DPOConfig field
    msg = refusal(doc)
    assert "spec.stages[0].training.extraArgs.use_weighting: not a SFTConfig field in TRL" in msg
    doc["spec"]["stages"][0]["training"]["extraArgs"] = {"neftune_noise_alpa": 5}
    assert "did you mean neftune_noise_alpha?" in refusal(doc)
    doc["spec"]["stages"][0]["training"]["extraArgs"] = {"per_device_train_batch_size": 4, "deepspeed": "x.json"}
    msg = refusal(doc)
    assert "extraArgs.per_device_train_batch_size: set training.perDeviceBatchSize instead" in msg
    assert "extraArgs.deepspeed: set by the trainer itself" in msg


def test_extra_args_schema_lists_the_accepted_keys_only():
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    extra = schema["properties"]["spec"]["properties"]["stages"]["items"]["properties"]["training"][
        "properties"]["extraArgs"]
    keys = set(extra["properties"])
    assert {"neftune_noise_alpha", "use_weighting", "max_grad_norm", "optim"} <= keys
    assert not keys & {"output_dir", "deepspeed", "learning_rate", "num_train_epochs", "beta", "loss_type"}
    assert "additionalProperties" not in extra, "unknown keys are refused like any unknown field"


def test_every_python_rule_is_a_cel_rule_of_the_same_shape_in_the_crd():
    text = json.dumps(build_crd())
    for name, rules in corev1.RULES.items():
        for rule in rules:
            assert json.dumps(rule.cel) in text and json.dumps(rule.message) in text, (name, rule.cel)
    for name in ("EnvVar", "Toleration", "NodeSelectorRequirement", "LabelSelectorRequirement"):
        assert corev1.schema(name)["x-kubernetes-validations"], name


def test_core_v1_shapes_carry_kubernetes_descriptions_and_bounds():
    tol = corev1.schema("Toleration")
    assert set(tol["properties"]) == {"key", "operator", "value", "effect", "tolerationSeconds"}
    assert tol["properties"]["tolerationSeconds"]["type"] == "integer"
    weight = corev1.schema("Affinity")["properties"]["nodeAffinity"]["properties"][
        "preferredDuringSchedulingIgnoredDuringExecution"]["items"]["properties"]["weight"]
    assert (weight["minimum"], weight["maximum"]) == (1, 100)
    assert "$ref" not in json.dumps(corev1.schema("Affinity"))


def test_bad_shapes_name_the_deepest_field():
    doc = with_trainer(tolerations=[{"key": "gpu", "operator": "Exists", "tolerationSeconds": "soon"}])
    assert "spec.trainer.tolerations[0].tolerationSeconds: expected an integer, got str" in refusal(doc)
    doc = with_trainer(env=[{"name": "X", "valueFrom": {}}])
    assert "spec.trainer.env[0].valueFrom: give exactly one of fieldRef" in refusal(doc)
    doc = with_trainer(affinity={"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": "zone", "labelSelector": {"matchExpressions": [{"key": "a", "operator": "Exists",
                                                                       "values": ["b"]}]}}]}})
    assert ("spec.trainer.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].labelSelector."
            "matchExpressions[0].values: values must be empty when operator is Exists") in refusal(doc)


@pytest.mark.trainer
def test_trl_fields_file_matches_the_installed_trl():
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import gen_trl_fields

    committed = (ROOT / "operator/alignment_operator/api/trl_fields.json").read_text()
    assert gen_trl_fields.generate() == committed, (
        "api/trl_fields.json drifted from the installed TRL: run `.venv/bin/python tools/gen_trl_fields.py` "
        "and `alignctl crd -o crds/alignmentrun.yaml -o charts/alignment-operator/crds/alignmentrun.yaml`")


def test_the_committed_trl_fields_file_is_the_trainers_dispatch():
    data = admission.trl_fields()
    from alignment_trainer.recipe import METHODS

    assert set(data["methods"]) == {m for m, info in METHODS.items() if info.trains}
    assert admission.config_fields("eval") is None
    assert {"output_dir", "deepspeed", "resume_from_checkpoint"} <= set(data["owned"])
