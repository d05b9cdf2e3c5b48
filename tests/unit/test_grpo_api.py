"""method grpo in the API: its section is required and checked, a reward model names an earlier reward stage
(rendered as that stage's final/), and the CRD carries the section and its CEL rules."""

from __future__ import annotations

import pytest

from alignment_operator.api.run import RunInvalid, parse_run
from alignment_operator.crd import build_crd
from alignment_operator.render.recipe import build_recipe


def run_doc(grpo: dict | None, reward_stage: bool = True) -> dict:
    stages = [{"name": "sft", "method": "sft", "datasets": [{"source": "chats.jsonl"}]}]
    if reward_stage:
        stages.append({"name": "rm", "method": "reward", "datasets": [{"source": "pairs.jsonl"}]})
    stage = {"name": "online", "method": "grpo", "from": "sft", "datasets": [{"source": "prompts.jsonl"}],
             "training": {"lossType": "dr_grpo", "beta": 0.02}}
    if grpo is not None:
        stage["grpo"] = grpo
    return {"apiVersion": "alignment.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r"},
            "spec": {"model": {"source": "org/base"}, "stages": stages + [stage]}}


def test_a_grpo_stage_renders_rewards_generations_and_loss():
    doc = run_doc({"rewards": [{"kind": "regex", "pattern": r"answer is (\d+)", "column": "answer"},
                               {"kind": "reward_model", "rewardModel": "rm", "weight": 0.5}],
                   "numGenerations": 4, "maxCompletionLength": 32, "temperature": 0.7})
    run = parse_run(doc)
    recipe = build_recipe(run, 2, "/workspace")
    assert recipe.method == "grpo" and recipe.effective_loss_type == "dr_grpo" and recipe.training.beta == 0.02
    assert recipe.grpo.num_generations == 4 and recipe.grpo.max_completion_length == 32
    regex, rm = recipe.grpo.rewards
    assert regex.kind == "regex" and regex.pattern == r"answer is (\d+)" and regex.column == "answer"
    assert rm.model.endswith("/rm/final") and rm.weight == 0.5
    assert recipe.model.model_name_or_path.endswith("/sft/final")


@pytest.mark.parametrize("grpo, reward_stage, message", [
    (None, True, "spec.stages[2].grpo: method grpo needs a grpo section with rewards"),
    ({"rewards": [{"kind": "regex"}]}, True, "grpo.rewards[0].pattern: a regex reward needs a pattern"),
    ({"rewards": [{"kind": "format", "pattern": "(unclosed"}]}, True, "must be a regular expression that both"),
    ({"rewards": [{"kind": "regex", "pattern": "(?<=#### )(\\d+)"}]}, True,  # Python reads it, RE2 (the API server) not
     "grpo.rewards[0].pattern: '(?<=#### )(\\\\d+)' must be a regular expression that both Python's re (the trainer's) "
     "and RE2 (the API server's) read: no lookaround, backreferences or possessive quantifiers (RE2 has no '(?<=')"),
    ({"rewards": [{"kind": "reward_model", "rewardModel": "sft"}]}, True,
     "grpo.rewards[0].rewardModel: 'sft' must name an earlier reward stage; accepted: rm"),
    ({"rewards": [{"kind": "reward_model", "rewardModel": "rm"}]}, False,
     "'rm' must name an earlier reward stage; accepted: none (add a stage with method reward)"),
])
def test_a_bad_grpo_section_is_refused_naming_the_field(grpo, reward_stage, message):
    with pytest.raises(RunInvalid) as refused:
        parse_run(run_doc(grpo, reward_stage))
    assert message in str(refused.value)


def test_a_grpo_loss_type_is_checked_against_the_method_table():
    doc = run_doc({"rewards": [{"kind": "contains"}]})
    doc["spec"]["stages"][2]["training"]["lossType"] = "sigmoid"
    with pytest.raises(RunInvalid, match="'sigmoid' is not a grpo loss; accepted: dapo, grpo, dr_grpo"):
        parse_run(doc)


def test_the_crd_has_the_grpo_section_and_its_rules():
    stage = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "stages"]["items"]
    assert "grpo" in stage["properties"]["method"]["enum"]
    grpo = stage["properties"]["grpo"]["properties"]
    assert grpo["numGenerations"]["default"] == 8 and grpo["numGenerations"]["minimum"] == 2
    assert set(grpo["rewards"]["items"]["properties"]["kind"]["enum"]) == {
        "exact_match", "contains", "regex", "format", "reward_model", "judge"}
    rules = {r["rule"] for r in stage["x-kubernetes-validations"]}
    assert "self.method != 'grpo' || has(self.grpo)" in rules
