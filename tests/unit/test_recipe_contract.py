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
