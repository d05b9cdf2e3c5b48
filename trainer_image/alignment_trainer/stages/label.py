"""Score a generate stage's completions and write feedback: the second half of an online round.

    python -m alignment_trainer recipe.yaml          # recipe.method: label

recipe.datasets hold generate output (one row per prompt: `prompt`, `completions`, and the prompt
row's other columns, e.g. the reference `answer`). Each completion's score is the weighted sum of
recipe.label.rewards (rewards.py, as grpo's) (rules against a reference column, a format
rule, a reward stage's final/). Written, as HALOs' label step writes them, in the layouts the
preference stages read:

    feedback pairwise   <output_dir>/final/feedback.jsonl   {"prompt", "chosen", "rejected",
                        "score_chosen", "score_rejected"}: per prompt the best completion against
                        the worst; a prompt whose best beats its worst by label.min_margin or
                        less (all score the same, at least) gives no pair
    feedback binary     {"prompt", "completion", "label", "score"}: every completion, desirable when
                        its score is above label.threshold, undesirable below (equal: skipped)

Empty completions are skipped (no stage trains on an empty reply). An unfinished completion (generate's
`stopped` false: cut at max_completion_length) is never chosen nor desirable: the next stage would
append an end-of-turn to it and teach the policy to stop mid-sentence. It may still be the rejected
reply of a pair or an undesirable one. A prompt none of whose completions finished gives no pair
(unfinished_prompts); unfinished_best counts the prompts whose best-scoring completion was cut short; unfinished completions that scored above the threshold are left out
(unfinished_above_threshold); unfinished_completions counts them all. Rows without a `stopped` column
(feedback written by hand) count as finished and are counted in completions_without_stopped.
result.json: the mean score of
all completions (mean_reward: the policy's mean reward on these prompts) and of each reward
(rewards/<name>/mean), the mean best-of-n score, how many pairs or labels were written and how many
prompts were ties. A reward that raises fails the stage naming it (rewards.RewardError);
feedback with no row at all fails as a DataError saying what to change.
"""

from __future__ import annotations

import logging
import os
import time

from ..data import DataError, describe
from ..prompts import load_generations
from ..recipe import Recipe
from ..results import emit, write_data_stage
from ..rewards import build_rewards, reference_columns
from ..training import setup_stage, stage_label

log = logging.getLogger("alignment_trainer")


def score_rows(rows: list[dict], funcs, weights, columns: set[str],
               batch: int = 8) -> tuple[list[list[float]], dict[str, float]]:
    """Each row's completions' total scores, `batch` prompts per reward call (a reward model scores
    them together); and each reward's mean over all completions (rewards/<name>/mean, as grpo logs)."""
    scores: list[list[float]] = []
    sums = [0.0] * len(funcs)
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        flat = [(r, c) for r in chunk for c in r["completions"]]
        if not flat:
            scores += [[] for _ in chunk]
            continue
        prompts = [r["prompt"] for r, _ in flat]
        completions = [[{"role": "assistant", "content": c}] for _, c in flat]
        cols = {col: [r[col] for r, _ in flat] for col in columns}
        parts = [[float(v) for v in f(prompts=prompts, completions=completions, **cols)] for f in funcs]
        sums = [acc + sum(p) for acc, p in zip(sums, parts)]
        values = [sum(w * p[j] for w, p in zip(weights, parts)) for j in range(len(flat))]
        at = 0
        for r in chunk:
            scores.append(values[at:at + len(r["completions"])])
            at += len(r["completions"])
    n = max(sum(len(s) for s in scores), 1)
    return scores, {f"rewards/{f.__name__}/mean": total / n for f, total in zip(funcs, sums)}


def finished(row: dict, j: int) -> bool:
    """Whether completion j ended with the end-of-turn token (unknown counts as finished)."""
    return row["stopped"][j] is not False


def pairwise(rows: list[dict], scores: list[list[float]], min_margin: float = 0.0) -> tuple[list[dict], dict]:
    """Best finished completion against the worst one per prompt (the first of equals, in sampling
    order); prompts with no finished completion, or whose best finished one beats their worst by
    min_margin or less (ties at least), are skipped."""
    out, ties, no_finished, passed_over = [], 0, 0, 0
    for row, row_scores in zip(rows, scores):
        kept = [(s, c, finished(row, j)) for j, (s, c) in enumerate(zip(row_scores, row["completions"]))
                if c.strip()]
        done = [k for k in kept if k[2]]
        passed_over += bool(kept) and not max(kept, key=lambda k: k[0])[2]  # the top score was cut short
        if kept and not done:
            no_finished += 1
            continue
        if len(kept) < 2 or max(s for s, _, _ in done) - min(s for s, _, _ in kept) <= min_margin:
            ties += 1
            continue
        best = max(done, key=lambda k: k[0])
        worst = min(kept, key=lambda k: k[0])
        out.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": best[1]}],
                    "rejected": [{"role": "assistant", "content": worst[1]}],
                    "score_chosen": best[0], "score_rejected": worst[0]})
    margins = [r["score_chosen"] - r["score_rejected"] for r in out]
    return out, {"pairs": len(out), "tied_prompts": ties, "unfinished_prompts": no_finished,
                 "unfinished_best": passed_over,
                 "mean_score_margin": sum(margins) / len(margins) if margins else None}


def binary(rows: list[dict], scores: list[list[float]], threshold: float) -> tuple[list[dict], dict]:
    """Every finished completion labelled by its score against threshold; an unfinished one only
    when it is undesirable (above the threshold it is left out, counted)."""
    out, at_threshold, unfinished_above = [], 0, 0
    for row, row_scores in zip(rows, scores):
        for j, (s, c) in enumerate(zip(row_scores, row["completions"])):
            if not c.strip():
                continue
            if s == threshold:
                at_threshold += 1
                continue
            if s > threshold and not finished(row, j):
                unfinished_above += 1
                continue
            out.append({"prompt": row["prompt"], "completion": [{"role": "assistant", "content": c}],
                        "label": s > threshold, "score": s})
    desirable = sum(r["label"] for r in out)
    return out, {"desirable": desirable, "undesirable": len(out) - desirable, "at_threshold": at_threshold,
                 "unfinished_above_threshold": unfinished_above}


def run(recipe: Recipe) -> dict | None:
    done = setup_stage(recipe)
    if done is not None:
        return done
    if int(os.environ.get("RANK", "0")) != 0:  # one process scores; the others have nothing to do
        return None
    lab = recipe.label
    columns = reference_columns(lab.rewards)

    # Completions first: bad input fails in seconds, before a reward model loads.
    rows = load_generations(recipe, columns)
    where = ", ".join(describe(d) for d in recipe.datasets)
    if not rows:
        raise DataError(f"{stage_label(recipe)}: no rows in {where}; a label stage reads a generate stage's "
                        "completions (datasets: [{stage: <generate stage>}])")
    start = time.perf_counter()
    emit("start", method=recipe.method, stage=recipe.stage_name, prompts=len(rows))
    funcs = build_rewards(recipe, lab.rewards, section="label")
    scores, per_reward = score_rows(rows, funcs, [r.weight for r in lab.rewards], columns)
    flat = [s for row in scores for s in row]

    feedback, counts = (pairwise(rows, scores, lab.min_margin) if lab.feedback == "pairwise"
                        else binary(rows, scores, lab.threshold))
    flags = [x for row in rows for x in row["stopped"]]
    counts.update(unfinished_completions=sum(x is False for x in flags),
                  completions_without_stopped=sum(x is None for x in flags))
    if counts["completions_without_stopped"]:
        log.warning("%s: %d completions have no `stopped` flag (not a generate stage's output?); they count as "
                    "finished and may be chosen", stage_label(recipe), counts["completions_without_stopped"])
    if not feedback:
        what = (f"no prompt's best completion beats its worst by more than label.min_margin {lab.min_margin} "
                f"(or they were empty; only a finished completion is chosen and {counts['unfinished_prompts']} "
                "prompts had none), so there is no pair"
                if lab.feedback == "pairwise" else f"no completion scored above or below threshold {lab.threshold}")
        raise DataError(f"{stage_label(recipe)}: {what} in {where}; sample more or more varied completions "
                        "(generate.numGenerations, temperature), let them finish (generate.maxCompletionLength) "
                        "or check label.rewards"
                        + ("" if lab.feedback == "pairwise" else " and label.threshold"))
    log.info("%s: %d prompts, %d completions, mean score %.4f -> %d %s rows", stage_label(recipe), len(rows),
             len(flat), sum(flat) / max(len(flat), 1), len(feedback), lab.feedback)
    return write_data_stage(recipe, feedback, {
        "prompts": len(rows), "completions": len(flat), "feedback": lab.feedback,
        "mean_reward": sum(flat) / len(flat) if flat else None,
        "best_of_n_reward": (sum(max(s) for s in scores if s) / sum(1 for s in scores if s)) if flat else None,
        **per_reward, **counts, "label_runtime_s": round(time.perf_counter() - start, 3),
    })
