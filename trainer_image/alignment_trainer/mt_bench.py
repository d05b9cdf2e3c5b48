"""MT-Bench (Zheng et al. 2023): two-turn answers graded 1-10 per turn by an LLM judge.

Single-answer grading as FastChat's llm_judge does it: turn 1 is graded on the first question
and answer; turn 2 on the whole two-turn conversation, focusing on the second answer; math,
reasoning and coding questions are graded against their reference answers when the dataset
gives them (FastChat's single-math-v1 prompts), the rest with single-v1. The rating is the
first [[N]] in the judge's answer, as FastChat reads it. Answers come from the model's own chat
template, greedy (FastChat samples writing and roleplay answers at temperature 0.7, so scores
are close to, not identical with, its numbers for the same model and judge).

Files in <output_dir>/mt_bench/: answers.jsonl (questions and both answers, written before any
judging, reused by a rerun of the same model), judgments.jsonl (the exact prompts sent, the judge's
raw answers, the ratings) and summary.json (means, the judge and package versions).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .judge import Judge, JudgeError
from .judge_prompts import MULTI, MULTI_MATH, SINGLE, SINGLE_MATH, parse_rating
from .recipe import MtBenchArgs
from .results import TaskProgress

log = logging.getLogger("alignment_trainer")

NEED_REFERENCE = ("math", "reasoning", "coding")
def questions_of(rows: list[dict], where: str, limit: int | None) -> list[dict]:
    """{id, category, turns [2], reference [0 or 2]} from HuggingFaceH4/mt_bench_prompts-shaped rows
    (prompt or turns: the user turns; reference: answers; prompt_id or question_id)."""
    out = []
    for i, row in enumerate(rows):
        turns = row.get("prompt", row.get("turns"))
        if not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, str) and t for t in turns):
            raise ValueError(f"eval.mt_bench.questions: {where} row {i + 1}: needs `prompt` (or `turns`), the two "
                             f"user turns as a list of two strings; got {str(turns)[:120]!r}")
        reference = [r for r in (row.get("reference") or []) if r]
        out.append({"id": row.get("prompt_id", row.get("question_id", i + 1)),
                    "category": row.get("category") or "uncategorized", "turns": turns, "reference": reference})
    return out[:limit] if limit else out


def answer(generate, questions: list[dict], folder: Path, model_path: str, max_new_tokens: int) -> list[dict]:
    """Both turns for every question (batched per turn), cached in answers.jsonl for a rerun."""
    path = folder / "answers.jsonl"
    key = {"model": model_path, "max_new_tokens": max_new_tokens}
    if path.is_file():
        cached = [json.loads(line) for line in path.read_text().splitlines()]
        if [(c["id"], c["turns"], c["key"]) for c in cached] == [(q["id"], q["turns"], key) for q in questions]:
            log.info("eval.mt_bench: reusing %d answers in %s", len(cached), path)
            return cached
    first = generate([[{"role": "user", "content": q["turns"][0]}] for q in questions], "mt_bench turn 1")
    second = generate([[{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": a["text"]},
                        {"role": "user", "content": q["turns"][1]}] for q, a in zip(questions, first)],
                      "mt_bench turn 2")
    records = [{**q, "answers": [a["text"], b["text"]], "answer_tokens": [a["tokens"], b["tokens"]], "key": key}
               for q, a, b in zip(questions, first, second)]
    folder.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return records


def judge_prompt(record: dict, turn: int) -> tuple[str, str, str]:
    """(template name, system, user) for grading one turn of one answered question."""
    with_reference = record["category"] in NEED_REFERENCE and len(record["reference"]) >= turn
    name = ("single-math-v1" if with_reference else "single-v1") + ("-multi-turn" if turn == 2 else "")
    system, template = {"single-v1": SINGLE, "single-math-v1": SINGLE_MATH, "single-v1-multi-turn": MULTI,
                        "single-math-v1-multi-turn": MULTI_MATH}[name]
    fields = {"question_1": record["turns"][0], "question_2": record["turns"][1], "answer_1": record["answers"][0],
              "answer_2": record["answers"][1],
              "ref_answer_1": (record["reference"] + [""])[0], "ref_answer_2": (record["reference"] + ["", ""])[1]}
    return name, system, template.format(**fields)


def grade(judge: Judge, records: list[dict], folder: Path) -> dict[str, float]:
    """Every turn graded; judgments.jsonl grows as it goes (a failure keeps what was judged)."""
    path = folder / "judgments.jsonl"
    path.unlink(missing_ok=True)
    scores: list[dict] = []
    total = 2 * len(records)
    report = TaskProgress("mt_bench judge", total)
    for record in records:
        for turn in (1, 2):
            name, system, user = judge_prompt(record, turn)
            answers, rating = [], None
            for _ in range(judge.retries):  # an answer without [[N]] is asked again, a bounded number of times
                text = judge.complete(system, user, max_tokens=2048)
                answers.append(text)
                rating = parse_rating(text)
                if rating is not None:
                    break
            row = {"id": record["id"], "category": record["category"], "turn": turn, "template": name,
                   "system": system, "prompt": user, "judgments": answers, "score": rating}
            with path.open("a") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if rating is None:
                raise JudgeError(
                    f"eval.mt_bench: judge {judge.args.model} gave no rating [[1-10]] for question {record['id']} turn "
                    f"{turn} in {len(answers)} tries; its last answer began {answers[-1][:200]!r}. The answers are kept "
                    f"in {folder / 'answers.jsonl'} (reused when the stage runs again), the judgments so far in {path}")
            scores.append(row)
            report(len(scores))
    return summarize(scores)


def summarize(scores: list[dict]) -> dict[str, float]:
    """FastChat's show_result: mean of all turn scores, per turn, per category (both turns)."""
    def mean(values):
        return sum(values) / len(values)

    out = {"mt_bench/score": mean([s["score"] for s in scores])}
    for turn in (1, 2):
        out[f"mt_bench/turn_{turn}"] = mean([s["score"] for s in scores if s["turn"] == turn])
    for category in sorted({s["category"] for s in scores}):
        out[f"mt_bench/{category}"] = mean([s["score"] for s in scores if s["category"] == category])
    out["mt_bench/questions"] = len(scores) // 2
    return out
