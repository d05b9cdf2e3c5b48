"""Reward modelling: a Bradley-Terry reward model on prompt/chosen/rejected pairs (TRL's RewardTrainer).

    python -m alignment_trainer recipe.yaml          # recipe.method: reward

The model is the starting causal LM with a one-output score head (AutoModelForSequenceClassification,
num_labels 1; the head is new and seeded); the loss is -log sigmoid(r(x, yc) - r(x, yr)), HALOs'
BradleyTerryTrainer and TRL's. result.json reports the held-out pairwise accuracy (the fraction of
test pairs whose chosen reply scores higher; ties count as wrong) and reward margin. final/ is a
sequence-classification model with the stage's tokenizer and chat template:
AutoModelForSequenceClassification.from_pretrained(final) scores a rendered conversation by the
logit at its last token (reward_model.RewardModel: how grpo, label and eval score with it).

Lengths as in DPO: prompts are cut to max_prompt_length keeping their end, then each conversation
(prompt + reply) to max_length by training.extra_args.truncation_mode, keep_start (the default, TRL
1.16's DPO default) or keep_end; TRL's RewardTrainer would drop every pair longer than max_length
instead (TruncatingRewardTrainer). A pair whose two sides are cut to the same tokens (a prompt that
fills max_length under keep_start) holds nothing to learn and is dropped with a warning; result.json
counts the pairs read, kept, cut and dropped per split (train_pairs*, eval_pairs*).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
import trl
from trl import RewardTrainer

from ..data import load_stage_data
from ..model import load_tokenizer, resolve_dtype, trainable_dtype
from ..recipe import Recipe
from ..results import emit
from ..training import build_config, finish_stage, setup_stage, train, truncate_prompts

log = logging.getLogger("alignment_trainer")
TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class RewardConfig(trl.RewardConfig):
    """TRL's RewardConfig with DPOConfig's truncation_mode (TRL 1.16's RewardConfig has none: its trainer
    filters long pairs out), so training.extra_args.truncation_mode means the same for reward as for dpo."""

    truncation_mode: str = field(default="keep_start", metadata={
        "help": "How a conversation longer than max_length is cut: keep_start (drop its end) or keep_end."})

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"training.extra_args.truncation_mode: {self.truncation_mode!r} is not one of "
                             f"{', '.join(TRUNCATION_MODES)}")
        super().__post_init__()


class TruncatingRewardTrainer(RewardTrainer):
    """RewardTrainer that cuts long pairs (args.truncation_mode) where TRL 1.16's drops them
    (trl/trainer/reward_trainer.py, RewardTrainer._prepare_dataset: "Filter samples that are longer than
    max_length"); pair_counts holds, per split, the pairs read, kept, cut and dropped."""

    def __init__(self, *args, **kwargs):
        self.pair_counts: dict[str, dict[str, int]] = {}
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        from accelerate import PartialState

        untruncated = copy.copy(args)
        untruncated.max_length = None  # TRL tokenizes and filters nothing; the pairs are cut below
        dataset = super()._prepare_dataset(dataset, processing_class, untruncated, dataset_name)
        if args.max_length is None or "chosen_ids" not in dataset.column_names:
            return dataset
        dataset, counts = truncate_pairs(dataset, args.max_length, args.truncation_mode)
        self.pair_counts[dataset_name] = counts
        if counts["truncated"] and PartialState().is_main_process:
            log.warning("reward: %d of %d %s pairs are longer than training.max_length %d and were cut (%s)",
                        counts["truncated"], counts["read"], dataset_name, args.max_length, args.truncation_mode)
        if counts["dropped"]:
            message = (f"{counts['dropped']} of {counts['read']} {dataset_name} pairs dropped: cut to "
                       f"training.max_length {args.max_length} ({args.truncation_mode}), chosen and rejected are the "
                       "same tokens (nothing to learn)")
            if not counts["kept"]:
                raise ValueError(f"training.max_length: {message}; raise max_length or set max_prompt_length")
            if PartialState().is_main_process:
                log.warning("reward: %s", message)
        return dataset


def truncate_pairs(dataset, max_length: int, mode: str):
    """Each side's chosen_ids/rejected_ids (prompt + reply) cut to max_length as DPO's collator cuts
    (keep_start: the first max_length tokens; keep_end: the last); pairs whose sides end up equal are
    dropped. Returns (dataset, {read, kept, truncated, dropped})."""
    from accelerate import PartialState

    def cut(example):
        chosen, rejected = example["chosen_ids"], example["rejected_ids"]
        long = max(len(chosen), len(rejected)) > max_length
        if long:
            keep = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
            chosen, rejected = chosen[keep], rejected[keep]
        return {"chosen_ids": chosen, "rejected_ids": rejected, "_cut": long}

    read = len(dataset)
    with PartialState().main_process_first():  # one process writes the map's cache file, the others read it
        dataset = dataset.map(cut, desc=f"Truncating pairs to {max_length} tokens ({mode})")
        truncated = sum(dataset["_cut"])
        dataset = dataset.remove_columns("_cut")
        if truncated:
            dataset = dataset.filter(lambda example: example["chosen_ids"] != example["rejected_ids"],
                                     desc="Dropping pairs cut to the same tokens")
    return dataset, {"read": read, "kept": len(dataset), "truncated": truncated, "dropped": read - len(dataset)}


def load_reward_model(recipe: Recipe, tokenizer, path: str | None = None, trainable: bool = True):
    """A sequence-classification model with one score output, loaded like the stages' causal LMs."""
    from transformers import AutoModelForSequenceClassification

    args = recipe.model
    dtype = trainable_dtype(args, recipe.lora) if trainable else resolve_dtype(args.torch_dtype)
    kwargs = dict(revision=args.model_revision, dtype=dtype, trust_remote_code=args.trust_remote_code, num_labels=1)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    model = AutoModelForSequenceClassification.from_pretrained(path or args.model_name_or_path, **kwargs)
    # As model.match_tokenizer, without a generation config: embeddings for added tokens, eos/pad ids
    # (the score is read at the last non-pad token, so pad must be set and differ from eos).
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return model


def build(recipe: Recipe):
    """The stage's RewardTrainer and tokenizer (run() trains it)."""
    t = recipe.training

    # Data first: a bad dataset fails in seconds, before a 7B model downloads or loads.
    data = load_stage_data(recipe)

    # Training config first: under ZeRO-3 it makes from_pretrained load the weights sharded.
    args = build_config(RewardConfig, recipe)

    # Model & tokenizer: the causal LM's body with a new score head (seeded, as TRL does)
    tokenizer = load_tokenizer(recipe.model)
    torch.manual_seed(t.seed)
    model = load_reward_model(recipe, tokenizer)
    if recipe.lora is not None:
        raise ValueError("lora: the reward method trains all weights (a LoRA reward model is not supported yet); "
                         "remove the stage's lora section")

    # Data: conversational prompt/chosen/rejected, prompts cut keeping their end as in DPO
    train_set = truncate_prompts(data["train"], tokenizer, t.max_prompt_length)
    test_set = truncate_prompts(data.get("test"), tokenizer, t.max_prompt_length)
    trainer = TruncatingRewardTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                                      processing_class=tokenizer)
    return trainer, tokenizer


def pair_counts(trainer) -> dict:
    """result.json fields: per split, the pairs read, kept (trained on / scored), cut and dropped."""
    out = {}
    for split, counts in trainer.pair_counts.items():
        out.update({f"{split}_pairs{'' if k == 'kept' else '_' + k}": v for k, v in counts.items()})
    if out and trainer.accelerator.is_main_process:
        emit("reward_pairs", **out)
    return out


@torch.no_grad()
def pairwise_accuracy(trainer) -> dict:
    """Held-out pairs: the fraction whose chosen reply the model scores higher, and the mean margin.
    Counted pair by pair (the trainer's eval_accuracy averages per batch)."""
    if trainer.eval_dataset is None:
        return {}
    model = trainer.model
    was_training = model.training
    model.eval()
    correct = total = 0
    margin = 0.0
    for batch in trainer.get_eval_dataloader():
        batch = {k: v.to(trainer.args.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        chosen, rejected = scores.float().chunk(2)
        chosen, rejected = trainer.accelerator.gather_for_metrics((chosen, rejected))
        correct += int((chosen > rejected).sum())
        total += chosen.numel()
        margin += float((chosen - rejected).sum())
    model.train(was_training)
    return {"eval_pairwise_accuracy": correct / max(total, 1), "eval_reward_margin": margin / max(total, 1),
            "eval_pairs": total}


def run(recipe: Recipe) -> dict | None:
    # Setup: a stage that already finished is not trained again.
    done = setup_stage(recipe)
    if done is not None:
        return done
    trainer, tokenizer = build(recipe)

    # Train, resuming from the newest complete checkpoint
    train_output = train(trainer, recipe)

    # Held-out pairwise accuracy; final/ (a sequence-classification model) and the results
    held_out = pairwise_accuracy(trainer)
    return finish_stage(trainer, recipe, tokenizer, train_output, extra={**pair_counts(trainer), **held_out})
