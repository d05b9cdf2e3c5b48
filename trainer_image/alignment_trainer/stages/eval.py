"""Evaluation: how the trained model compares with its reference on held-out data.

    python -m alignment_trainer recipe.yaml          # recipe.method: eval

recipe.model is the model evaluated (the final/ of the stage the eval stage starts from),
recipe.eval.reference_model the one it is compared against (by default the model that stage
started from: the DPO model against its SFT model), recipe.datasets the held-out rows.
recipe.eval.metrics picks what is measured, all into result.json (flat numbers, which the
operator copies into status.evaluation):

  preference   prompt/chosen/rejected rows. preference_accuracy: the fraction of pairs whose
               implicit reward beta*(logp_model - logp_ref) is higher for chosen than for
               rejected (DPO's rewards/accuracies, held out), reward_margin/chosen/rejected;
               logp_accuracy and reference_logp_accuracy: each model on its own, how often
               logp(chosen) > logp(rejected): "the DPO model prefers chosen X, the SFT model Y".
  loss         eval_loss and perplexity over completion tokens only (assistant turns, the
               completion, or the chosen response), for the model and the reference.
  generations  greedy answers (stopping at EOS) to recipe.eval.prompts, else the held-out
               prompts, by both models -> generations.jsonl; generation_stop_rate.
  judge        pairwise LLM-judge win rate of the model against the reference (judge.py).

and, each when its section is set (benchmarks model cards report, by the libraries people trust):
  lm_eval      lm-evaluation-harness tasks (IFEval, GSM8K, custom YAML tasks): lm_eval_task.py
  alpaca_eval  AlpacaEval 2 win rate / length-controlled win rate via alpaca-eval: alpaca_eval.py
  mt_bench     MT-Bench 1-10 grades per turn and category: mt_bench.py
Every judged result names the judge model, the model id the endpoint reported and the package
versions (result.json "provenance"), and keeps the prompts, answers and raw judgments on the volume.

curves.png beside result.json plots the training curves of the run's other stages.

run() reads top to bottom: check, data, models, then one small function per measurement, each
returning its metrics; the answers both models gave live in generations.jsonl's records.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from .. import card as model_card
from .. import eval_rows as rows_of
from ..data import load_stage_data
from ..model import load_model, load_tokenizer
from ..prompts import load_prompt_set, load_prompts, question
from ..recipe import EvalArgs, Recipe, TrainingArgs
from ..refcache import model_identity, reference_scores
from ..results import TaskProgress, emit, push_to_hub, write_result
from ..rewards import build_rewards, reference_columns, total_reward
from ..sampling import generate, ignored_generation_settings

log = logging.getLogger("alignment_trainer")


def run(recipe: Recipe) -> dict:
    # Setup
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ev = recipe.eval
    check(ev)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}  # launched on several processes (a GPU node's default): the first one evaluates
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference_path = ev.reference_model or recipe.model.model_name_or_path
    emit("start", method="eval", stage=recipe.stage_name, model=recipe.model.model_name_or_path,
         reference=reference_path)

    # Data: held-out rows, then the prompt sets (fails before any model is loaded)
    pairs, texts, prompts, rewarded = read_data(recipe)

    # Models: the one evaluated and its reference, one tokenizer (the evaluated model's)
    m = load_models(recipe, reference_path)

    # Measurements, each into metrics; records: both models' answers to the prompt set
    metrics: dict[str, float] = {}
    if "preference" in ev.metrics and pairs:
        metrics.update(preference(m, pairs, recipe.training))
    if "loss" in ev.metrics:
        metrics.update(held_out_loss(m, texts))
    records: list[dict] = []
    if "generations" in ev.metrics or "judge" in ev.metrics:
        records = answers_of_both(m, prompts, ev.max_new_tokens)
        metrics.update(generation_metrics(records))
    if ev.reward_model:
        metrics.update(reward_model_scores(ev.reward_model, pairs, records, m.batch))
    if rewarded:
        metrics.update(mean_rewards(recipe, m, rewarded))
    if "judge" in ev.metrics:
        metrics.update(judge_win_rate(ev, records))
    if records:
        with (out / "generations.jsonl").open("w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    # Benchmarks: lm-eval tasks, AlpacaEval 2, MT-Bench
    files, provenance = benchmarks(recipe, m, out, metrics)

    # Curves of the run's training stages, and the results
    from ..plots import plot_run_curves

    curves = plot_run_curves(out.parent, out / "curves.png", exclude=[out.name])
    result = {"method": "eval", "stage": recipe.stage_name, "checkpoint": recipe.model.model_name_or_path,
              "reference_model": reference_path, "pairs": len(pairs), **metrics,
              "generations": str(out / "generations.jsonl") if records else None,
              # the checkpoint's generation_config settings the answers were not generated with
              "generation_config_ignored": ignored_generation_settings(m.model) or None,
              "curves": str(curves) if curves else None,
              "files": files or None, "provenance": {**provenance, "versions": _versions()} if provenance else None}
    # The evaluated model's card with these results (model-index), beside them; pushed with that model
    card = model_card.eval_card(recipe, result)
    card.save(out / "README.md")
    url = push_to_hub(recipe, Path(recipe.model.model_name_or_path), card)
    if url:
        result["hub_url"] = url
    write_result(recipe, result)
    emit("done", **{k: v for k, v in result.items() if v is not None})
    return result


def check(ev: EvalArgs | None) -> None:
    """What the eval section needs before anything is read. What its measurements need (a judge for judge,
    alpacaEval and mtBench; prompts for rewards) the recipe refused when it was read (alignment_trainer.rules,
    the same rules the AlignmentRun's admission holds)."""
    if ev is None:
        raise ValueError("eval: the eval method needs an eval section (metrics, reference_model, ...)")


def _versions() -> dict[str, str]:
    return {p: version(p) for p in ("torch", "transformers")}


# ---------------------------------------------------------------------------- data and models

def read_data(recipe: Recipe) -> tuple[list[dict], list, list[list[dict]], list[dict]]:
    """(pairs, texts, prompts, rewarded): the held-out split as eval_rows.split_rows cuts it, the
    prompts answered (eval.prompts, else the held-out ones), and eval.rewards' prompts with the
    reference columns the rewards read."""
    ev, t = recipe.eval, recipe.training
    pairs, texts, prompts = [], [], []
    if recipe.datasets and (set(ev.metrics) & {"preference", "loss"} or ev.prompts is None and ev.metrics):
        data = load_stage_data(recipe)
        held_out = data["test"] if "test" in data and len(data["test"]) else data["train"]
        pairs, texts, prompts = rows_of.split_rows(held_out)
    elif set(ev.metrics) & {"preference", "loss"} or (ev.metrics and ev.prompts is None):
        raise ValueError(f"datasets: eval.metrics {ev.metrics} need held-out rows (datasets or test_datasets); "
                         "set them, or metrics: [] for the benchmark sections alone")
    if ev.prompts is not None:
        prompts = load_prompt_set(ev.prompts, t.seed)
    wanted = max(ev.num_generations, ev.judge.max_prompts if ("judge" in ev.metrics and ev.judge) else 0)
    prompts = prompts[:wanted]
    rewarded = []
    if ev.rewards:  # prompts with their reference columns, read before a model loads
        rewarded = load_prompts(recipe, [ev.prompts], reference_columns(ev.rewards))[:ev.num_generations]
    if "preference" in ev.metrics and not pairs:
        log.warning("eval.metrics preference: skipped, the held-out data (%s) has no prompt/chosen/rejected pairs",
                    ", ".join(d.path for d in recipe.datasets))
    return pairs, texts, prompts, rewarded


@dataclass
class Models:
    """The model evaluated and its reference, and how both are scored."""
    model: object
    reference: object
    tokenizer: object
    encode: rows_of.Encoder
    batch: int
    cache_dir: str | None
    identity: dict       # the reference's, keying its cached scores (refcache)
    scored_as: str       # with how it runs: the dtype and the device

    def logps(self, which, seqs: list, task: str) -> list[tuple[float, int]]:
        return sequence_logps(which, seqs, self.batch, self.tokenizer.pad_token_id, task)

    def reference_logps(self, seqs: list, task: str, what: str) -> tuple[list[tuple[float, int]], dict]:
        """The reference's log-probs, read back from the cache when another eval computed them."""
        return reference_scores(self.cache_dir, self.identity, self.scored_as, seqs,
                                lambda: self.logps(self.reference, seqs, task), what)

    def answer(self, which, prompts: list[list[dict]], max_new_tokens: int, task: str) -> list[dict]:
        return generate(which, self.tokenizer, prompts, max_new_tokens, self.batch, task)


def load_models(recipe: Recipe, reference_path: str) -> Models:
    ev, t = recipe.eval, recipe.training
    tokenizer = load_tokenizer(recipe.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(recipe.model, tokenizer).to(device).eval()
    # The reference at its own revision (the base model's pinned one), not the evaluated model's.
    reference_revision = ev.reference_revision if ev.reference_model else recipe.model.model_revision
    reference = load_model(recipe.model, tokenizer, path=reference_path, revision=reference_revision).to(device).eval()
    return Models(model=model, reference=reference, tokenizer=tokenizer,
                  encode=rows_of.Encoder(tokenizer, t.max_length, t.max_prompt_length),
                  batch=t.per_device_eval_batch_size, cache_dir=recipe.cache_dir,
                  identity=model_identity(reference_path, reference_revision),
                  scored_as=f"{recipe.model.torch_dtype}/{device}")


# ---------------------------------------------------------------------------- measurements

def preference(m: Models, pairs: list[dict], t: TrainingArgs) -> dict:
    """Preference accuracy and reward margins on held-out pairs, with the evaluated stage's beta."""
    seqs = [m.encode(p["prompt"] + c, len(p["prompt"])) for p in pairs for c in (p["chosen"], p["rejected"])]
    lp = m.logps(m.model, seqs, "preference (model)")
    lp_ref, info = m.reference_logps(seqs, "preference (reference)", "preference")
    metrics = {"reference_logps_reused": info["reused"], "reference_pass_s": info["seconds"],
               **preference_metrics(lp, lp_ref, t.beta)}
    if metrics["unscored_pairs"]:
        log.warning("eval: %d of %d held-out pairs keep no response token within training.max_length %d "
                    "(their prompt fills it); reported as unscored_pairs, not counted in the accuracy",
                    metrics["unscored_pairs"], len(pairs), t.max_length)
    return metrics


def held_out_loss(m: Models, texts: list) -> dict:
    """Held-out loss and perplexity, completion tokens only, of both models."""
    seqs = [m.encode(messages, scored_from) for messages, scored_from in texts]
    metrics = {}
    for prefix, who in (("", "model"), ("reference_", "reference")):
        lp = (m.logps(m.model, seqs, "loss (model)") if who == "model"
              else m.reference_logps(seqs, "loss (reference)", "loss")[0])
        tokens = sum(n for _, n in lp)
        loss = -sum(s for s, _ in lp) / max(tokens, 1)
        metrics[f"{prefix}eval_loss"] = loss
        metrics[f"{prefix}perplexity"] = math.exp(min(loss, 50.0))
    metrics["eval_tokens"] = tokens
    return metrics


def answers_of_both(m: Models, prompts: list[list[dict]], max_new_tokens: int) -> list[dict]:
    """Greedy answers to the prompt set by both models: one record per prompt."""
    answers = m.answer(m.model, prompts, max_new_tokens, "generations (model)")
    ref_answers = m.answer(m.reference, prompts, max_new_tokens, "generations (reference)")
    return [{"prompt": prompt, "model": a["text"], "reference": r["text"],
             "model_tokens": a["tokens"], "model_stopped": a["stopped"],
             "reference_tokens": r["tokens"], "reference_stopped": r["stopped"]}
            for prompt, a, r in zip(prompts, answers, ref_answers)]


def generation_metrics(records: list[dict]) -> dict:
    n = max(len(records), 1)
    return {"generation_stop_rate": sum(r["model_stopped"] for r in records) / n,
            "generation_mean_tokens": sum(r["model_tokens"] for r in records) / n,
            "reference_generation_stop_rate": sum(r["reference_stopped"] for r in records) / n}


def reward_model_scores(model_dir: str, pairs: list[dict], records: list[dict], batch: int) -> dict:
    """A reward model (a reward stage's final/) on the held-out pairs and on both models' answers;
    each record gets its two scores."""
    from ..reward_model import score_conversations

    convs = [p["prompt"] + reply for p in pairs for reply in (p["chosen"], p["rejected"])]
    convs += [r["prompt"] + [{"role": "assistant", "content": r[who]}] for r in records for who in ("model", "reference")]
    scores = score_conversations(model_dir, convs, batch)
    metrics = {}
    if pairs:
        metrics["reward_model_accuracy"] = sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(pairs))) / len(pairs)
    if records:
        gen = scores[2 * len(pairs):]
        mine, theirs = gen[0::2], gen[1::2]
        metrics["reward_model_win_rate"] = sum(m > t for m, t in zip(mine, theirs)) / len(records)
        metrics["reward_model_score"] = sum(mine) / len(records)
        metrics["reference_reward_model_score"] = sum(theirs) / len(records)
        for r, m, t in zip(records, mine, theirs):
            r["reward_model"] = {"model": m, "reference": t}
    return metrics


def mean_rewards(recipe: Recipe, m: Models, rewarded: list[dict]) -> dict:
    """eval.rewards (grpo's rules, a reward stage, a judge) on both models' greedy answers: their mean reward."""
    ev = recipe.eval
    funcs, weights = build_rewards(recipe, ev.rewards, section="eval"), [r.weight for r in ev.rewards]
    turns = [r["prompt"] for r in rewarded]
    columns = {c: [r[c] for r in rewarded] for c in rewarded[0] if c != "prompt"}
    metrics = {}
    for prefix, which, who in (("", m.model, "model"), ("reference_", m.reference, "reference")):
        answers = m.answer(which, turns, ev.max_new_tokens, f"rewards ({who})")
        scores = total_reward(funcs, weights, turns, [[{"role": "assistant", "content": a["text"]}] for a in answers],
                              columns)
        metrics[f"{prefix}mean_reward"] = sum(scores) / len(scores)
    metrics["reward_prompts"] = len(rewarded)
    return metrics


def judge_win_rate(ev: EvalArgs, records: list[dict]) -> dict:
    """LLM judge, model vs reference, both orders; each judged record gets its verdicts."""
    from ..judge import Judge, win_rate

    items = [{"question": question(r["prompt"]), "model": r["model"], "reference": r["reference"]}
             for r in records[:ev.judge.max_prompts]]
    judged, verdicts = win_rate(Judge(ev.judge), items, progress=TaskProgress("judge", len(items)))
    for r, v in zip(records, verdicts):
        r["judge"] = {k: v[k] for k in ("verdict_model_first", "verdict_model_second", "score")}
    return judged


def benchmarks(recipe: Recipe, m: Models, out: Path, metrics: dict) -> tuple[dict[str, str], dict]:
    """lm-eval tasks, MT-Bench and AlpacaEval 2 (each when its section is set) into metrics; the
    folders they wrote and what produced the numbers (package versions, the judge)."""
    ev = recipe.eval
    files: dict[str, str] = {}
    provenance: dict = {}
    if ev.lm_eval is not None:
        from ..lm_eval_task import run_lm_eval

        metrics.update(run_lm_eval(ev.lm_eval, m.model, m.tokenizer, out, "model"))
        if ev.lm_eval.reference:
            metrics.update({f"reference_{k}": v for k, v in
                            run_lm_eval(ev.lm_eval, m.reference, m.tokenizer, out, "reference").items()})
        files["lm_eval"] = str(out / "lm_eval")
        provenance["lm_eval"] = version("lm_eval")
    judge = None
    if ev.mt_bench is not None or ev.alpaca_eval is not None:
        from ..judge import Judge

        judge = Judge(ev.judge)
    if ev.mt_bench is not None:
        from .. import data as data_io
        from .. import mt_bench

        folder = out / "mt_bench"
        rows, _ = data_io.read_rows(ev.mt_bench.questions)
        questions = mt_bench.questions_of(rows, data_io.describe(ev.mt_bench.questions), ev.mt_bench.max_questions)
        answered = mt_bench.answer(lambda p, task: m.answer(m.model, p, ev.mt_bench.max_new_tokens, task), questions,
                                   folder, recipe.model.model_name_or_path, ev.mt_bench.max_new_tokens)
        summary = mt_bench.grade(judge, answered, folder)
        metrics.update(summary)
        (folder / "summary.json").write_text(json.dumps({**summary, **judge.provenance(), "versions": _versions()},
                                                        indent=1))
        files["mt_bench"] = str(folder)
    if ev.alpaca_eval is not None:
        from .. import alpaca_eval

        folder = out / "alpaca_eval"
        instructions, references = alpaca_eval.load_instructions(ev.alpaca_eval)
        outputs = alpaca_eval.answer(lambda p, task: m.answer(m.model, p, ev.alpaca_eval.max_new_tokens, task),
                                     instructions, folder, recipe.model.model_name_or_path,
                                     ev.alpaca_eval.max_new_tokens)
        summary = alpaca_eval.evaluate(ev.alpaca_eval, judge, outputs, references, folder)
        metrics.update(summary)
        (folder / "summary.json").write_text(json.dumps(
            {**summary, **judge.provenance(), "versions": {**_versions(), **alpaca_eval.versions()}}, indent=1))
        files["alpaca_eval"] = str(folder)
    if judge is not None:
        provenance.update(judge.provenance())
    return files, provenance


# ---------------------------------------------------------------------------- scoring

@torch.no_grad()
def sequence_logps(model, seqs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                   task: str) -> list[tuple[float, int]]:
    """(sum of log-probs over completion tokens, completion token count) per (ids, mask) sequence."""
    out: list[tuple[float, int]] = []
    device = next(model.parameters()).device
    report = TaskProgress(task, len(seqs))
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for row, (seq, mask) in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            attention[row, :len(seq)] = 1
            scored[row, :len(seq)] = torch.tensor(mask, dtype=torch.bool)
        ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        labels, scored = ids[:, 1:], scored[:, 1:]
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        sums = (token_lp * scored).sum(-1).tolist()
        counts = scored.sum(-1).tolist()
        out += list(zip(sums, counts))
        report(min(start + batch_size, len(seqs)))
    return out


def preference_metrics(lp: list[tuple[float, int]], lp_ref: list[tuple[float, int]], beta: float) -> dict:
    """From (chosen, rejected) interleaved log-probs of the model and the reference.

    A pair whose chosen or rejected reply keeps no token after truncation (its prompt fills
    max_length) has no reward to compare: it is counted in unscored_pairs, not as wrong.
    """
    scored = [i for i in range(len(lp) // 2) if lp[2 * i][1] > 0 and lp[2 * i + 1][1] > 0]
    chosen, rejected = [lp[2 * i][0] for i in scored], [lp[2 * i + 1][0] for i in scored]
    ref_chosen, ref_rejected = [lp_ref[2 * i][0] for i in scored], [lp_ref[2 * i + 1][0] for i in scored]
    r_chosen = [beta * (a - b) for a, b in zip(chosen, ref_chosen)]
    r_rejected = [beta * (a - b) for a, b in zip(rejected, ref_rejected)]
    n = max(len(chosen), 1)
    return {
        "preference_accuracy": sum(c > r for c, r in zip(r_chosen, r_rejected)) / n,
        "reward_margin": sum(c - r for c, r in zip(r_chosen, r_rejected)) / n,
        "reward_chosen": sum(r_chosen) / n,
        "reward_rejected": sum(r_rejected) / n,
        "reward_beta": beta,
        "logp_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "reference_logp_accuracy": sum(c > r for c, r in zip(ref_chosen, ref_rejected)) / n,
        "logp_margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
        "reference_logp_margin": sum(c - r for c, r in zip(ref_chosen, ref_rejected)) / n,
        "scored_pairs": len(scored),
        "unscored_pairs": len(lp) // 2 - len(scored),
    }
