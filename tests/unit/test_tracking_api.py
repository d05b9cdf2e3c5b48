"""spec.tracking: rendered into the stage's recipe (the trainer's report_to) and into pod env,
credentials only through secretKeyRefs; the run's status carries the tracked run's links."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alignment_operator.api import RunInvalid, parse_run
from alignment_operator.render.manifests import RenderContext, build_stage
from alignment_operator.render.recipe import build_recipe
from alignment_trainer.recipe import Recipe, TrackingArgs

ROOT = Path(__file__).resolve().parents[2]
TRACKING = {
    "wandb": {"project": "tiny", "entity": "lab", "apiKeySecretRef": {"name": "wandb", "key": "api-key"}},
    "mlflow": {"trackingUri": "https://mlflow.lab.example", "experiment": "tiny",
               "credentialsSecretName": "mlflow-creds"},
}


def run_with(tracking=None, stage_tracking=None):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"]["namespace"] = "ml"
    if tracking is not None:
        doc["spec"]["tracking"] = tracking
    if stage_tracking is not None:
        doc["spec"]["stages"][1]["tracking"] = stage_tracking
    return parse_run(doc)


def container(run, index):
    objs = build_stage(run, index, RenderContext(), "h")
    job = next(o for o in objs if o["kind"] == "Job")
    return job["spec"]["template"]["spec"]["containers"][0], objs


def test_default_is_tensorboard_on_the_volume_as_a_hand_written_recipe():
    recipe = build_recipe(run_with(), 0, "/workspace")
    assert recipe.tracking == TrackingArgs() and recipe.tracking.report_to == ["tensorboard"]
    env = {e["name"] for e in container(run_with(), 0)[0]["env"]}
    assert not env & {"WANDB_API_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN"}


def test_wandb_and_mlflow_reach_the_recipe_and_credentials_only_secret_refs():
    run = run_with(TRACKING)
    c, objs = container(run, 1)
    recipe = Recipe.model_validate(yaml.safe_load(objs[0]["data"]["recipe.yaml"]))
    t = recipe.tracking
    assert t.report_to == ["tensorboard", "wandb", "mlflow"]
    assert (t.wandb_project, t.wandb_entity, t.wandb_mode) == ("tiny", "lab", "online")
    assert (t.mlflow_tracking_uri, t.mlflow_experiment) == ("https://mlflow.lab.example", "tiny")
    env = {e["name"]: e for e in c["env"]}
    assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY",
                                    "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
    for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password"),
                     ("MLFLOW_TRACKING_TOKEN", "token")):
        assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": {"name": "mlflow-creds", "key": key,
                                                                         "optional": True}}}
    # No credential-carrying variable has a plain value anywhere in what the operator creates.
    text = json.dumps(objs)
    assert '"WANDB_API_KEY", "value"' not in text and "api-key" not in objs[0]["data"]["recipe.yaml"]


def test_a_stage_replaces_the_runs_tracking_for_itself():
    run = run_with(TRACKING, stage_tracking={"tensorboard": {"enabled": False},
                                             "wandb": {"project": "dpo-only", "mode": "offline"}})
    assert build_recipe(run, 0, "/workspace").tracking.report_to == ["tensorboard", "wandb", "mlflow"]
    dpo = build_recipe(run, 1, "/workspace").tracking
    assert dpo.report_to == ["wandb"] and (dpo.wandb_project, dpo.wandb_mode) == ("dpo-only", "offline")
    env = {e["name"] for e in container(run, 1)[0]["env"]}
    assert "WANDB_API_KEY" not in env and "MLFLOW_TRACKING_TOKEN" not in env  # offline W&B needs no key


def test_online_wandb_needs_a_key_and_a_uri_never_holds_credentials():
    with pytest.raises(RunInvalid) as e:
        run_with({"wandb": {"project": "p"}})
    assert "spec.tracking.wandb: Value error, wandb.apiKeySecretRef is required unless mode is offline" in str(e.value)
    with pytest.raises(RunInvalid) as e:
        run_with({"mlflow": {"trackingUri": "https://bob:hunter2@mlflow.example"}})
    assert "trackingUri must not hold credentials (user:password@); give credentialsSecretName" in str(e.value)
    assert "hunter2" not in str(e.value)


def test_the_crd_has_the_same_rules():
    from alignment_operator.crd import build_crd

    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    tracking = spec["tracking"]["properties"]
    assert tracking["tensorboard"]["properties"]["enabled"]["default"] is True
    rules = [r["rule"] for r in tracking["wandb"]["x-kubernetes-validations"] + tracking["mlflow"]["x-kubernetes-validations"]]
    assert "self.mode == 'offline' || has(self.apiKeySecretRef)" in rules
    assert any("trackingUri.matches" in r for r in rules)


def test_a_succeeded_stage_links_its_tracked_run_in_status():
    from alignment_operator.api import AlignmentRunStatus, StageStatus
    from alignment_operator.reconcile import ObservedChild, reconcile, stage_hash

    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"].update(namespace="default", uid="u-1", generation=1)
    run = parse_run(doc)
    now = "2026-12-01T00:00:00Z"
    doc["status"] = AlignmentRunStatus(phase="Running", stages=[
        StageStatus(name="sft", phase="Running", job_name="tiny-sft", spec_hash=stage_hash(run, 0), start_time=now),
        StageStatus(name="dpo"), StageStatus(name="eval")]).wire()
    links = {"tensorboard": "/workspace/default/tiny/sft/tensorboard",
             "mlflow": "https://mlflow.lab.example/#/experiments/1/runs/abc", "mlflow_run_id": "abc"}
    done = ObservedChild(stage="sft", name="tiny-sft", state="Succeeded", attempts=1, finished=now,
                         result={"checkpoint": "/workspace/default/tiny/sft/final", "train_loss": 1.0,
                                 "tracking": links})
    status = reconcile(parse_run(doc), 1, {"sft": done}, now).status
    assert status.stages[0].tracking == {k: v for k, v in links.items() if k != "mlflow_run_id"}
