"""spec.objectStore and s3:// sources: accepted where a model or dataset source is, rendered into the
recipe (the store's endpoint, the run's sources/ directory) and the pod (the key pair only through
secretKeyRef), never checked as a local path by `run --local`."""

from __future__ import annotations

import json

import yaml

from alignment_operator.api import AlignmentRun
from alignment_operator.local.paths import path_problems
from alignment_operator.render.manifests import RenderContext, build_all
from alignment_operator.render.recipe import build_recipe

RUN = """
apiVersion: alignment.dev/v1alpha1
kind: AlignmentRun
metadata: {name: s3run, namespace: team, uid: 0123456789abcdef}
spec:
  model: {source: s3://models/tiny, dtype: float32}
  objectStore: {endpointUrl: "http://minio.storage.svc:9000", region: eu-west-1, credentialsSecretName: s3-creds}
  stages:
  - name: sft
    method: sft
    datasets: [{source: s3://data/chat/sft.jsonl}]
    resources: {gpusPerNode: 0}
  - name: eval
    method: eval
    datasets: [{source: s3://data/chat/prefs_test.jsonl}]
    resources: {gpusPerNode: 0}
"""


def _run(text: str = RUN) -> AlignmentRun:
    return AlignmentRun.model_validate(yaml.safe_load(text))


def test_s3_sources_render_into_the_recipe_with_the_store_and_the_runs_sources_directory():
    run = _run()
    recipe = build_recipe(run, 0, "/workspace")
    assert recipe.model.model_name_or_path == "s3://models/tiny"  # the trainer fetches it (objectstore)
    assert recipe.datasets[0].path == "s3://data/chat/sft.jsonl"
    store = recipe.object_store
    assert (store.endpoint_url, store.region) == ("http://minio.storage.svc:9000", "eu-west-1")
    # One directory for the whole run, beside its stages': the eval stage reuses what sft fetched.
    assert store.sources_dir == "/workspace/team/s3run/01234567/sources"
    assert build_recipe(run, 1, "/workspace").object_store.sources_dir == store.sources_dir
    assert build_recipe(run, 1, "/workspace").eval.reference_model == "s3://models/tiny"


def test_the_key_pair_reaches_the_pod_only_through_secret_key_refs():
    objects = build_all(_run(), RenderContext())
    text = json.dumps(objects)
    job = next(o for o in objects if o["kind"] == "Job")  # sft's
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": key}}}
    assert '"value": "AKIA' not in text


def test_without_a_secret_the_service_accounts_identity_is_used_and_a_run_without_s3_is_unchanged():
    no_secret = _run(RUN.replace(", credentialsSecretName: s3-creds", ""))
    job = next(o for o in build_all(no_secret, RenderContext()) if o["kind"] == "Job")
    names = [e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert "AWS_SECRET_ACCESS_KEY" not in names and "HF_HOME" in names
    plain = _run(RUN.replace("s3://models/tiny", "runs/tiny-model").replace("s3://data/chat/", "examples/data/")
                 .replace('  objectStore: {endpointUrl: "http://minio.storage.svc:9000", region: eu-west-1, '
                          'credentialsSecretName: s3-creds}\n', ""))
    assert build_recipe(plain, 0, "/workspace").object_store is None


def test_run_local_does_not_look_for_s3_sources_on_disk(tmp_path):
    problems = path_problems(_run(), base=tmp_path, strict=True)
    assert problems == []
    missing = path_problems(_run(RUN.replace("s3://data/chat/sft.jsonl", "data/sft.jsonl")), base=tmp_path)
    assert len(missing) == 1 and "data/sft.jsonl" in missing[0]  # the check ran, and skips only s3://
