"""Online RL: GRPO on TRL's GRPOTrainer, the policy sampling its own completions during training.

    python -m alignment_trainer recipe.yaml          # recipe.method: grpo

Datasets hold prompts (a `prompt` string or user turns, or `messages` whose trailing assistant turn
is dropped) and any other columns, e.g. a reference `answer`. recipe.grpo.rewards are summed
(weighted) into each completion's reward: rules against a reference column (exact_match, contains,
regex), a format rule (the completion matches a pattern), or a reward stage's final/ (a
sequence-classification model scoring prompt + completion with its own chat template). TRL
generates num_generations completions per prompt (transformers; vLLM with grpo.use_vllm), and logs
reward, reward_std, rewards/<name>/mean and frac_reward_zero_std to metrics.jsonl like every
stage's metrics. Held-out prompts (the test split) are answered before and after training
(num_generations samples each at grpo.temperature, as in training: the policy's expected reward):
result.json reports eval_mean_reward_start and eval_mean_reward, and samples.jsonl keeps the answers.

Lengths: TRL's GRPOConfig has no max_length or max_prompt_length (it generates
grpo.max_completion_length tokens after whatever prompt it is given), so they are applied here:
prompts, training and held-out, are cut keeping their end (training.truncate_prompt) to
training.max_prompt_length and to training.max_length - grpo.max_completion_length, the smaller,
so that every prompt and its longest completion fit max_length.

A reward that raises fails the stage with RewardError (a RecipeError, exit 2) naming the stage, the
reward and what to fix.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from ..data import DataError, describe
from ..model import added_tokens, load_model, load_tokenizer, lora_config
from ..prompts import cut_prompts, load_prompts, prompt_limit
from ..recipe import Recipe
from ..rewards import build_rewards, reference_columns, total_reward
from ..training import build_config, finish_stage, setup_stage, stage_label, train

log = logging.getLogger("alignment_trainer")


# ---------------------------------------------------------------------------- held-out reward

@torch.no_grad()
def held_out_reward(model, tokenizer, rows: list[dict], funcs, weights, g, seed: int,
                    batch_size: int = 8) -> tuple[float, list[dict]]:
    """The policy's expected reward on the held-out prompts: num_generations answers to each, sampled
    at grpo.temperature (seeded) as in training, their mean total reward; and the samples."""
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    was_training, side, own = model.training, tokenizer.padding_side, model.generation_config
    model.eval()
    tokenizer.padding_side = "left"
    # Exactly the settings below: transformers fills what a call leaves unset from the checkpoint's
    # generation_config (an Instruct model's repetition_penalty, min_p, ...), as sampling.generate avoids.
    model.generation_config = GenerationConfig(eos_token_id=own.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=own.bos_token_id)
    samples = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                     for r in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=g.max_completion_length, do_sample=True,
                                 temperature=g.temperature, top_k=0, top_p=1.0, num_return_sequences=g.num_generations,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            batch = [r for r in batch for _ in range(g.num_generations)]
            completions = [[{"role": "assistant", "content": a}] for a in answers]
            columns = {c: [r[c] for r in batch] for c in batch[0] if c != "prompt"}
            scores = total_reward(funcs, weights, [r["prompt"] for r in batch], completions, columns)
            samples += [{"prompt": r["prompt"], "completion": a, "reward": s} for r, a, s in zip(batch, answers, scores)]
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
        model.generation_config = own
    return sum(s["reward"] for s in samples) / max(len(samples), 1), samples


# ---------------------------------------------------------------------------- the stage

def build(recipe: Recipe):
    t, g = recipe.training, recipe.grpo
    columns = reference_columns(g.rewards)

    # Prompts first: a bad dataset fails in seconds, before a model loads.
    train_rows = load_prompts(recipe, recipe.datasets, columns)
    test_rows = load_prompts(recipe, recipe.test_datasets, columns) if recipe.test_datasets else []
    if recipe.test_split_size is not None and not test_rows:
        import random

        n = int(recipe.test_split_size) if recipe.test_split_size >= 1 else round(recipe.test_split_size * len(train_rows))
        held = set(random.Random(t.seed).sample(range(len(train_rows)), min(n, len(train_rows) - 1)))
        test_rows = [r for i, r in enumerate(train_rows) if i in held]
        train_rows = [r for i, r in enumerate(train_rows) if i not in held]
    if not train_rows:
        raise DataError(f"{stage_label(recipe)}: no prompts in {[describe(d) for d in recipe.datasets]}; "
                        "a grpo stage needs at least one prompt to generate for")
    generation_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if generation_batch % g.num_generations:
        raise ValueError(f"grpo.num_generations: {g.num_generations} must divide training.per_device_train_batch_size "
                         f"x gradient_accumulation_steps ({generation_batch}): each batch holds whole groups")
    if g.use_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError("grpo.use_vllm: vllm is not installed in this image; set it false (transformers "
                             "generates) or use the GPU image")

    args = build_config(GRPOConfig, recipe, num_generations=g.num_generations,
                        max_completion_length=g.max_completion_length, temperature=g.temperature,
                        beta=t.beta, loss_type=recipe.effective_loss_type, use_vllm=g.use_vllm,
                        vllm_mode="colocate", reward_weights=[r.weight for r in g.rewards],
                        log_completions=False)
    if not recipe.lora:
        # TRL 1.16 builds GRPO's reference itself (trl/trainer/grpo_trainer.py, __init__: "Reference
        # model") from the policy's config path and args.model_init_kwargs, without the policy's
        # revision: a pinned model.revision would be scored against the Hub's main. (TRL's warning
        # that model_init_kwargs "will be ignored" concerns the policy, loaded here already.)
        args.model_init_kwargs = {"revision": recipe.model.model_revision, **(args.model_init_kwargs or {})}

    tokenizer = load_tokenizer(recipe.model)
    limit = prompt_limit(recipe)
    train_rows, test_rows = cut_prompts(train_rows, tokenizer, limit), cut_prompts(test_rows, tokenizer, limit)
    model = load_model(recipe.model, tokenizer, lora=recipe.lora, trainable=True)
    peft_config = lora_config(recipe.lora, added_tokens(recipe.model, tokenizer)) if recipe.lora else None
    funcs = build_rewards(recipe)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=Dataset.from_list(train_rows),
                          processing_class=tokenizer, peft_config=peft_config)
    return trainer, tokenizer, funcs, test_rows


def run(recipe: Recipe) -> dict | None:
    done = setup_stage(recipe)
    if done is not None:
        return done
    trainer, tokenizer, funcs, test_rows = build(recipe)
    g = recipe.grpo
    weights = [r.weight for r in g.rewards]
    test_rows = test_rows[:g.eval_prompts]
    main = trainer.is_world_process_zero()
    extra: dict = {}
    if test_rows:
        start, start_samples = held_out_reward(trainer.model, tokenizer, test_rows, funcs, weights, g,
                                               recipe.training.seed)
        log.info("held-out mean reward before GRPO: %.4f (%d prompts)", start, len(test_rows))
    train_output = train(trainer, recipe)
    if test_rows:
        model = trainer.accelerator.unwrap_model(trainer.model)
        end, end_samples = held_out_reward(model, tokenizer, test_rows, funcs, weights, g, recipe.training.seed)
        extra = {"eval_mean_reward_start": start, "eval_mean_reward": end, "eval_prompts": len(test_rows)}
        if main:
            with open(Path(recipe.output_dir) / "samples.jsonl", "w") as f:
                for when, samples in (("start", start_samples), ("end", end_samples)):
                    for s in samples:
                        f.write(json.dumps({"when": when, **s}) + "\n")
    return finish_stage(trainer, recipe, tokenizer, train_output, extra=extra)
