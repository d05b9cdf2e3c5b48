"""The generated CRD: committed, structural, documented, with the printer columns users see."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from alignment_operator.crd import build_crd, render_crd_yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "alignmentrun.yaml"


def walk(node, path="openAPIV3Schema"):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def schema():
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_the_models():
    assert CRD_FILE.read_text() == render_crd_yaml(), (
        "crds/alignmentrun.yaml drifted from the API models: run `alignctl crd -o crds/alignmentrun.yaml`")


def test_alignctl_crd_prints_the_committed_file():
    out = subprocess.run([sys.executable, "-m", "alignment_operator.cli", "crd"],
                         check=True, capture_output=True, text=True).stdout
    assert out == CRD_FILE.read_text()


def test_schema_is_structural():
    for path, node in walk(schema()):
        assert "$ref" not in node and "$defs" not in node, path
        assert "title" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node.get("anyOf") in (None, [{"type": "integer"}, {"type": "string"}]), path
            continue
        assert "anyOf" not in node and "oneOf" not in node, path
        if node.get("x-kubernetes-preserve-unknown-fields") and set(node) <= {"x-kubernetes-preserve-unknown-fields",
                                                                               "description"}:
            continue  # any JSON value (an extraArgs value): the one untyped node a structural schema allows
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_every_spec_and_status_field_is_documented():
    root = schema()
    for top in ("spec", "status"):
        for path, node in walk(root["properties"][top], top):
            if path.endswith("[]") or path.endswith("{}"):
                continue
            assert node.get("description"), f"{path} has no description for kubectl explain"


def test_optional_fields_are_nullable_and_defaults_are_kept():
    spec = schema()["properties"]["spec"]["properties"]
    stage = spec["stages"]["items"]["properties"]
    assert stage["lora"]["nullable"] is True and stage["lora"]["type"] == "object"
    assert stage["training"]["default"] == {}
    assert stage["training"]["properties"]["scheduler"]["default"] == "cosine"
    assert stage["resources"]["properties"]["memory"]["x-kubernetes-int-or-string"] is True
    assert stage["datasets"]["items"]["properties"]["weight"] == {
        "default": 1.0, "description": stage["datasets"]["items"]["properties"]["weight"]["description"],
        "maximum": 1.0, "minimum": 0.0, "exclusiveMinimum": True, "type": "number"}
    assert spec["stages"]["x-kubernetes-list-type"] == "map"


def test_cel_rules_cover_the_cross_field_checks():
    rules = []
    for _, node in walk(schema()):
        rules += [r["rule"] for r in node.get("x-kubernetes-validations", [])]
    text = "\n".join(rules)
    for needle in ("maxPromptLength < self.maxLength", "t.name == s.from", "s.method != 'eval'",
                   "size(self.datasets) > 0", "testSplitSize", "lossType", "quantization", "claimName"):
        assert needle in text, needle


def test_status_subresource_and_printer_columns():
    version = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    cols = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert cols == {"Phase": ".status.phase", "Stage": ".status.currentStage", "Progress": ".status.progressSummary",
                    "Model": ".status.model", "GPU-H": ".status.gpuHours", "Age": ".metadata.creationTimestamp"}


def test_a_fractional_exclusive_maximum_is_a_cel_rule():
    # kube-apiserver v1.37 refuses `default: 0` under `maximum: 0.5, exclusiveMaximum: true`
    # ("should be less than 0": it compares the integer 0 with int(0.5)); CEL compares numbers.
    from pydantic import BaseModel, Field

    from alignment_operator.crd import structural

    class M(BaseModel):
        eps: float = Field(0.0, ge=0, lt=0.5)
        share: float = Field(0.5, gt=0, lt=1)

    props = structural(M.model_json_schema(), {})["properties"]
    assert "maximum" not in props["eps"] and props["eps"]["minimum"] == 0
    assert props["eps"]["x-kubernetes-validations"] == [{"rule": "self < 0.5", "message": "must be less than 0.5"}]
    assert (props["share"]["maximum"], props["share"]["exclusiveMaximum"]) == (1, True), "whole bounds stay schema"


def test_text_that_lists_methods_losses_or_engines_names_every_one_the_tables_hold():
    """The CEL message and the descriptions `kubectl explain` shows are built from the method table
    (they named 6 of the 9 training methods, left out SLiC's, GRPO's and the reward model's losses,
    betas and TRL configs, and JobSet where a stage's child is named)."""
    from alignment_trainer.recipe import BETA_MEANINGS, METHODS, training_methods

    from alignment_operator.api.admission import trl_fields

    spec = schema()["properties"]["spec"]
    messages = [r["message"] for r in spec["x-kubernetes-validations"]]
    message = next(m for m in messages if m.startswith("at least one training stage"))
    assert len(training_methods()) == 9 and all(f"{m}," in message or f"{m})" in message for m in training_methods())
    training = spec["properties"]["stages"]["items"]["properties"]["training"]["properties"]
    for m, info in METHODS.items():
        if info.loss_types:
            assert f"{m}: {', '.join(info.loss_types)}" in training["lossType"]["description"], m
        if info.beta is not None:
            assert f"{m} {info.beta:g} (" in training["beta"]["description"], m
    assert set(BETA_MEANINGS) == {m for m, info in METHODS.items() if info.beta is not None}
    for config in set(trl_fields()["methods"].values()):
        assert config in training["extraArgs"]["description"], config
    nodes = spec["properties"]["stages"]["items"]["properties"]["resources"]["properties"]["nodes"]["description"]
    job_name = schema()["properties"]["status"]["properties"]["stages"]["items"]["properties"]["jobName"]["description"]
    for engine in ("JobSet", "PyTorchJob", "Indexed Job"):
        assert engine in nodes and engine in job_name, engine
