"""The eval stage's benchmarks on the tiny model, offline: lm-eval tasks (a custom task on local
JSON, IFEval on a local prompt file, through lm-eval's own checkers), MT-Bench and AlpacaEval 2
graded by a local OpenAI-compatible fake judge whose verdicts are known, so the numbers are too.
The judge key never reaches a file, an event or the log; a broken judge fails the stage after
bounded retries and the generated answers stay for the next attempt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

API_KEY = "sk-bench-9f8e7d6c5b4a3210"
REPORTED = "judge-1-2026-01-01"  # what the fake endpoint says it is (differs from the name asked for)


def write_json(path: Path, rows, lines: bool = True) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if lines else json.dumps(rows))
    return str(path)


def sft_model(sft_run) -> str:
    return str(Path(sft_run["output_dir"]) / "final")


# ---------------------------------------------------------------------------- lm-eval

def test_lm_eval_custom_task_and_ifeval_on_local_files(tmp_path, sft_run, tiny_model, kit):
    subjects = kit.test_subjects
    # A custom multiple-choice task on local JSON: which reply does the model find likelier?
    mc = write_json(tmp_path / "mc.jsonl", [{"question": f"Tell me about {s}.", "choices": [
        f"{s} are wonderful, and I am happy to tell you about {s}.", "Go away."], "gold": 0} for s in subjects])
    (tmp_path / "helpful.yaml").write_text(
        "task: helpful_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + mc + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    # IFEval rows in google/IFEval's layout. Outcomes fixed by the instructions alone, whatever the model
    # says in 24 tokens: fewer than 1000 words and 100 sentences holds; JSON and a fixed ending do not.
    words = {"relation": "less than", "num_words": 1000}
    ifeval = write_json(tmp_path / "ifeval.jsonl", [
        {"key": 1, "prompt": "Tell me about coffee.", "instruction_id_list": [
            "length_constraints:number_words", "length_constraints:number_sentences"],
         "kwargs": [words, {"relation": "less than", "num_sentences": 100}]},
        {"key": 2, "prompt": "Tell me about chess.", "instruction_id_list": ["detectable_format:json_format"],
         "kwargs": [{}]},
        {"key": 3, "prompt": "Tell me about snow.", "instruction_id_list": [
            "length_constraints:number_words", "startend:end_checker"],
         "kwargs": [words, {"end_phrase": "Is there anything else I can help with?"}]}])
    path = kit.write_recipe(tmp_path, "eval", sft_model(sft_run), [], training={"per_device_eval_batch_size": 4},
                            eval={"metrics": [], "reference_model": tiny_model, "lm_eval": {
                                "tasks": [str(tmp_path / "helpful.yaml"), "ifeval"],
                                "data_files": {"ifeval": ifeval}, "max_gen_toks": 24, "reference": True}})
    result = kit.run_in_process(path)
    # Trained on such answers, the SFT model prefers the helpful reply; lm-eval scored it.
    assert result["helpful_choice/acc"] >= 5 / 6, result
    assert 0.0 <= result["reference_helpful_choice/acc"] <= 1.0
    assert "helpful_choice/acc_stderr" in result
    # IFEval through lm-eval's checkers (punkt_tab for the sentence count, offline).
    for level in ("strict", "loose"):
        assert result[f"ifeval/prompt_level_{level}_acc"] == pytest.approx(1 / 3), result
        assert result[f"ifeval/inst_level_{level}_acc"] == pytest.approx(3 / 5), result
    folder = tmp_path / "out" / "lm_eval"
    assert result["files"]["lm_eval"] == str(folder)
    saved = json.loads((folder / "model_results.json").read_text())
    assert saved["package_versions"]["lm_eval"] == result["provenance"]["lm_eval"]
    samples = [json.loads(x) for x in (folder / "model_samples_ifeval_local.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["resps"] for s in samples)


def test_lm_eval_refuses_what_it_cannot_run(tmp_path, tiny_model, kit):
    from alignment_trainer.recipe import LmEvalArgs
    from alignment_trainer.lm_eval_task import task_names

    with pytest.raises(ValueError, match="data_files: \\['gsm8k'\\] are not among"):
        task_names(LmEvalArgs(tasks=["ifeval"], data_files={"gsm8k": "x.jsonl"}), tmp_path)
    with pytest.raises(ValueError, match="missing.yaml is not a file"):
        task_names(LmEvalArgs(tasks=[str(tmp_path / "missing.yaml")]), tmp_path)
    path = kit.write_recipe(tmp_path, "eval", tiny_model, [], eval={"metrics": [], "lm_eval": {"tasks": ["no_such"]}})
    with pytest.raises(ValueError, match="no_such.*neither lm-eval tasks"):
        kit.run_in_process(path)


# ---------------------------------------------------------------------------- judged benchmarks

def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def grade(body: dict) -> str | tuple[str, dict]:
    """MT-Bench: a turn graded against a reference gets 7, any other 1 + len(answer) % 10. AlpacaEval:
    all probability on the longer output."""
    text = "\n".join(m["content"] for m in body["messages"])
    if "## Best Model Identifier" in text:  # AlpacaEval 2's prompt: outputs "m" then "M"
        m = between(text, '"model_identifier": "m",\n        "output": """', '"""')
        big_m = between(text, '"model_identifier": "M",\n        "output": """', '"""')
        best = "m" if len(m) > len(big_m) else "M"
        tops = [{"token": t, "logprob": 0.0 if t == best else -30.0, "bytes": None} for t in ("m", "M")]
        return best, {"content": [{"token": best, "logprob": 0.0, "bytes": None, "top_logprobs": tops}]}
    if "[[rating]]" in text:  # MT-Bench
        if "[The Start of Assistant's Answer]" in text:
            answer = between(text, "[The Start of Assistant's Answer]\n", "\n[The End of Assistant's Answer]")
        else:
            answer = text.rsplit("### Assistant A:\n", 1)[1].split("\n\n<|The End of Assistant A's", 1)[0]
        rating = 7 if "Reference Answer" in text else 1 + len(answer) % 10
        return f"The answer is fine. Rating: [[{rating}]]"
    return "m"


@pytest.fixture
def judge(fake_judge):
    return fake_judge(grade, api_key=API_KEY, reported=REPORTED)


QUESTIONS = [
    {"prompt_id": 81, "category": "writing", "prompt": ["Tell me about coffee.", "Tell me about chess."],
     "reference": []},
    {"prompt_id": 111, "category": "math", "prompt": ["Tell me about maps.", "Tell me about kites."],
     "reference": ["Maps are flat.", "Kites fly."]},
    {"prompt_id": 131, "category": "reasoning", "prompt": ["Tell me about snow.", "Tell me about bridges."],
     "reference": []},
]
# Reference outputs: four curt ones the model's answers outgrow, two long ones they do not.
LONG = "A very long and detailed reference answer that goes on and on about the subject in depth. " * 3
REFERENCES = [{"instruction": f"Tell me about {s}.", "output": "No." if i < 4 else LONG, "generator": "gpt4_turbo"}
              for i, s in enumerate(["coffee", "chess", "snow", "bridges", "kites", "maps"])]


def judged_recipe(kit, tmp_path, model, judge_url, **judge):
    questions = write_json(tmp_path / "mt_bench.jsonl", QUESTIONS)
    references = write_json(tmp_path / "alpaca_refs.json", REFERENCES, lines=False)
    return kit.write_recipe(tmp_path, "eval", model, [], training={"per_device_eval_batch_size": 8}, eval={
        "metrics": [], "reference_model": model,
        "judge": {"base_url": judge_url, "model": "judge-1", **judge},
        "mt_bench": {"questions": {"path": questions}, "max_new_tokens": 24},
        "alpaca_eval": {"reference_outputs": {"path": references}, "max_new_tokens": 24,
                        "lc_glm": "length_controlled_minimal"}})


@pytest.fixture
def alpaca_hub_cache(tmp_path, monkeypatch):
    """alpaca-eval's GLM reads df_gamed.csv (instruction difficulty by index) from the Hub; offline, a
    cache holding one for our six instructions (the minimal GLM does not use the difficulty)."""
    from alignment_trainer.alpaca_eval import _pkg_resources

    _pkg_resources()
    import alpaca_eval.constants

    repo = tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "df_gamed.csv").write_text(
        "model,index,instruction_difficulty,preference,std_delta_len,not_gamed_baseline\n"
        + "".join(f"gamed,{i},0.0,0.5,0.0,False\n" for i in range(6)))
    monkeypatch.setattr(alpaca_eval.constants, "DEFAULT_CACHE_DIR", str(tmp_path / "hub"))


def test_mt_bench_and_alpaca_eval_give_the_fake_judges_numbers(tmp_path, sft_run, kit, judge, monkeypatch,
                                                                 capfd, alpaca_hub_cache):
    monkeypatch.setenv("JUDGE_API_KEY", API_KEY)
    result = kit.run_in_process(judged_recipe(kit, tmp_path, sft_model(sft_run), judge.url))
    out = tmp_path / "out"

    # MT-Bench: both turns of each question answered with the chat template, each graded.
    answers = [json.loads(x) for x in (out / "mt_bench" / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == [81, 111, 131] and all(len(a["answers"]) == 2 for a in answers)
    expected = {a["category"]: [7.0, 7.0] if a["category"] == "math" else [1 + len(x) % 10 for x in a["answers"]]
                for a in answers}
    for category, scores in expected.items():
        assert result[f"mt_bench/{category}"] == pytest.approx(sum(scores) / 2), (category, result)
    all_scores = [s for v in expected.values() for s in v]
    assert result["mt_bench/score"] == pytest.approx(sum(all_scores) / 6)
    assert result["mt_bench/turn_1"] == pytest.approx(sum(v[0] for v in expected.values()) / 3)
    judgments = [json.loads(x) for x in (out / "mt_bench" / "judgments.jsonl").read_text().splitlines()]
    assert [j["template"] for j in judgments] == ["single-v1", "single-v1-multi-turn", "single-math-v1",
                                                  "single-math-v1-multi-turn", "single-v1", "single-v1-multi-turn"]
    assert "Kites fly." in judgments[3]["prompt"] and judgments[0]["judgments"][0].startswith("The answer")

    # AlpacaEval 2: a judge that always takes the longer output wins the model the curt references only.
    outputs = json.loads((out / "alpaca_eval" / "model_outputs.json").read_text())
    wins = [1.0 if len(o["output"]) > len(r["output"]) else 0.0 for o, r in zip(outputs, REFERENCES)]
    assert wins == [1, 1, 1, 1, 0, 0], outputs
    assert result["alpaca_eval/win_rate"] == pytest.approx(100 * sum(wins) / 6)
    assert result["alpaca_eval/discrete_win_rate"] == pytest.approx(100 * sum(wins) / 6)
    assert result["alpaca_eval/n_total"] == 6 and result["alpaca_eval/standard_error"] > 0
    # The length-controlled win rate is alpaca-eval's GLM on these annotations; length explains them all.
    from alpaca_eval.metrics import get_length_controlled_winrate

    annotations = json.loads((out / "alpaca_eval" / "annotations.json").read_text())
    assert len(annotations) == 6 and all(a["preference"] in (1.0, 2.0) for a in annotations)
    lc = get_length_controlled_winrate(annotations, glm_name="length_controlled_minimal",
                                       save_weights_dir=None)["length_controlled_winrate"]
    assert result["alpaca_eval/length_controlled_winrate"] == pytest.approx(lc)
    # Not the raw rate: the model's wins come with small length gaps, its losses with large ones, so at an
    # equal length the GLM expects it to win (measured 98.3 on these lengths).
    assert lc != pytest.approx(result["alpaca_eval/win_rate"], abs=1.0)
    assert result["alpaca_eval/lc_standard_error"] >= 0

    # Provenance: the judge asked for, the model the endpoint reported, package versions.
    p = result["provenance"]
    assert p["judge_model"] == "judge-1" and p["judge_reported_model"] == REPORTED
    assert set(p["versions"]) >= {"torch", "transformers"}
    summary = json.loads((out / "alpaca_eval" / "summary.json").read_text())
    assert summary["judge_reported_model"] == REPORTED and "alpaca_eval" in summary["versions"]
    assert result["files"]["mt_bench"] == str(out / "mt_bench")

    # The key: sent as the bearer token, written nowhere, printed nowhere (events and log included).
    written = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix != ".png")
    captured = capfd.readouterr()
    assert '{"event": "done"' in captured.out
    assert API_KEY not in written + captured.out + captured.err + json.dumps(result)


@pytest.mark.parametrize("mode,message", [("garbage", "unexpected answer from"), ("slow", "no answer from .* within")])
def test_a_broken_judge_fails_after_bounded_retries_keeping_the_answers(tmp_path, sft_run, kit, judge,
                                                                         monkeypatch, mode, message, alpaca_hub_cache):
    from alignment_trainer.__main__ import classify
    from alignment_trainer.judge import JudgeError

    monkeypatch.setenv("JUDGE_API_KEY", API_KEY)
    judge.mode = mode
    path = judged_recipe(kit, tmp_path, sft_model(sft_run), judge.url, timeout_seconds=0.5, max_retries=2)
    with pytest.raises(JudgeError, match=message) as err:
        kit.run_in_process(path)
    assert "after 2 tries" in str(err.value) and API_KEY not in str(err.value)
    assert len(judge.requests) == 2  # bounded: the first grading, tried twice, then the stage stops
    assert classify(err.value)["reason"] == "Error"  # retryable: the next attempt reuses the answers
    answers = tmp_path / "out" / "mt_bench" / "answers.jsonl"
    assert len(answers.read_text().splitlines()) == 3
    kept = answers.stat().st_mtime_ns
    judge.mode, judge.requests = "ok", []
    result = kit.run_in_process(path)
    assert answers.stat().st_mtime_ns == kept and result["mt_bench/questions"] == 3
