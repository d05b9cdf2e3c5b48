"""Supervised fine-tuning: chats (`messages`) or prompt/completion pairs, with TRL's SFTTrainer.

    python -m alignment_trainer recipe.yaml          # recipe.method: sft

The loss covers the assistant replies of a chat (every turn, through its end-of-turn token) or
the completion of a prompt/completion row (the same way: through its end-of-turn token, not the
template's glue after it); training.completion_only_loss false trains on the
whole sequence instead, as alignment-handbook's SFT recipes do.
"""

from __future__ import annotations

import logging

from trl import SFTConfig, SFTTrainer

from ..data import load_stage_data
from ..model import added_tokens, load_model, load_tokenizer, lora_config
from ..recipe import Recipe
from ..tokens import tokenize_chats, tokenize_prompt_completions
from ..training import build_config, finish_stage, setup_stage, train, truncate_prompts

log = logging.getLogger("alignment_trainer")


def build(recipe: Recipe):
    """The stage's SFTTrainer and tokenizer: data, config, model, masked rows (run() trains it)."""
    t = recipe.training

    # Data first: a bad dataset fails in seconds, before a 7B model downloads or loads.
    data = load_stage_data(recipe)
    if t.packing and recipe.model.attn_implementation != "flash_attention_2":
        # TRL packs padding-free: a batch becomes one flattened sequence. Only flash-attention's varlen
        # kernel keeps attention per packed chat; sdpa/eager pay for a dense mask over the whole batch
        # (benchmarks/trainer.py: 0.43x the tokens/s of padded batches on CPU).
        log.warning("training.packing without model.attn_implementation flash_attention_2 is usually slower "
                    "than padded batches: attention runs over the whole flattened batch")

    # Training config first: under ZeRO-3 it makes from_pretrained load the weights sharded.
    # completion_only_loss None/True: the loss covers what the model answers (assistant replies of a
    # chat, the completion of prompt/completion rows); False: the whole sequence, as the handbook.
    whole_sequence = t.completion_only_loss is False
    args = build_config(SFTConfig, recipe, packing=t.packing, completion_only_loss=not whole_sequence)

    # Model & tokenizer
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, tokenizer, lora=recipe.lora, trainable=True)
    peft_config = lora_config(recipe.lora, added_tokens(recipe.model, tokenizer)) if recipe.lora else None

    # Data: `messages`, or `prompt` + `completion` for preference-derived SFT. Chats are tokenized
    # here with a mask of the assistant replies (tokens.py), for any chat template: TRL's own
    # assistant_only_loss needs {% generation %} markers most templates lack.
    train_set = truncate_prompts(data["train"], tokenizer, t.max_prompt_length)
    test_set = truncate_prompts(data.get("test"), tokenizer, t.max_prompt_length)
    if "messages" in train_set.column_names and not whole_sequence:
        train_set, test_set = tokenize_chats(train_set, tokenizer), tokenize_chats(test_set, tokenizer)
    elif "completion" in train_set.column_names and not whole_sequence:  # through the end-of-turn, as chats
        train_set, test_set = tokenize_prompt_completions(train_set, tokenizer), tokenize_prompt_completions(
            test_set, tokenizer)

    # Trainer
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                         processing_class=tokenizer, peft_config=peft_config)
    return trainer, tokenizer


def run(recipe: Recipe) -> dict | None:
    # Setup: a stage that already finished is not trained again.
    done = setup_stage(recipe)
    if done is not None:
        return done
    trainer, tokenizer = build(recipe)

    # Train, resuming from the newest complete checkpoint
    train_output = train(trainer, recipe)

    # Save final/ (a LoRA adapter merged into a standalone model when lora.merge) and the results
    return finish_stage(trainer, recipe, tokenizer, train_output)
