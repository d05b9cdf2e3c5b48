"""eval.lmEval / eval.alpacaEval / eval.mtBench: what a user writes reaches the stage's recipe, the
sections' defaults are the recipe's, and a judged benchmark without a judge is refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alignment_operator.api import RunInvalid, parse_run
from alignment_operator.render.recipe import build_recipe
from alignment_trainer.recipe import AlpacaEvalArgs, DatasetArgs, JudgeArgs, LmEvalArgs, MtBenchArgs

ROOT = Path(__file__).resolve().parents[2]
JUDGE = {"baseUrl": "https://judge.example/v1", "model": "gpt-4", "apiKeySecretRef": {"name": "judge", "key": "k"}}


def with_eval(eval_section: dict) -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["spec"]["stages"][2]["eval"] = eval_section
    return doc


def test_sections_render_into_the_recipe_with_the_recipes_defaults():
    doc = with_eval({"metrics": [], "judge": JUDGE,
                     "lmEval": {"tasks": ["ifeval", "/data/tasks/mine.yaml"], "dataFiles": {"ifeval": "/data/if.jsonl"}},
                     "alpacaEval": {"referenceOutputs": {"source": "tatsu-lab/alpaca_eval",
                                                         "config": "alpaca_eval_gpt4_baseline", "split": "eval"}},
                     "mtBench": {"questions": {"source": "HuggingFaceH4/mt_bench_prompts"}}})
    ev = build_recipe(parse_run(doc), 2, "/workspace").eval
    assert ev.metrics == []
    assert ev.lm_eval == LmEvalArgs(tasks=["ifeval", "/data/tasks/mine.yaml"], data_files={"ifeval": "/data/if.jsonl"})
    assert ev.alpaca_eval == AlpacaEvalArgs(reference_outputs=DatasetArgs(
        path="tatsu-lab/alpaca_eval", name="alpaca_eval_gpt4_baseline", split="eval"))
    assert ev.mt_bench == MtBenchArgs(questions=DatasetArgs(path="HuggingFaceH4/mt_bench_prompts"))
    # The key stays a secretKeyRef: the recipe names only the variable the pod gets it in.
    assert ev.judge == JudgeArgs(base_url="https://judge.example/v1", model="gpt-4", api_key_env="JUDGE_API_KEY")


@pytest.mark.parametrize("section", [
    {"mtBench": {"questions": {"source": "HuggingFaceH4/mt_bench_prompts"}}},
    {"alpacaEval": {"referenceOutputs": {"source": "tatsu-lab/alpaca_eval"}}}])
def test_a_judged_benchmark_without_a_judge_is_refused(section):
    with pytest.raises(RunInvalid, match=r"eval\.judge: eval\.(mtBench|alpacaEval) need an LLM judge"):
        parse_run(with_eval(section))


def test_lm_eval_needs_a_task():
    with pytest.raises(RunInvalid, match="lmEval.tasks"):
        parse_run(with_eval({"lmEval": {"tasks": []}}))
