"""KTO: unpaired preference optimisation on prompt/completion/label rows (label: desirable?).

    python -m alignment_trainer recipe.yaml          # recipe.method: kto

trl.KTOTrainer against a frozen reference (the starting model, recipe.ref_model, or the
adapter-free base under LoRA). The KL estimate pairs each row with its neighbour in the
batch, so per_device_train_batch_size must be at least 2 (TRL refuses 1).
"""

from __future__ import annotations

from trl import KTOConfig, KTOTrainer

from ..data import load_stage_data
from ..model import added_tokens, load_model, load_tokenizer, lora_config
from ..recipe import Recipe
from .common import build_config, finish_stage, setup_stage, train, truncate_prompts


def run(recipe: Recipe) -> dict | None:
    # Setup: a stage that already finished is not trained again.
    done = setup_stage(recipe)
    if done is not None:
        return done
    t = recipe.training

    # Data first: a bad dataset fails in seconds, before a 7B model downloads or loads.
    data = load_stage_data(recipe)

    # Training config first: under ZeRO-3 it makes from_pretrained load the weights sharded.
    args = build_config(KTOConfig, recipe, beta=t.beta, loss_type=recipe.effective_loss_type,
                        precompute_ref_log_probs=t.precompute_ref_log_probs)

    # Model & tokenizer (reference as in DPO: explicit unless LoRA or precomputed log-probs)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, tokenizer, lora=recipe.lora)
    peft_config = lora_config(recipe.lora, added_tokens(recipe.model, tokenizer)) if recipe.lora else None
    ref_model = None
    if recipe.ref_model or (not recipe.lora and not t.precompute_ref_log_probs):
        ref_model = load_model(recipe.model, tokenizer, path=recipe.ref_model)

    # Data: prompt (messages), completion ([assistant message]), label (bool)
    train_set = truncate_prompts(data["train"], tokenizer, t.max_prompt_length)
    test_set = truncate_prompts(data.get("test"), tokenizer, t.max_prompt_length)

    # Trainer
    trainer = KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_set,
                         eval_dataset=test_set, processing_class=tokenizer, peft_config=peft_config)

    # Train, resuming from the newest complete checkpoint
    train_output = train(trainer, recipe)

    # Save final/ (a LoRA adapter merged into a standalone model when lora.merge) and the results
    return finish_stage(trainer, recipe, tokenizer, train_output)
