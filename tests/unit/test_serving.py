"""promote.serve renders a KServe InferenceService for the promoted model (checked against KServe's own CRD
by tests/cluster/test_promote_cluster.py): the Hugging Face runtime reading the promoted final/ from the
run's volume, vLLM on GPUs, owned by the run."""

from __future__ import annotations

import yaml

from alignment_operator.api import parse_run
from alignment_operator.render.serving import inference_service


def _run(serve: dict):
    doc = yaml.safe_load(open("examples/tiny-run.yaml").read())
    doc["metadata"].update(namespace="team", uid="0123456789abcdef")
    doc["spec"]["promote"] = {"serve": serve}
    return parse_run(doc)


def test_on_gpus_the_hugging_face_runtime_serves_with_vllm_from_the_runs_volume():
    run = _run({"gpus": 1, "memory": "24Gi"})
    isvc = inference_service(run, "/workspace/team/tiny/01234567/dpo/final")
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == "pvc://tiny-workspace/team/tiny/01234567/dpo/final"
    assert model["args"] == ["--model_name=tiny", "--backend=vllm"]
    assert model["resources"]["limits"] == {"memory": "24Gi", "nvidia.com/gpu": "1"}
    assert isvc["metadata"]["ownerReferences"][0]["uid"] == "0123456789abcdef"
    assert isvc["metadata"]["labels"]["alignment.dev/run"] == "tiny"


def test_without_gpus_it_serves_with_transformers():
    model = inference_service(_run({}), "/workspace/team/tiny/01234567/sft/final")["spec"]["predictor"]["model"]
    assert "--backend=huggingface" in model["args"] and "resources" not in model
