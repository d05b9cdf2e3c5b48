"""GitOps tools read a run's health right: kstatus itself (sigs.k8s.io/cli-utils, what Flux,
kpt and Config Sync use), built from Go modules (tests/gotools.py), and the documented Argo CD Lua
health check, on runs whose status the operator's own reconcile wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignment_operator.reconcile import ObservedChild, reconcile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gotools  # noqa: E402
from test_reconcile import NOW, SFT_RESULT, make_run  # noqa: E402

ROOT = gotools.ROOT


@pytest.fixture(scope="module")
def kstatus_check() -> Path:
    """tools/kstatus's binary (tests/gotools.py; scripts/test builds it beside the Kubernetes build)."""
    return gotools.kstatus_check()


def as_object(run, status, generation: int = 1) -> dict:
    return {"apiVersion": "alignment.dev/v1alpha1", "kind": "AlignmentRun",
            "metadata": {"name": run.metadata.name, "namespace": "default", "generation": generation},
            "spec": run.spec.wire(), "status": status.wire()}


def four_runs() -> dict[str, dict]:
    """A running, a succeeded, a failed and a suspended run, each as reconcile leaves it."""
    running = reconcile(make_run(), 1, {}, NOW).status
    done = {"sft": ObservedChild("sft", "tiny-sft", "Succeeded", 1, result=SFT_RESULT),
            "dpo": ObservedChild("dpo", "tiny-dpo", "Succeeded", 1, result={"checkpoint": "/w/dpo/final"}),
            "eval": ObservedChild("eval", "tiny-eval", "Succeeded", 1, result={"preference_accuracy": 0.9})}
    status = running
    for _ in range(4):
        status = reconcile(make_run(status=status.wire()), 1, done, NOW).status
    failed = reconcile(make_run(status=running.wire()), 1, {"sft": ObservedChild(
        "sft", "tiny-sft", "Failed", 1, message="DataError (exit code 2): dataset sft.jsonl line 3: ...")}, NOW).status
    suspended_run = make_run(status=running.wire(), suspend=True)
    suspended = reconcile(suspended_run, 1, {"sft": ObservedChild("sft", "tiny-sft", "Running", 1)}, NOW).status
    assert (running.phase, status.phase, failed.phase, suspended.phase) == ("Running", "Succeeded", "Failed",
                                                                            "Suspended")
    return {"running": as_object(make_run(), running), "succeeded": as_object(make_run(), status),
            "failed": as_object(make_run(), failed), "suspended": as_object(suspended_run, suspended)}


def test_kstatus_verdicts(kstatus_check):
    runs = four_runs()
    runs["edited"] = {**runs["succeeded"], "metadata": {**runs["succeeded"]["metadata"], "generation": 2}}
    names = list(runs)
    for name in names:
        runs[name]["metadata"]["name"] = name
    out = subprocess.run([str(kstatus_check)], input=json.dumps({"items": list(runs.values())}),
                         capture_output=True, text=True, check=True, timeout=60).stdout
    verdicts = {v["name"]: v for v in map(json.loads, out.splitlines())}
    assert {n: verdicts[n]["status"] for n in names} == {
        "running": "InProgress",
        "succeeded": "Current",
        "failed": "Failed",
        # Suspended is InProgress on purpose: Ready stays "the run succeeded" (what kubectl wait
        # --for=condition=Ready means), and a half-trained model is not a healthy deployment.
        "suspended": "InProgress",
        "edited": "InProgress",  # a spec generation the operator has not observed yet
    }
    assert "stage sft failed" in verdicts["failed"]["message"]


def test_the_documented_argocd_health_check():
    import lupa

    lua = lupa.LuaRuntime()
    check = lua.eval("function(obj) " + (ROOT / "docs" / "argocd-health.lua").read_text() + " end")
    health = {name: dict(check(lua.table_from(obj, recursive=True)).items()) for name, obj in four_runs().items()}
    assert {n: h["status"] for n, h in health.items()} == {
        "running": "Progressing", "succeeded": "Healthy", "failed": "Degraded", "suspended": "Suspended"}
    assert "dataset sft.jsonl line 3" in health["failed"]["message"]
