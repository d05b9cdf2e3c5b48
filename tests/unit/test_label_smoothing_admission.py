"""training.labelSmoothing is refused where the stage's loss would ignore it (issue 24, item 6):
by `alignctl validate` and recipe validation here, by the CRD's CEL rule on a real API server
(tests/cluster/test_crd_server.py applies tests/manifests/bad/label-smoothing-ignored.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alignment_operator.api import RunInvalid, parse_run
from alignment_operator.crd import build_crd
from alignment_operator.render.recipe import build_recipe
from alignment_trainer.recipe import LABEL_SMOOTHING_LOSSES, METHODS, Recipe

ROOT = Path(__file__).resolve().parents[2]
ACCEPTED = "only the losses cdpo, robust, exo_pair, aot, aot_unpaired read it"


def run_with(method: str, **training) -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    stage = doc["spec"]["stages"][1]
    stage["method"] = method
    stage["training"] = {k: v for k, v in stage.get("training", {}).items() if k != "lossType"} | training
    if method in ("grpo", "label"):
        stage[method] = {"rewards": [{"kind": "contains"}]}
    return doc


def refusal(doc: dict) -> str:
    with pytest.raises(RunInvalid) as err:
        parse_run(doc)
    return str(err.value)


@pytest.mark.parametrize("method, loss", [(m, lt) for m, info in METHODS.items() if info.trains
                                          for lt in (None, *info.loss_types)])
def test_label_smoothing_is_accepted_exactly_where_the_loss_reads_it(method, loss):
    training = {"labelSmoothing": 0.2} | ({"lossType": loss} if loss else {})
    doc = run_with(method, **training)
    if loss in LABEL_SMOOTHING_LOSSES:
        assert build_recipe(parse_run(doc), 1, "/workspace").training.label_smoothing == 0.2
        return
    message = refusal(doc)
    effective = loss or METHODS[method].default_loss_type
    assert (f"spec.stages[1].training.labelSmoothing: 0.2 is ignored by method {method} with "
            f"{f'lossType {effective}' if effective else 'no lossType'}: {ACCEPTED}") in message


def test_a_hand_written_recipe_is_refused_the_same_way():
    with pytest.raises(ValueError, match=r"training.label_smoothing: 0.1 is ignored by method kto with loss_type kto: "
                                         + ACCEPTED):
        Recipe(method="kto", model={"model_name_or_path": "m"}, datasets=[{"path": "d.jsonl"}], output_dir="o",
               training={"label_smoothing": 0.1})
    recipe = Recipe(method="dpo", model={"model_name_or_path": "m"}, datasets=[{"path": "d.jsonl"}], output_dir="o",
                    training={"label_smoothing": 0.1, "loss_type": "robust"})
    assert recipe.training.label_smoothing == 0.1


@pytest.mark.parametrize("loss", ["cdpo", "exo_pair"])
def test_losses_that_need_an_epsilon_refuse_zero(loss):
    message = refusal(run_with("dpo", lossType=loss))
    assert f"spec.stages[1].training.labelSmoothing: 0.0 with lossType {loss}; {loss} needs an epsilon" in message


def test_the_cel_rules_read_the_same_loss_list():
    stage = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "stages"]["items"]
    rules = [r for r in stage["x-kubernetes-validations"] if r.get("fieldPath") == ".training.labelSmoothing"]
    ignored = next(r for r in rules if "labelSmoothing == 0.0" in r["rule"])
    assert f"self.training.lossType in {list(LABEL_SMOOTHING_LOSSES)}" in ignored["rule"]
    assert ": false)" in ignored["rule"], "no method's default loss reads it, so an unset lossType refuses"
    assert "training.labelSmoothing" in ignored["message"] and "cdpo, robust, exo_pair, aot, aot_unpaired" in (
        ignored["message"])
    needed = next(r for r in rules if "labelSmoothing > 0.0" in r["rule"])
    assert "['cdpo', 'exo_pair']" in needed["rule"]
