"""spec.promote as tables: the tiny pipeline (sft -> dpo -> eval, plus an eval of the SFT model) passes a
gate it meets and is held by one it misses (phase Held, Ready False, Stalled True, Promoted False, the
failing gate's value in status.promotion); a sweep's best passing variant is the one promoted; bad
promote specs are refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alignment_operator.api import RunInvalid, parse_run
from alignment_operator.local.view import promotion_table
from alignment_operator.reconcile import CreateStage, Event, ObservedChild, reconcile

ROOT = Path(__file__).resolve().parents[2]
NOW = "2026-12-06T10:00:00Z"
EVAL_SFT = {"name": "eval-sft", "method": "eval", "from": "sft",
            "datasets": [{"source": "examples/data/prefs_test.jsonl"}], "resources": {"gpusPerNode": 0}}


def tiny(promote: dict, extra_stages=(), matrix: dict | None = None, status: dict | None = None):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"].update(namespace="default", uid="u-1", generation=1)
    stages = doc["spec"]["stages"]
    if matrix:
        stages[1]["matrix"] = matrix
    doc["spec"]["stages"] = [stages[0], *extra_stages, *stages[1:]]
    doc["spec"]["promote"] = promote
    if status is not None:
        doc["status"] = status
    return doc


def drive(doc: dict, metrics: dict[str, dict], local: bool = False):
    """Play every stage to success with `metrics` per stage (an eval entry's or a trained stage's)."""
    observed, status, out = {}, None, None
    for _ in range(20):
        run = parse_run({**doc, **({"status": status} if status else {})}, local=local)
        out = reconcile(run, 1, observed, NOW)
        status = out.status.wire()
        for a in out.actions:
            if isinstance(a, CreateStage):
                name = run.spec.stages[a.index].name
                observed[name] = ObservedChild(stage=name, name=f"tiny-{name}", state="Succeeded", finished=NOW, result={
                    "checkpoint": f"/w/{name}/final", "metrics": metrics.get(name, {"train_loss": 1.0})})
        if out.status.phase in ("Succeeded", "Failed", "Held"):
            break
    return out


GATES = [{"metric": "preference_accuracy", "min": 0.6},
         {"metric": "preference_accuracy", "atLeastAsGoodAs": "eval-sft"}]


def test_the_tiny_pipeline_passes_gates_it_meets_and_is_promoted():
    out = drive(tiny({"gates": GATES}, [EVAL_SFT]), {"eval-sft": {"preference_accuracy": 0.30},
                                                     "eval": {"preference_accuracy": 0.85}})
    s = out.status
    p = s.promotion
    assert (s.phase, p.verdict, p.stage, p.model, p.eval_stage) == ("Succeeded", "Promoted", "dpo", "/w/dpo/final",
                                                                     "eval")
    assert [(g.rule, g.value, g.threshold, g.passed) for g in p.gates] == [
        ("min", 0.85, 0.6, True), ("atLeastAsGoodAs:eval-sft", 0.85, 0.30, True)]
    conditions = {c.type: (c.status, c.reason) for c in s.conditions}
    assert conditions["Promoted"] == ("True", "GatesPassed") and conditions["Ready"][0] == "True"
    assert "PROMOTION: Promoted dpo" in promotion_table(p) and "FAILED" not in promotion_table(p)


def test_a_gate_it_misses_holds_the_run_with_the_value_that_failed():
    out = drive(tiny({"gates": [{"metric": "preference_accuracy", "min": 0.9}, GATES[1]]}, [EVAL_SFT]),
                {"eval-sft": {"preference_accuracy": 0.30}, "eval": {"preference_accuracy": 0.85}})
    s = out.status
    assert s.phase == "Held" and s.completion_time == NOW
    assert [(g.value, g.threshold, g.passed) for g in s.promotion.gates] == [(0.85, 0.9, False), (0.85, 0.30, True)]
    conditions = {c.type: (c.status, c.reason) for c in s.conditions}
    assert conditions["Promoted"] == ("False", "GatesNotMet")
    assert conditions["Ready"] == ("False", "GatesNotMet") and conditions["Stalled"] == ("True", "GatesNotMet")
    assert conditions["Reconciling"][0] == "False"  # nothing left to do: a GitOps wait fails, never hangs
    assert "preference_accuracy 0.85 >= 0.9: failed" in s.promotion.message
    assert [a.reason for a in out.actions if isinstance(a, Event)][-1] == "RunHeld"
    assert "FAILED" in promotion_table(s.promotion)
    # Held is final: the next pass (a restarted operator) does nothing and keeps it.
    again = reconcile(parse_run(tiny({"gates": [{"metric": "preference_accuracy", "min": 0.9}, GATES[1]]},
                                     [EVAL_SFT], status=s.wire())), 1, {}, NOW)
    assert again.status.phase == "Held" and not [a for a in again.actions if isinstance(a, CreateStage)]


def test_a_missing_metric_fails_its_gate_rather_than_passing():
    out = drive(tiny({"gates": [{"metric": "ifeval/prompt_level_strict_acc", "min": 0.1}]}),
                {"eval": {"preference_accuracy": 0.85}})
    assert out.status.phase == "Held"
    assert out.status.promotion.gates[0].value is None and "missing" in out.status.promotion.message


def test_a_sweeps_best_passing_variant_is_promoted():
    doc = tiny({"gates": [{"metric": "preference_accuracy", "min": 0.6}], "chooseBy": "preference_accuracy"},
               matrix={"beta": [0.05, 0.1, 0.5]})
    doc["spec"]["stages"][-1]["eval"] = {"stages": ["dpo"]}
    doc["spec"]["stages"][-1].pop("from", None)
    run = parse_run(doc)
    evals = [s.name for s in run.spec.stages if s.method == "eval"]
    assert len(evals) == 3
    scores = dict(zip(evals, (0.7, 0.9, 0.5)))
    out = drive(doc, {e: {"preference_accuracy": v} for e, v in scores.items()})
    p = out.status.promotion
    best_eval = max(scores, key=scores.get)
    assert (p.verdict, p.candidates, p.chosen_by) == ("Promoted", 3, "preference_accuracy")
    assert p.stage == run.expansion[best_eval].evaluates and p.stage.startswith("dpo-")
    assert out.status.model == f"/w/{p.stage}/final" and p.gates[0].value == 0.9


def test_a_sweeps_promoted_variant_is_named_marked_in_the_comparison_and_the_one_exported():
    from alignment_operator.local.view import compare_table
    from alignment_operator.render.exporting import export_job
    from alignment_operator.render.manifests import RenderContext

    # The best by preference_accuracy (beta 0.1) misses the reward_margin gate: the best that passes ships.
    doc = tiny({"gates": [{"metric": "reward_margin", "min": 0.1}], "exports": [{"uri": "s3://exports/sweep"}]},
               matrix={"beta": [0.05, 0.1, 0.5]})
    doc["spec"]["stages"][-1]["eval"] = {"stages": ["dpo"], "compareBy": "preference_accuracy"}
    doc["spec"]["stages"][-1].pop("from", None)
    scores = {"eval-dpo-0-05": (0.7, 0.3), "eval-dpo-0-1": (0.9, 0.05), "eval-dpo-0-5": (0.8, 0.2)}
    out = drive(doc, {e: {"preference_accuracy": a, "reward_margin": m} for e, (a, m) in scores.items()})
    s, p = out.status, out.status.promotion
    assert (p.verdict, p.stage, p.matrix, p.evaluated_by) == ("Promoted", "dpo-0-5", {"beta": 0.5}, "eval-dpo-0-5")
    assert "promoted dpo-0-5 (beta 0.5; best of 3 by preference_accuracy: preference_accuracy 0.8)" in p.message
    assert (s.model, s.evaluation["stage"], s.evaluation["preference_accuracy"]) == ("/w/dpo-0-5/final",
                                                                                     "eval-dpo-0-5", 0.8)
    rows = {r.stage: (r.best, r.promoted) for r in s.comparison}
    assert rows == {"dpo-0-1": (True, False), "dpo-0-5": (False, True), "dpo-0-05": (False, False)}
    table = compare_table(s.wire()).splitlines()
    assert "PROMOTE" in table[0] and [line.split()[0] for line in table if line.endswith("promoted")] == ["dpo-0-5"]
    assert "PROMOTION: Promoted dpo-0-5 (beta 0.5)" in promotion_table(p)
    # The export Job writes that variant's final/ with the card its eval wrote, listing the URI.
    run = parse_run({**doc, "status": s.wire()})
    spec = json.loads(export_job(run, p.model, ["s3://exports/sweep"], RenderContext(),
                                 evaluated_by=p.evaluated_by)["spec"]["template"]["spec"]["containers"][0]["command"][3])
    assert spec["model"] == "/w/dpo-0-5/final" and spec["card"]["uris"] == ["s3://exports/sweep"]
    assert spec["card"]["from"].endswith("/tiny/u-1/eval-dpo-0-5/README.md")


@pytest.mark.parametrize("promote, field", [
    ({"eval": "dpo"}, "promote.eval"),
    ({"gates": [{"metric": "m", "atLeastAsGoodAs": "sft"}]}, "atLeastAsGoodAs"),
    ({"gates": [{"metric": "m", "min": 0.1, "max": 0.9}]}, "exactly one of min, max or atLeastAsGoodAs"),
])
def test_bad_promote_specs_are_refused_naming_the_field(promote, field):
    with pytest.raises(RunInvalid, match=field):
        parse_run(tiny(promote))


def test_exports_of_the_promoted_model_are_pending_then_complete_or_failed_in_the_exported_condition():
    from alignment_operator.api.status import ExportResult
    from alignment_operator.promotion import pending_exports

    promote = {"gates": [{"metric": "preference_accuracy", "min": 0.6}],
               "exports": [{"uri": "s3://exports/tiny"}, {"uri": "s3://backup/tiny/"}]}
    doc = tiny(promote)
    out = drive(doc, {"eval": {"preference_accuracy": 0.85}}, local=True)
    s = out.status
    assert pending_exports(parse_run(doc, local=True), s.promotion) == ["s3://exports/tiny", "s3://backup/tiny/"]
    assert {c.type: c.reason for c in s.conditions}["Exported"] == "ExportPending"
    # The shell records what it wrote (objectstore.export's result); the next pass words it.
    s.promotion.exports = [ExportResult(uri="s3://exports/tiny", digest="sha256:ab", bytes=10, files=2),
                           ExportResult(uri="s3://backup/tiny", error="exporting to s3://backup/tiny/: no such bucket")]
    again = reconcile(parse_run(tiny(promote, status=s.wire()), local=True), 1, {}, NOW).status
    exported = {c.type: c for c in again.conditions}["Exported"]
    assert (exported.status, exported.reason) == ("False", "ExportFailed") and "no such bucket" in exported.message
    assert pending_exports(parse_run(doc, local=True), again.promotion) == ["s3://backup/tiny/"]  # tried again, the other kept
    again.promotion.exports[1] = ExportResult(uri="s3://backup/tiny", digest="sha256:ab", bytes=10, files=2)
    done = reconcile(parse_run(tiny(promote, status=again.wire()), local=True), 1, {}, NOW).status
    assert {c.type: c.status for c in done.conditions}["Exported"] == "True" and done.phase == "Succeeded"
    held = drive(tiny({**promote, "gates": [{"metric": "preference_accuracy", "min": 0.9}]}),
                 {"eval": {"preference_accuracy": 0.85}}, local=True).status
    assert "Exported" not in {c.type for c in held.conditions} and pending_exports(parse_run(doc, local=True), held.promotion) == []


def test_an_export_uri_is_an_s3_uri_without_credentials_or_a_hub_repository():
    for uri, words in (("https://example.com/x", "neither s3://bucket/prefix .* nor hf://org/name"),
                       ("hf://no-org", "neither s3://bucket/prefix .* nor hf://org/name"),
                       ("s3://key:secret@bucket/x", "an s3:// URI with credentials")):
        with pytest.raises(RunInvalid, match=words) as err:
            parse_run(tiny({"exports": [{"uri": uri}]}), local=True)
        assert "secret@" not in str(err.value)
    assert parse_run(tiny({"exports": [{"uri": "hf://my-org/tiny-dpo"}]}), local=True).spec.promote.exports[0].private


def test_the_hub_push_of_a_promoted_run_is_an_export_of_the_promoted_model_only():
    """spec.hub pushes the last stage's model whatever the gates say: with promote it is refused, naming
    promote.exports' hf:// URI; that export needs the token's Secret on a cluster and the Job gets it."""
    from alignment_operator.render.exporting import export_job
    from alignment_operator.render.manifests import RenderContext

    doc = tiny({"gates": GATES[:1]})
    doc["spec"]["hub"] = {"repoId": "my-org/tiny"}
    doc["spec"]["trainer"] = {"hfTokenSecretRef": {"name": "hf", "key": "token"}}
    with pytest.raises(RunInvalid, match=r"hub: .*promote.exports: \[\{uri: hf://<repoId>\}\]"):
        parse_run(doc)
    hub = {"gates": GATES[:1], "exports": [{"uri": "hf://my-org/tiny", "private": False}, {"uri": "s3://exports/t"}]}
    with pytest.raises(RunInvalid, match="promote.exports: an hf:// export needs trainer.hfTokenSecretRef"):
        parse_run(tiny(hub))
    assert parse_run(tiny(hub), local=True).spec.promote.exports[0].uri == "hf://my-org/tiny"  # the login's token
    doc = tiny(hub)
    doc["spec"]["trainer"] = {"hfTokenSecretRef": {"name": "hf", "key": "token"}}
    out = drive(doc, {"eval": {"preference_accuracy": 0.85}})
    assert out.status.promotion.verdict == "Promoted"
    assert {c.type: c.reason for c in out.status.conditions}["Exported"] == "ExportPending"
    run = parse_run(doc)
    p = out.status.promotion
    job = export_job(run, p.model, ["hf://my-org/tiny"], RenderContext(), evaluated_by=p.evaluated_by)
    container = job["spec"]["template"]["spec"]["containers"][0]
    spec = json.loads(container["command"][3])
    assert spec["exports"] == [{"uri": "hf://my-org/tiny", "private": False}]
    assert spec["card"]["uris"] == ["hf://my-org/tiny", "s3://exports/t"]
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    s3_only = export_job(run, p.model, ["s3://exports/t"], RenderContext())["spec"]["template"]["spec"]
    assert "HF_TOKEN" not in {e["name"] for e in s3_only["containers"][0]["env"]}  # only where it is used


def test_the_export_job_runs_the_trainers_export_tool_on_the_volume_with_the_key_pair_from_the_secret():
    from alignment_operator.render.exporting import EXPORT_STAGE, export_job
    from alignment_operator.render.manifests import RenderContext

    doc = tiny({"exports": [{"uri": "s3://exports/tiny"}]})
    doc["spec"]["objectStore"] = {"endpointUrl": "http://minio.storage:9000", "credentialsSecretName": "s3-creds"}
    job = export_job(parse_run(doc), "/workspace/default/tiny/u-1/dpo/final", ["s3://exports/tiny"], RenderContext())
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:3] == ["python", "-m", "alignment_trainer.export"]
    spec = json.loads(container["command"][3])
    assert spec["model"] == "/workspace/default/tiny/u-1/dpo/final" and spec["exports"] == [{"uri": "s3://exports/tiny"}]
    assert spec["object_store"]["endpoint_url"] == "http://minio.storage:9000"
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert job["metadata"]["labels"]["alignment.dev/stage"] == EXPORT_STAGE and "." in EXPORT_STAGE  # never a stage
    assert job["metadata"]["ownerReferences"][0]["controller"] is True


def test_argo_cd_shows_a_held_run_degraded_with_the_gate_that_failed():
    import lupa

    out = drive(tiny({"gates": [{"metric": "preference_accuracy", "min": 0.9}]}), {"eval": {"preference_accuracy": 0.85}})
    obj = {**tiny({}), "status": out.status.wire()}
    obj["metadata"]["generation"] = 1
    lua = lupa.LuaRuntime()
    check = lua.eval("function(obj) " + (ROOT / "docs" / "argocd-health.lua").read_text() + " end")
    health = dict(check(lua.table_from(obj, recursive=True)).items())
    assert health["status"] == "Degraded" and "preference_accuracy 0.85 >= 0.9: failed" in health["message"]
