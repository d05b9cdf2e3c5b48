"""Reward modelling: a Bradley-Terry reward model on prompt/chosen/rejected pairs (TRL's RewardTrainer).

    python -m alignment_trainer recipe.yaml          # recipe.method: reward

The model is the starting causal LM with a one-output score head (AutoModelForSequenceClassification,
num_labels 1; the head is new and seeded); the loss is -log sigmoid(r(x, yc) - r(x, yr)), HALOs'
BradleyTerryTrainer and TRL's. result.json reports the held-out pairwise accuracy (the fraction of
test pairs whose chosen reply scores higher; ties count as wrong) and reward margin. final/ is a
sequence-classification model with the stage's tokenizer and chat template:
AutoModelForSequenceClassification.from_pretrained(final) scores a rendered conversation by the
logit at its last token (the eval stage's reward_model does).
"""

from __future__ import annotations

import torch
from trl import RewardConfig, RewardTrainer

from ..data import load_stage_data
from ..model import load_tokenizer, resolve_dtype, trainable_dtype
from ..recipe import Recipe
from .common import build_config, finish_stage, setup_stage, train, truncate_prompts


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
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                            processing_class=tokenizer)
    return trainer, tokenizer


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


@torch.no_grad()
def score_conversations(model_dir: str, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """A reward stage's final/ scores each conversation (rendered with the chat template saved with it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"eval.reward_model: {model_dir} has {model.config.num_labels} labels, not a reward model "
                         "(a reward stage's final/ has one)")
    scores: list[float] = []
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[start:start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        scores += model(**enc).logits.squeeze(-1).float().tolist()
    return scores


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
    return finish_stage(trainer, recipe, tokenizer, train_output, extra=held_out)
