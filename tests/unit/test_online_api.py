"""Online rounds in the API: generate and label stages, and datasets that name an earlier stage's output."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from alignment_operator.api import RunInvalid, parse_run
from alignment_operator.crd import build_crd
from alignment_operator.render.recipe import build_recipe
from alignment_trainer.recipe import GenerateArgs

ROOT = Path(__file__).resolve().parents[2]
RUN = "/workspace/default/online-tiny"


def online_doc() -> dict:
    return yaml.safe_load((ROOT / "examples" / "online-tiny-run.yaml").read_text())


def stage_index(doc: dict, name: str) -> int:
    return next(i for i, s in enumerate(doc["spec"]["stages"]) if s["name"] == name)


def test_two_rounds_render_models_and_datasets_on_the_volume():
    doc = online_doc()
    run = parse_run(doc)
    recipes = {s.name: build_recipe(run, i, "/workspace") for i, s in enumerate(run.spec.stages)}
    gen, lab, dpo = recipes["generate-1"], recipes["label-1"], recipes["dpo-1"]
    assert gen.method == "generate" and gen.model.model_name_or_path == f"{RUN}/sft/final"
    assert gen.datasets[0].path == "examples/data/sums/prompts.jsonl" and gen.generate.num_generations == 8
    assert lab.datasets[0].path == f"{RUN}/generate-1/final/generations.jsonl"
    assert [r.kind for r in lab.label.rewards] == ["regex", "format"] and lab.label.feedback == "pairwise"
    # DPO reads the label stage's pairs and starts from (and is anchored to) the model that generated them.
    assert dpo.datasets[0].path == f"{RUN}/label-1/final/feedback.jsonl"
    assert dpo.model.model_name_or_path == dpo.ref_model == f"{RUN}/sft/final"
    assert recipes["generate-2"].model.model_name_or_path == f"{RUN}/dpo-1/final"
    assert recipes["dpo-2"].datasets[0].path == f"{RUN}/label-2/final/feedback.jsonl"
    assert recipes["dpo-2"].model.model_name_or_path == recipes["dpo-2"].ref_model == f"{RUN}/dpo-1/final"
    assert recipes["eval"].eval.reference_model == f"{RUN}/sft/final"
    assert [r.kind for r in recipes["eval"].eval.rewards] == ["regex", "format"]
    assert recipes["eval"].eval.prompts.path == "examples/data/sums/held_out.jsonl"
    assert recipes["generate-held-out"].model.model_name_or_path == f"{RUN}/dpo-2/final"
    assert recipes["reward-held-out"].label.feedback == "binary"


def test_a_default_generate_stage_renders_the_recipes_defaults():
    doc = online_doc()
    doc["spec"]["stages"][1].pop("generate")
    assert build_recipe(parse_run(doc), 1, "/workspace").generate == GenerateArgs()


def _refused(doc: dict) -> str:
    with pytest.raises(RunInvalid) as err:
        parse_run(doc)
    return str(err.value)


def _edit(**changes):
    """The example with stage `name`'s fields replaced."""
    doc = online_doc()
    for name, fields in changes.items():
        doc["spec"]["stages"][stage_index(doc, name.replace("_", "-"))].update(copy.deepcopy(fields))
    return doc


@pytest.mark.parametrize("doc, message", [
    (_edit(dpo_1={"datasets": [{"stage": "generate-1"}]}),
     "spec.stages[3].datasets[0].stage: 'generate-1' must name an earlier stage whose output the method reads "
     "(method dpo reads pairwise data); accepted: label-1"),
    (_edit(label_1={"datasets": [{"stage": "generate-2"}]}),
     "spec.stages[2].datasets[0].stage: 'generate-2' must name an earlier stage whose output the method reads "
     "(method label reads completions data); accepted: generate-1"),
    (_edit(label_1={"datasets": [{"stage": "sft"}]}), "accepted: generate-1"),
    (_edit(label_1={"label": {"feedback": "binary", "rewards": [{"kind": "contains"}]}}),
     "spec.stages[3].datasets[0].stage: 'label-1' must name an earlier stage whose output the method reads "
     "(method dpo reads pairwise data); accepted: none"),
    (_edit(generate_2={"datasets": [{"stage": "label-1"}]}),
     "spec.stages[4].datasets[0].stage: 'label-1' method generate reads no stage's output (give a source); "
     "accepted: none"),
    (_edit(dpo_1={"datasets": [{"stage": "label-1", "source": "x.jsonl"}]}),
     "spec.stages[3].datasets[0]: Value error, a dataset gives exactly one of source"),
    (_edit(dpo_1={"datasets": [{"split": "train"}]}), "a dataset gives exactly one of source"),
    (_edit(label_1={"label": None}), "spec.stages[2].label: method label needs a label section with rewards"),
    (_edit(label_1={"label": {"rewards": [{"kind": "reward_model", "rewardModel": "sft"}]}}),
     "spec.stages[2].label.rewards[0].rewardModel: 'sft' must name an earlier reward stage; accepted: none"),
    (_edit(label_1={"label": {"rewards": [{"kind": "regex", "pattern": "(unclosed"}]}}),
     "spec.stages[2].label.rewards[0].pattern: '(unclosed' must be a regular expression that both"),
    (_edit(eval={"eval": {"rewards": [{"kind": "contains"}]}}),
     "spec.stages[7].eval.prompts: eval.rewards score the answers to a prompt set; set eval.prompts"),
    (_edit(eval={"eval": {"rewards": [{"kind": "reward_model", "rewardModel": "dpo-1"}],
                          "prompts": {"source": "p.jsonl"}}}),
     "spec.stages[7].eval.rewards[0].rewardModel: 'dpo-1' must name an earlier reward stage"),
], ids=["dpo-reads-generate", "later-stage", "not-a-data-stage", "dpo-reads-binary", "generate-reads-a-stage",
        "source-and-stage", "neither", "label-without-section", "label-reward-model", "label-bad-regex", "eval-rewards-without-prompts",
        "eval-reward-model"])
def test_dataset_stages_and_label_sections_are_checked_at_admission(doc, message):
    assert message in _refused(doc)


def test_kto_and_sft_read_binary_feedback_and_a_run_needs_a_training_stage():
    doc = _edit(label_1={"label": {"feedback": "binary", "rewards": [{"kind": "contains"}]}})
    doc["spec"]["stages"][3]["method"] = "kto"
    parse_run(doc)
    doc["spec"]["stages"][3]["method"] = "sft"
    parse_run(doc)
    doc = online_doc()
    doc["spec"]["stages"] = [s for s in doc["spec"]["stages"] if s["method"] in ("generate", "label")]
    for s in doc["spec"]["stages"]:
        s.pop("from", None)
    assert "spec.stages: at least one training stage" in _refused(doc)


def test_the_crd_carries_the_same_rules():
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    stage = spec["properties"]["stages"]["items"]
    dataset = stage["properties"]["datasets"]["items"]
    assert "source" not in dataset.get("required", []) and "stage" in dataset["properties"]
    assert [r["rule"] for r in dataset["x-kubernetes-validations"]][0] == "has(self.source) != has(self.stage)"
    rules = {r["rule"]: r["message"] for r in spec["x-kubernetes-validations"]}
    rule = next(r for r in rules if "d.stage" in r)
    assert "(s.method in ['label'] && (t.method == 'generate'))" in rule and "j < i" in rule
    assert "t.label.feedback == 'pairwise'" in rule and "t.label.feedback == 'binary'" in rule
    assert "label: a generate stage" in rules[rule]
    stage_rules = [r["rule"] for r in stage["x-kubernetes-validations"]]
    assert "self.method != 'label' || has(self.label)" in stage_rules
    assert "!has(self.eval) || size(self.eval.rewards) == 0 || has(self.eval.prompts)" in stage_rules
    assert any("self.label.rewards.all" in r for r in stage_rules)
    assert stage["properties"]["label"]["properties"]["feedback"]["enum"] == ["pairwise", "binary"]
    assert {"generate", "label"} <= set(stage["properties"]["method"]["enum"])
    training = next(r for r in rules if r.startswith("self.stages.exists(s, "))
    assert "s.method != 'generate'" in training and "s.method != 'label'" in training


def test_a_judge_reward_gets_its_key_only_through_a_secret_ref():
    from alignment_operator.render.manifests import RenderContext, build_stage

    judge = {"baseUrl": "http://judge.svc:8000/v1", "model": "qwen-judge", "maxRetries": 2,
             "apiKeySecretRef": {"name": "judge-key", "key": "token"}}
    doc = _edit(label_1={"label": {"rewards": [{"kind": "judge", "judge": judge}]}})
    run = parse_run(doc)
    reward = build_recipe(run, 2, "/workspace").label.rewards[0]
    assert (reward.kind, reward.judge.base_url, reward.judge.model, reward.judge.max_retries) == (
        "judge", "http://judge.svc:8000/v1", "qwen-judge", 2)
    assert reward.judge.api_key_env == "LABEL_REWARD_0_JUDGE_API_KEY"
    job = next(o for o in build_stage(run, 2, RenderContext(), "h") if o["kind"] == "Job")
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "LABEL_REWARD_0_JUDGE_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "judge-key", "key": "token"}}} in env
    assert "qwen-judge" not in str(env)
    doc = _edit(label_1={"label": {"rewards": [{"kind": "judge"}]}})
    assert ("spec.stages[2].label.rewards[0].judge: a judge reward needs judge (baseUrl, model, apiKeySecretRef)"
            in _refused(doc))


def test_the_runs_model_is_the_newest_trained_one_not_a_data_stages_output():
    from alignment_operator.api import AlignmentRunStatus, StageStatus
    from alignment_operator.reconcile import Event, ObservedChild, reconcile, stage_hash

    doc = online_doc()
    doc["metadata"].update(namespace="default", uid="u-1", generation=1)
    doc["spec"]["stages"] = doc["spec"]["stages"][:3]  # sft -> generate-1 -> label-1
    run = parse_run(doc)
    now = "2026-12-01T12:00:00Z"
    doc["status"] = AlignmentRunStatus(phase="Running", stages=[
        StageStatus(name="sft", phase="Succeeded", checkpoint=f"{RUN}/sft/final", start_time=now, completion_time=now,
                    spec_hash=stage_hash(run, 0)),
        StageStatus(name="generate-1", phase="Succeeded", checkpoint=f"{RUN}/generate-1/final", start_time=now,
                    completion_time=now, spec_hash=stage_hash(run, 1)),
        StageStatus(name="label-1", phase="Running", job_name="online-tiny-label-1", start_time=now,
                    spec_hash=stage_hash(run, 2))]).wire()
    run = parse_run(doc)
    result = {"method": "label", "checkpoint": f"{RUN}/label-1/final", "mean_reward": 0.28, "pairs": 70}
    observed = {"label-1": ObservedChild(stage="label-1", name="online-tiny-label-1", state="Succeeded", attempts=1,
                                         result=result, finished=now)}
    out = reconcile(run, 1, observed, now)
    assert out.status.phase == "Succeeded"
    assert out.status.model == f"{RUN}/sft/final"
    assert out.status.stages[2].metrics == {"mean_reward": 0.28, "pairs": 70.0}
    told = [a.message for a in out.actions if isinstance(a, Event) and a.reason == "StageSucceeded"]
    assert told == ["stage label-1 succeeded: mean_reward=0.28, pairs=70"]


def test_stages_after_a_reward_stage_start_from_the_policy_not_the_reward_model():
    doc = {"apiVersion": "alignment.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r"},
           "spec": {"model": {"source": "org/base"}, "stages": [
               {"name": "rm", "method": "reward", "datasets": [{"source": "pairs.jsonl"}]},
               {"name": "gen", "method": "generate", "datasets": [{"source": "prompts.jsonl"}]},
               {"name": "lab", "method": "label", "datasets": [{"stage": "gen"}],
                "label": {"rewards": [{"kind": "reward_model", "rewardModel": "rm"}]}},
               {"name": "dpo", "method": "dpo", "datasets": [{"stage": "lab"}]}]}}
    run = parse_run(doc)
    gen, lab, dpo = (build_recipe(run, i, "/w") for i in (1, 2, 3))
    assert gen.model.model_name_or_path == "org/base" and lab.label.rewards[0].model == "/w/default/r/rm/final"
    assert dpo.model.model_name_or_path == dpo.ref_model == "org/base"
