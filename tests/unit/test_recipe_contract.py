"""The trainer's contract as the operator uses it: one method table, one source of defaults,
every recipe field documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from alignment_operator.api import RunInvalid, parse_run
from alignment_operator.crd import build_crd
from alignment_operator.render.recipe import build_recipe
from alignment_trainer.recipe import METHODS, EvalArgs, ModelArgs, Recipe, TrainingArgs
from alignment_trainer.rules import recipe_rules, training_rules

ROOT = Path(__file__).resolve().parents[2]


def tiny_doc() -> dict:
    return yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())


def stage_schema(crd: dict) -> dict:
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"]["stages"]["items"]


def undocumented(model: type[BaseModel], prefix: str = "") -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if not field.description:
            missing.append(prefix + name)
        inner = [a for a in getattr(field.annotation, "__args__", (field.annotation,))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in inner:
            missing += undocumented(sub, f"{prefix}{name}.")
    return missing


def test_every_recipe_field_is_documented():
    assert undocumented(Recipe) == []


@pytest.mark.parametrize("method", [m for m, info in METHODS.items() if info.trains or info.writes])
def test_a_default_stage_renders_the_recipes_own_defaults(method):
    """A stage that sets nothing trains exactly like a hand-written recipe that sets nothing."""
    doc = {"apiVersion": "alignment.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r"},
           "spec": {"model": {"source": "org/base"},
                    "stages": [{"name": "s", "method": method, "datasets": [{"source": "d.jsonl"}]}]}}
    # A method with its own required section (grpo's rewards) gets the smallest one.
    section = {method: {"rewards": [{"kind": "contains"}]}} if method in ("grpo", "label") else {}
    doc["spec"]["stages"][0].update(section)
    if not METHODS[method].trains:  # a run needs a training stage: the data stage comes after one
        doc["spec"]["stages"].insert(0, {"name": "first", "method": "sft", "datasets": [{"source": "d.jsonl"}]})
    index = len(doc["spec"]["stages"]) - 1
    rendered = build_recipe(parse_run(doc), index, "/workspace")
    by_hand = Recipe(method=method, model=ModelArgs(model_name_or_path=rendered.model.model_name_or_path),
                     datasets=[{"path": "d.jsonl"}], output_dir=rendered.output_dir, **section)
    for name in ("grpo", "generate", "label"):
        assert getattr(rendered, name) == getattr(by_hand, name)
    assert rendered.training == by_hand.training
    assert rendered.model == by_hand.model
    assert rendered.training.learning_rate == METHODS[method].learning_rate
    assert rendered.training == TrainingArgs.model_validate(by_hand.training.model_dump())


def test_a_default_eval_stage_renders_the_recipes_eval_defaults():
    doc = tiny_doc()
    doc["spec"]["stages"][2]["eval"] = {}
    rendered = build_recipe(parse_run(doc), 2, "/workspace")
    assert rendered.eval.model_dump(exclude={"reference_model"}) == EvalArgs().model_dump(exclude={"reference_model"})


def test_a_new_row_in_the_method_table_reaches_the_crd_and_validation(monkeypatch):
    doc = tiny_doc()
    doc["spec"]["stages"][1]["method"] = "toy"
    doc["spec"]["stages"][1]["training"]["lossType"] = "toy_hinge"
    with pytest.raises(RunInvalid) as refused:
        parse_run(doc)
    assert "spec.stages[1].method: Value error, 'toy' is not a method; accepted: sft, dpo" in str(refused.value)
    assert "toy" not in stage_schema(build_crd())["properties"]["method"]["enum"]

    row = dataclasses.replace(METHODS["dpo"], loss_types=("toy_hinge",), learning_rate=3e-7)
    monkeypatch.setitem(METHODS, "toy", row)
    schema = stage_schema(build_crd())
    assert "toy" in schema["properties"]["method"]["enum"]
    assert "toy_hinge" in schema["properties"]["training"]["properties"]["lossType"]["enum"]
    rule = next(r for r in schema["x-kubernetes-validations"] if r["fieldPath"] == ".training.lossType")
    assert "(self.method == 'toy' && self.training.lossType in ['toy_hinge'])" in rule["rule"]
    run = parse_run(doc)
    recipe = build_recipe(run, 1, "/workspace")
    assert (recipe.method, recipe.training.loss_type, recipe.effective_loss_type) == ("toy", "toy_hinge", "toy_hinge")
    doc["spec"]["stages"][1]["training"].pop("learningRate")
    assert build_recipe(parse_run(doc), 1, "/workspace").training.learning_rate == 3e-7
    doc["spec"]["stages"][1]["training"]["lossType"] = "sigmoid"  # a dpo loss, not one of toy's
    with pytest.raises(RunInvalid, match=r"lossType: 'sigmoid' is not a toy loss; accepted: toy_hinge"):
        parse_run(doc)


# A stage broken in a run and the same stage broken in a recipe: (the run's stage fields, the recipe's, the run's
# refusal, the recipe's). Each pair is one rule of alignment_trainer.rules, worded in each document's names.
SAME_RULE = [
    (1, {"datasets": []}, {"datasets": []},
     "spec.stages[1].datasets: method 'dpo' needs at least one dataset",
     "datasets: method 'dpo' needs at least one dataset"),
    (1, {"testSplitSize": 0.1}, {"test_datasets": [{"path": "t.jsonl"}], "test_split_size": 0.1},
     "spec.stages[1].testSplitSize: give testDatasets or testSplitSize, not both",
     "test_split_size: give test_datasets or test_split_size, not both"),
    (1, {"testDatasets": [], "testSplitSize": 1.5}, {"test_split_size": 1.5},
     "spec.stages[1].testSplitSize: testSplitSize must be a fraction below 1 or a whole number of rows (got 1.5)",
     "test_split_size: test_split_size must be a fraction below 1 or a whole number of rows (got 1.5)"),
    (1, {"training": {"lossType": "cdpo"}}, {"training": {"loss_type": "cdpo"}},
     "spec.stages[1].training.labelSmoothing: 0.0 with lossType cdpo; cdpo needs an epsilon",
     "training.label_smoothing: 0.0 with loss_type cdpo; cdpo needs an epsilon"),
    (1, {"training": {"maxPromptLength": 600, "maxLength": 512}},
     {"training": {"max_prompt_length": 600, "max_length": 512}},
     "spec.stages[1].training.maxPromptLength: maxPromptLength must be below maxLength (600 is not below 512)",
     "training.max_prompt_length: max_prompt_length must be below max_length (600 is not below 512)"),
    (1, {"method": "grpo", "training": {}, "grpo": {"rewards": [{"kind": "regex"}]}},
     {"method": "grpo", "grpo": {"rewards": [{"kind": "regex"}]}},
     "spec.stages[1].grpo.rewards[0].pattern: a regex reward needs a pattern (a Python regex)",
     "grpo.rewards[0].pattern: a regex reward needs a pattern (a Python regex)"),
    (2, {"eval": {"mtBench": {"questions": {"source": "q.jsonl"}}}},
     {"method": "eval", "eval": {"mt_bench": {"questions": {"path": "q.jsonl"}}}},
     "spec.stages[2].eval.judge: eval.mtBench need an LLM judge; set eval.judge",
     "eval.judge: eval.mt_bench need an LLM judge; set eval.judge"),
    # Held by the recipe when it is read: stages/eval.check no longer repeats it.
    (2, {"eval": {"metrics": ["judge"]}}, {"method": "eval", "eval": {"metrics": ["judge"]}},
     "spec.stages[2].eval.judge: eval.metrics includes judge but no judge is configured",
     "eval.judge: eval.metrics includes judge but no judge is configured"),
]


@pytest.mark.parametrize("index, run_fields, recipe_fields, run_words, recipe_words", SAME_RULE)
def test_a_run_and_a_recipe_refuse_a_stage_by_the_same_rule(index, run_fields, recipe_fields, run_words,
                                                            recipe_words):
    doc = tiny_doc()
    stage = doc["spec"]["stages"][index]
    for key, value in run_fields.items():
        stage[key] = {**stage.get(key, {}), **value} if key == "training" and value else value
    with pytest.raises(RunInvalid) as refused:
        parse_run(doc)
    assert run_words in str(refused.value)
    recipe = {"method": "dpo", "model": {"model_name_or_path": "m"}, "datasets": [{"path": "d.jsonl"}],
              "output_dir": "/o", **recipe_fields}
    with pytest.raises(ValueError) as refused:
        Recipe.model_validate(recipe)
    assert recipe_words in str(refused.value)


def test_every_rule_a_recipe_holds_is_a_rule_of_the_crd():
    """The recipe's rules are the run's: each one's CEL sits on the CRD's stage (or its training)."""
    schema = stage_schema(build_crd())
    on_stage = {r["rule"] for r in schema["x-kubernetes-validations"]}
    on_training = {r["rule"] for r in schema["properties"]["training"]["x-kubernetes-validations"]}
    assert len(recipe_rules()) == 14 and len(training_rules()) == 1
    assert [r.cel for r in recipe_rules() if r.cel not in on_stage] == []
    assert [r.cel for r in training_rules() if r.cel not in on_training] == []
