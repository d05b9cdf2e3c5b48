"""A Secret a run names that is missing is said before any stage starts (issue 28): examples/zephyr-run.yaml's
eval stage reads the judge key; applied without it, the run used to train for hours and then show Running
with an eval pod stuck in CreateContainerConfigError. The pure half: which Secrets each stage's pods read
(from the rendered pod template), what is missing of them, and reconcile holding the run."""

from __future__ import annotations

from pathlib import Path

import yaml

from alignment_operator import secret_refs
from alignment_operator.api import parse_run
from alignment_operator.reconcile import CreateStage, Event, RequeueAfter, reconcile
from alignment_operator.render.manifests import RenderContext, build_pod_template

ROOT = Path(__file__).resolve().parents[2]
NOW = "2026-12-06T09:00:00Z"


def zephyr(status: dict | None = None, **trainer):
    doc = yaml.safe_load((ROOT / "examples" / "zephyr-run.yaml").read_text())
    doc["metadata"].update(namespace="team", uid="run-1", generation=1)
    doc["spec"]["trainer"].update(hfTokenSecretRef={"name": "hf-token", "key": "token"}, **trainer)  # as README says
    if status:
        doc["status"] = status
    return parse_run(doc)


def uses(run, stage: str) -> list[secret_refs.SecretUse]:
    index = [s.name for s in run.spec.stages].index(stage)
    return secret_refs.secret_uses(build_pod_template(run, index, RenderContext(), [])["spec"])


def lacking(run, keys: dict) -> dict[str, list[str]]:
    found = {s.name: secret_refs.missing(uses(run, s.name), keys, "team") for s in run.spec.stages}
    return {k: v for k, v in found.items() if v}


def test_each_stage_reads_the_secrets_it_names_and_optional_ones_are_not_required():
    run = zephyr(envFrom=[{"secretRef": {"name": "extra"}}, {"secretRef": {"name": "maybe", "optional": True}}])
    assert [(u.secret, u.key) for u in uses(run, "sft")] == [("hf-token", "token"), ("extra", None)]
    assert ("judge-api-key", "api-key", "env JUDGE_API_KEY") in [(u.secret, u.key, u.what) for u in uses(run, "eval")]
    pod = {"containers": [{"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                                   {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "o", "optional": True}}}]}],
           "volumes": [{"name": "v", "secret": {"secretName": "t", "items": [{"key": "ca", "path": "ca"}]}},
                       {"name": "p", "projected": {"sources": [{"secret": {"name": "u"}}, {"configMap": {"name": "c"}}]}}]}
    assert [(u.secret, u.key) for u in secret_refs.secret_uses(pod)] == [("s", "k"), ("t", "ca"), ("u", None)]


def test_without_the_judge_secret_no_stage_starts_and_the_eval_stage_names_secret_and_key():
    run = zephyr()
    missing = lacking(run, {"hf-token": {"token"}, "judge-api-key": None})
    assert list(missing) == ["eval"], missing
    out = reconcile(run, 1, {}, NOW, lacking=missing)
    assert not [a for a in out.actions if isinstance(a, CreateStage)], "nothing starts"
    assert out.status.phase == "Pending"
    sft, dpo, ev = out.status.stages
    assert ev.reason == sft.reason == "SecretMissing"
    for said in (ev.message, sft.message):
        assert "judge-api-key" in said and "key api-key" in said and "namespace team" in said, said
        assert "kubectl create secret generic judge-api-key -n team --from-literal=api-key=..." in said
    assert "stage eval" in sft.message and dpo.reason is None
    reconciling = next(c for c in out.status.conditions if c.type == "Reconciling")
    assert reconciling.reason == "SecretMissing" and "judge-api-key" in reconciling.message
    assert [a for a in out.actions if isinstance(a, Event) and a.reason == "SecretMissing"] != []
    assert RequeueAfter(10.0) in out.actions  # nothing watches Secrets: looked at again
    # the same again: no second Event; a wrong key is named with the keys the Secret has
    again = reconcile(zephyr(out.status.wire()), 1, {}, NOW, lacking=missing)
    assert not [a for a in again.actions if isinstance(a, Event)]
    wrong = lacking(run, {"hf-token": set(), "judge-api-key": {"openai"}})
    assert wrong["sft"] == ["Secret hf-token has no key token (env HF_TOKEN; its keys: none): add it, or name one of its keys"]
    assert "Secret judge-api-key has no key api-key (env JUDGE_API_KEY; its keys: openai)" in " ".join(wrong["eval"])
    both = reconcile(run, 1, {}, NOW, lacking=wrong).status.stages[0].message
    assert both.count("hf-token") == 1 and "stages sft, dpo, eval: Secret hf-token has no key token" in both, both


def test_with_the_secrets_there_the_first_stage_starts_and_the_old_words_go():
    held = reconcile(zephyr(), 1, {}, NOW, lacking=lacking(zephyr(), {"hf-token": None, "judge-api-key": None}))
    run = zephyr(held.status.wire())
    assert lacking(run, {"hf-token": {"token"}, "judge-api-key": {"api-key"}}) == {}
    out = reconcile(run, 1, {}, NOW)
    assert [a.index for a in out.actions if isinstance(a, CreateStage)] == [0]
    assert out.status.phase == "Running"
    assert [s.reason for s in out.status.stages] == [None, None, None], [s.message for s in out.status.stages]
