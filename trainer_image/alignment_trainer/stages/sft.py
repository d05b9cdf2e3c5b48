"""Supervised fine-tuning: chats (`messages`) or prompt/completion pairs, with TRL's SFTTrainer.

    python -m alignment_trainer recipe.yaml          # recipe.method: sft
"""

from __future__ import annotations

import logging

from trl import SFTConfig, SFTTrainer

from ..data import load_stage_data
from ..model import added_tokens, load_model, load_tokenizer, lora_config
from ..recipe import Recipe
from .common import build_config, finish_stage, setup_stage, train, truncate_prompts

log = logging.getLogger("alignment_trainer")


def run(recipe: Recipe) -> dict | None:
    # Setup: a stage that already finished is not trained again.
    done = setup_stage(recipe)
    if done is not None:
        return done
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
    args = build_config(
        SFTConfig, recipe,
        packing=t.packing,
        # None: TRL's choice (completion-only for prompt/completion data, full sequence for chats).
        completion_only_loss=t.completion_only_loss,
    )

    # Model & tokenizer
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, tokenizer, lora=recipe.lora)
    peft_config = lora_config(recipe.lora, added_tokens(recipe.model, tokenizer)) if recipe.lora else None

    # Data: `messages`, or `prompt` + `completion` for preference-derived SFT.
    train_set = truncate_prompts(data["train"], tokenizer, t.max_prompt_length)
    test_set = truncate_prompts(data.get("test"), tokenizer, t.max_prompt_length)

    # Trainer
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                         processing_class=tokenizer, peft_config=peft_config)

    # Train, resuming from the newest complete checkpoint
    train_output = train(trainer, recipe)

    # Save final/ (a LoRA adapter merged into a standalone model when lora.merge) and the results
    return finish_stage(trainer, recipe, tokenizer, train_output)
