"""Pairwise preference optimisation: DPO, IPO, SimPO, ORPO on prompt/chosen/rejected data.

    python -m alignment_trainer recipe.yaml          # recipe.method: dpo | ipo | simpo | orpo

dpo/ipo: trl.DPOTrainer against a frozen reference (the starting model, recipe.ref_model, or
the adapter-free base under LoRA), optionally with reference log-probs computed once up front.
simpo: trl.experimental.cpo's CPOTrainer with loss_type simpo and cpo_alpha 0 (no reference).
orpo: trl.experimental.orpo's ORPOTrainer (odds-ratio loss on top of SFT; no reference).
"""

from __future__ import annotations

import trl

from ..data import load_stage_data
from ..model import added_tokens, load_model, load_tokenizer, lora_config
from ..recipe import Recipe
from .common import build_config, finish_stage, setup_stage, train, truncate_prompts


# The experimental trainers' batches hold chosen_input_ids/rejected_input_ids (no input_ids to count
# tokens from) and need their extra columns kept.
LEGACY_COLLATOR = {"include_num_input_tokens_seen": "no", "remove_unused_columns": False}


def trainer_classes(method: str):
    """(ConfigClass, TrainerClass, method fields) for a method, failing clearly when TRL lacks it."""
    if method in ("dpo", "ipo"):
        return trl.DPOConfig, trl.DPOTrainer, {}
    try:
        if method == "simpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            return CPOConfig, CPOTrainer, {"loss_type": "simpo", "cpo_alpha": 0.0, **LEGACY_COLLATOR}
        if method == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            return ORPOConfig, ORPOTrainer, dict(LEGACY_COLLATOR)
    except ImportError as e:  # a ValueError: the recipe cannot run on this image, retrying will not help
        raise ValueError(f"method {method}: not available in the installed TRL {trl.__version__} ({e}); "
                         "use dpo or ipo, or a trainer image with a TRL that has trl.experimental") from e
    raise ValueError(f"method {method!r} is not a pairwise preference method")


def run(recipe: Recipe) -> dict | None:
    # Setup: a stage that already finished is not trained again.
    done = setup_stage(recipe)
    if done is not None:
        return done
    t = recipe.training

    # Data first: a bad dataset fails in seconds, before a 7B model downloads or loads.
    data = load_stage_data(recipe)
    config_cls, trainer_cls, fields = trainer_classes(recipe.method)
    uses_reference = recipe.method in ("dpo", "ipo")
    if not uses_reference and (t.precompute_ref_log_probs or recipe.ref_model):
        raise ValueError(f"training.precompute_ref_log_probs / ref_model: {recipe.method} has no reference model")

    # Training config first: under ZeRO-3 it makes from_pretrained load the weights sharded.
    if uses_reference:
        fields = dict(loss_type=[recipe.effective_loss_type], precompute_ref_log_probs=t.precompute_ref_log_probs)
    args = build_config(config_cls, recipe, beta=t.beta, **fields)

    # Model & tokenizer; the reference is loaded explicitly (so it has the same added tokens) unless
    # LoRA (the base without the adapter is the reference) or precomputed log-probs make it unneeded.
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, tokenizer, lora=recipe.lora)
    peft_config = lora_config(recipe.lora, added_tokens(recipe.model, tokenizer)) if recipe.lora else None
    ref_model = None
    if uses_reference and (recipe.ref_model or (not recipe.lora and not t.precompute_ref_log_probs)):
        ref_model = load_model(recipe.model, tokenizer, path=recipe.ref_model)
    ref_kwargs = {"ref_model": ref_model} if uses_reference else {}

    # Data: prompt (messages ending with a user turn), chosen and rejected ([assistant message]).
    # TRL 1.x cannot cut prompts keeping their end; do it here, before it tokenizes.
    train_set = truncate_prompts(data["train"], tokenizer, t.max_prompt_length)
    test_set = truncate_prompts(data.get("test"), tokenizer, t.max_prompt_length)

    # Trainer
    trainer = trainer_cls(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                          processing_class=tokenizer, peft_config=peft_config, **ref_kwargs)

    # Train, resuming from the newest complete checkpoint
    train_output = train(trainer, recipe)

    # Save final/ (a LoRA adapter merged into a standalone model when lora.merge) and the results
    return finish_stage(trainer, recipe, tokenizer, train_output)
