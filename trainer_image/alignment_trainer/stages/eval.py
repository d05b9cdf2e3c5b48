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
"""

from __future__ import annotations

import json
import logging
import math
import os
from importlib.metadata import version
from pathlib import Path

import torch

from .. import card as model_card
from ..data import load_stage_data
from ..model import load_model, load_tokenizer
from ..recipe import Recipe
from ..results import emit, push_to_hub, write_result
from . import eval_rows as rows_of
from .refcache import model_identity, reference_scores

log = logging.getLogger("alignment_trainer")


def run(recipe: Recipe) -> dict:
    # Setup
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ev = recipe.eval
    if ev is None:
        raise ValueError("eval: the eval method needs an eval section (metrics, reference_model, ...)")
    if "judge" in ev.metrics and ev.judge is None:
        raise ValueError("eval.judge: metrics include judge but no judge endpoint is configured")
    for section in ("alpaca_eval", "mt_bench"):
        if getattr(ev, section) is not None and ev.judge is None:
            raise ValueError(f"eval.judge: eval.{section} is graded by an LLM judge but eval.judge is not set")
    if ev.rewards and ev.prompts is None:
        raise ValueError("eval.prompts: eval.rewards score the answers to a prompt set; give eval.prompts (prompts "
                         "with the reference columns the rewards read, e.g. held-out prompts with an answer)")
    if int(os.environ.get("RANK", "0")) != 0:
        return {}  # launched on several processes (a GPU node's default): the first one evaluates
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reference_path = ev.reference_model or recipe.model.model_name_or_path
    emit("start", method="eval", stage=recipe.stage_name, model=recipe.model.model_name_or_path,
         reference=reference_path)

    # Data: held-out rows, then the prompt set (fails before any model is loaded)
    t = recipe.training
    pairs, texts, prompts = [], [], []
    if recipe.datasets and (set(ev.metrics) & {"preference", "loss"} or ev.prompts is None and ev.metrics):
        data = load_stage_data(recipe)
        held_out = data["test"] if "test" in data and len(data["test"]) else data["train"]
        pairs, texts, prompts = rows_of.split_rows(held_out)
    elif set(ev.metrics) & {"preference", "loss"} or (ev.metrics and ev.prompts is None):
        raise ValueError(f"datasets: eval.metrics {ev.metrics} need held-out rows (datasets or test_datasets); "
                         "set them, or metrics: [] for the benchmark sections alone")
    if ev.prompts is not None:
        prompts = rows_of.load_prompts(ev.prompts, t.seed)
    wanted = max(ev.num_generations, ev.judge.max_prompts if ("judge" in ev.metrics and ev.judge) else 0)
    prompts = prompts[:wanted]
    rewarded = []
    if ev.rewards:  # prompts with their reference columns, read before a model loads
        from .grpo import load_prompts

        columns = {r.column for r in ev.rewards if r.kind not in ("format", "reward_model", "judge")}
        rewarded = load_prompts(recipe, [ev.prompts], columns)[:ev.num_generations]
    if "preference" in ev.metrics and not pairs:
        log.warning("eval.metrics preference: skipped, the held-out data (%s) has no prompt/chosen/rejected pairs",
                    ", ".join(d.path for d in recipe.datasets))

    # Models: the one evaluated and its reference, one tokenizer (the evaluated model's)
    tokenizer = load_tokenizer(recipe.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(recipe.model, tokenizer).to(device).eval()
    # The reference at its own revision (the base model's pinned one), not the evaluated model's.
    reference_revision = ev.reference_revision if ev.reference_model else recipe.model.model_revision
    reference = load_model(recipe.model, tokenizer, path=reference_path, revision=reference_revision).to(device).eval()
    # Keys its cached scores (refcache), with how it runs: the dtype and the device
    identity = model_identity(reference_path, reference_revision)
    scored_as = f"{recipe.model.torch_dtype}/{device}"
    encode = rows_of.Encoder(tokenizer, t.max_length, t.max_prompt_length)
    batch = t.per_device_eval_batch_size
    metrics: dict[str, float] = {}

    # Preference accuracy and reward margins on held-out pairs
    if "preference" in ev.metrics and pairs:
        seqs = [encode(p["prompt"] + c, len(p["prompt"])) for p in pairs for c in (p["chosen"], p["rejected"])]
        lp = sequence_logps(model, seqs, batch, tokenizer.pad_token_id, "preference (model)")
        lp_ref, info = reference_scores(recipe.cache_dir, identity, scored_as, seqs, lambda: sequence_logps(
            reference, seqs, batch, tokenizer.pad_token_id, "preference (reference)"), "preference")
        metrics["reference_logps_reused"], metrics["reference_pass_s"] = info["reused"], info["seconds"]
        metrics.update(preference_metrics(lp, lp_ref, t.beta))
        if metrics["unscored_pairs"]:
            log.warning("eval: %d of %d held-out pairs keep no response token within training.max_length %d "
                        "(their prompt fills it); reported as unscored_pairs, not counted in the accuracy",
                        metrics["unscored_pairs"], len(pairs), t.max_length)

    # Held-out loss and perplexity, completion tokens only
    if "loss" in ev.metrics:
        seqs = [encode(messages, scored_from) for messages, scored_from in texts]
        for prefix, m, who in (("", model, "model"), ("reference_", reference, "reference")):
            score = lambda m=m, who=who: sequence_logps(m, seqs, batch, tokenizer.pad_token_id, f"loss ({who})")  # noqa: E731
            lp = score() if m is model else reference_scores(
                recipe.cache_dir, identity, scored_as, seqs, score, "loss")[0]
            tokens = sum(n for _, n in lp)
            loss = -sum(s for s, _ in lp) / max(tokens, 1)
            metrics[f"{prefix}eval_loss"] = loss
            metrics[f"{prefix}perplexity"] = math.exp(min(loss, 50.0))
        metrics["eval_tokens"] = tokens

    # Generations for the prompt set, by both models
    records: list[dict] = []
    if "generations" in ev.metrics or "judge" in ev.metrics:
        answers = generate(model, tokenizer, prompts, ev.max_new_tokens, batch, "generations (model)")
        ref_answers = generate(reference, tokenizer, prompts, ev.max_new_tokens, batch, "generations (reference)")
        for prompt, a, r in zip(prompts, answers, ref_answers):
            records.append({"prompt": prompt, "model": a["text"], "reference": r["text"],
                            "model_tokens": a["tokens"], "model_stopped": a["stopped"],
                            "reference_tokens": r["tokens"], "reference_stopped": r["stopped"]})
        n = max(len(records), 1)
        metrics["generation_stop_rate"] = sum(r["model_stopped"] for r in records) / n
        metrics["generation_mean_tokens"] = sum(r["model_tokens"] for r in records) / n
        metrics["reference_generation_stop_rate"] = sum(r["reference_stopped"] for r in records) / n

    # A reward model (a reward stage's final/): held-out pairs, and the generations of both models
    if ev.reward_model:
        from .reward import score_conversations

        convs = [p["prompt"] + reply for p in pairs for reply in (p["chosen"], p["rejected"])]
        if records:
            convs += [r["prompt"] + [{"role": "assistant", "content": r[who]}]
                      for r in records for who in ("model", "reference")]
        scores = score_conversations(ev.reward_model, convs, batch)
        if pairs:
            metrics["reward_model_accuracy"] = sum(
                scores[2 * i] > scores[2 * i + 1] for i in range(len(pairs))) / len(pairs)
        gen = scores[2 * len(pairs):]
        if records:
            mine, theirs = gen[0::2], gen[1::2]
            metrics["reward_model_win_rate"] = sum(m > t for m, t in zip(mine, theirs)) / len(records)
            metrics["reward_model_score"] = sum(mine) / len(records)
            metrics["reference_reward_model_score"] = sum(theirs) / len(records)
            for r, m, t in zip(records, mine, theirs):
                r["reward_model"] = {"model": m, "reference": t}

    # Rewards (grpo's rules, a reward stage) on both models' greedy answers: their mean reward
    if rewarded:
        from .grpo import build_rewards, total_reward

        funcs, weights = build_rewards(recipe, ev.rewards, section="eval"), [r.weight for r in ev.rewards]
        turns = [r["prompt"] for r in rewarded]
        columns = {c: [r[c] for r in rewarded] for c in rewarded[0] if c != "prompt"}
        for prefix, m, who in (("", model, "model"), ("reference_", reference, "reference")):
            answers = generate(m, tokenizer, turns, ev.max_new_tokens, batch, f"rewards ({who})")
            scores = total_reward(funcs, weights, turns, [[{"role": "assistant", "content": a["text"]}]
                                                          for a in answers], columns)
            metrics[f"{prefix}mean_reward"] = sum(scores) / len(scores)
        metrics["reward_prompts"] = len(rewarded)

    # LLM judge: model vs reference, both orders
    if "judge" in ev.metrics:
        from ..judge import Judge, win_rate

        items = [{"question": rows_of.question(r["prompt"]), "model": r["model"], "reference": r["reference"]}
                 for r in records[:ev.judge.max_prompts]]
        judged, verdicts = win_rate(Judge(ev.judge), items, progress=lambda i, n: emit(
            "progress", step=i, total=n, task="judge"))
        metrics.update(judged)
        for r, v in zip(records, verdicts):
            r["judge"] = {k: v[k] for k in ("verdict_model_first", "verdict_model_second", "score")}
    if records:
        with (out / "generations.jsonl").open("w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    # Benchmarks: lm-eval tasks, AlpacaEval 2, MT-Bench
    files: dict[str, str] = {}
    provenance: dict = {}
    if ev.lm_eval is not None:
        from .lm_eval_task import run_lm_eval

        metrics.update(run_lm_eval(ev.lm_eval, model, tokenizer, out, "model"))
        if ev.lm_eval.reference:
            metrics.update({f"reference_{k}": v for k, v in
                            run_lm_eval(ev.lm_eval, reference, tokenizer, out, "reference").items()})
        files["lm_eval"] = str(out / "lm_eval")
        provenance["lm_eval"] = version("lm_eval")
    answer_with = lambda prompts_, task, limit: generate(model, tokenizer, prompts_, limit, batch, task)  # noqa: E731
    judge = None
    if ev.mt_bench is not None or ev.alpaca_eval is not None:
        from ..judge import Judge

        judge = Judge(ev.judge)
    if ev.mt_bench is not None:
        from .. import data as data_io
        from . import mt_bench

        folder = out / "mt_bench"
        rows, _ = data_io.read_rows(ev.mt_bench.questions)
        questions = mt_bench.questions_of(rows, data_io.describe(ev.mt_bench.questions), ev.mt_bench.max_questions)
        answered = mt_bench.answer(lambda p, task: answer_with(p, task, ev.mt_bench.max_new_tokens), questions,
                                   folder, recipe.model.model_name_or_path, ev.mt_bench.max_new_tokens)
        summary = mt_bench.grade(judge, answered, folder)
        metrics.update(summary)
        (folder / "summary.json").write_text(json.dumps({**summary, **judge.provenance(), "versions": _versions()},
                                                        indent=1))
        files["mt_bench"] = str(folder)
    if ev.alpaca_eval is not None:
        from . import alpaca_eval

        folder = out / "alpaca_eval"
        instructions, references = alpaca_eval.load_instructions(ev.alpaca_eval)
        outputs = alpaca_eval.answer(lambda p, task: answer_with(p, task, ev.alpaca_eval.max_new_tokens),
                                     instructions, folder, recipe.model.model_name_or_path,
                                     ev.alpaca_eval.max_new_tokens)
        summary = alpaca_eval.evaluate(ev.alpaca_eval, judge, outputs, references, folder)
        metrics.update(summary)
        (folder / "summary.json").write_text(json.dumps(
            {**summary, **judge.provenance(), "versions": {**_versions(), **alpaca_eval.versions()}}, indent=1))
        files["alpaca_eval"] = str(folder)
    if judge is not None:
        provenance.update(judge.provenance())

    # Curves of the run's training stages, and the results
    from ..plots import plot_run_curves

    curves = plot_run_curves(out.parent, out / "curves.png", exclude=[out.name])
    result = {"method": "eval", "stage": recipe.stage_name, "checkpoint": recipe.model.model_name_or_path,
              "reference_model": reference_path, "pairs": len(pairs), **metrics,
              "generations": str(out / "generations.jsonl") if records else None,
              # the checkpoint's generation_config settings the answers were not generated with
              "generation_config_ignored": ignored_generation_settings(model) or None,
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


def _versions() -> dict[str, str]:
    return {p: version(p) for p in ("torch", "transformers")}


# ---------------------------------------------------------------------------- scoring

@torch.no_grad()
def sequence_logps(model, seqs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                   task: str) -> list[tuple[float, int]]:
    """(sum of log-probs over completion tokens, completion token count) per (ids, mask) sequence."""
    out: list[tuple[float, int]] = []
    device = next(model.parameters()).device
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
        emit("progress", step=min(start + batch_size, len(seqs)), total=len(seqs), task=task)
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


# What generate() decides itself (greedy or sampled, the stop and pad tokens, the length) or what does
# not change the tokens drawn; any other setting of a checkpoint's generation_config (temperature,
# repetition_penalty, top_k, min_p, no_repeat_ngram_size, ...) is not used.
DECIDED = {"do_sample", "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
           "transformers_version", "max_length", "max_new_tokens", "_from_model_config", "use_cache",
           "cache_implementation"}


def ignored_generation_settings(model) -> dict:
    """The checkpoint's generation_config settings that generate() does not sample with (an Instruct
    model's repetition_penalty, top_k, ...): what result.json records as generation_config_ignored."""
    return {k: v for k, v in model.generation_config.to_diff_dict().items() if k not in DECIDED}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
             task: str, **sampling) -> list[dict]:
    """Greedy answers, left-padded batches, stopping at the end-of-turn token (eos).

    `sampling` (generate kwargs: do_sample, temperature, top_p, top_k, num_return_sequences) samples
    instead; the answers then come num_return_sequences per prompt, in prompt order. Exactly these
    settings: transformers fills every setting a call leaves unset from the checkpoint's
    generation_config (an Instruct model's repetition_penalty 1.05, top_k 20, ...), so the policy's
    own distribution at temperature 1.0 would not be what is sampled; its generation_config is set
    aside for the call (only its token ids are kept), see ignored_generation_settings."""
    from transformers import GenerationConfig

    own = model.generation_config
    eos = own.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    config = GenerationConfig(**{"do_sample": False, **sampling}, max_new_tokens=max_new_tokens,
                              eos_token_id=list(stops), pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=own.bos_token_id)
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    answers = []
    model.generation_config = GenerationConfig(eos_token_id=list(stops), pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=own.bos_token_id)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, generation_config=config)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                end = next((i for i, tok in enumerate(row) if tok in stops), None)
                kept = row if end is None else row[:end]
                answers.append({"text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                                "tokens": len(kept), "stopped": end is not None})
            emit("progress", step=min(start + batch_size, len(prompts)), total=len(prompts), task=task)
    finally:
        model.generation_config = own
    return answers
