"""Pairwise preference optimisation: DPO, IPO, SimPO, ORPO, SLiC on prompt/chosen/rejected data.

    python -m alignment_trainer recipe.yaml          # recipe.method: dpo | ipo | simpo | orpo | slic

dpo/ipo: trl.DPOTrainer against a frozen reference (the starting model, recipe.ref_model, or
the adapter-disabled base under LoRA), optionally with reference log-probs computed once up front
(then no reference stays in memory); losses.DPOTrainer adds cdpo and ipo_sum to TRL's loss types.
slic: HALOs' SLiC, losses.SLiCTrainer on TRL's CPOTrainer (no reference).
simpo: trl.experimental.cpo's CPOTrainer with loss_type simpo and cpo_alpha 0 (no reference).
orpo: trl.experimental.orpo's ORPOTrainer (odds-ratio loss on top of SFT; no reference).
"""

from __future__ import annotations

import time

import trl

from .. import losses, refcache
from ..data import load_stage_data
from ..model import added_tokens, load_model, load_tokenizer, lora_config
from ..recipe import Recipe
from ..tokens import CompletionEndsAtEndOfTurn
from ..training import (build_config, finish_stage, free_reference, load_reference, reference_cache,
                        setup_stage, train, truncate_prompts)


# The experimental trainers' batches hold chosen_input_ids/rejected_input_ids (no input_ids to count
# tokens from) and need their extra columns kept.
LEGACY_COLLATOR = {"include_num_input_tokens_seen": "no", "remove_unused_columns": False}


class DPOTrainer(CompletionEndsAtEndOfTurn, losses.DPOTrainer):
    """losses.DPOTrainer (TRL's, plus cdpo/ipo_sum and the shared reference cache) scoring each reply
    through its end-of-turn token, as SFT trains it and the eval stage scores it (tokens.py)."""


def trainer_classes(method: str):
    """(ConfigClass, TrainerClass, method fields) for a method, failing clearly when TRL lacks it."""
    if method in ("dpo", "ipo"):
        return trl.DPOConfig, DPOTrainer, {}
    try:
        if method == "slic":  # hinge: CPOTrainer sums the log-probs; the NLL term is SLiCTrainer's own
            from trl.experimental.cpo import CPOConfig

            return CPOConfig, losses.SLiCTrainer, {"loss_type": "hinge", "cpo_alpha": 0.0, **LEGACY_COLLATOR}
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


def build(recipe: Recipe):
    """The stage's trainer and tokenizer: data, config, model, reference (run() trains it)."""
    t = recipe.training

    # Data first: a bad dataset fails in seconds, before a 7B model downloads or loads.
    data = load_stage_data(recipe)
    config_cls, trainer_cls, fields = trainer_classes(recipe.method)
    uses_reference = recipe.info.reference
    if not uses_reference and (t.precompute_ref_log_probs or recipe.ref_model):
        raise ValueError(f"training.precompute_ref_log_probs / ref_model: {recipe.method} has no reference model")

    # Training config first: under ZeRO-3 it makes from_pretrained load the weights sharded.
    trainer_kwargs = {}
    if uses_reference:
        loss_type = recipe.effective_loss_type
        fields = dict(loss_type=[losses.trl_loss_type(loss_type)], label_smoothing=t.label_smoothing,
                      precompute_ref_log_probs=t.precompute_ref_log_probs)
        trainer_kwargs["extended_loss"] = loss_type if loss_type in losses.DPO_EXTENSIONS else None
    if recipe.method == "slic":
        trainer_kwargs["slic_lambda"] = t.slic_lambda
    args = build_config(config_cls, recipe, beta=t.beta, **fields)

    # Model & tokenizer. The reference (training.load_reference): none under LoRA (the adapter-disabled
    # base) or with precomputed log-probs; for full fine-tuning a copy loaded exactly like the policy.
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, tokenizer, lora=recipe.lora, trainable=True)
    peft_config = lora_config(recipe.lora, added_tokens(recipe.model, tokenizer)) if recipe.lora else None
    ref_kwargs = {"ref_model": load_reference(recipe, tokenizer)} if uses_reference else {}

    # Data: prompt (messages ending with a user turn), chosen and rejected ([assistant message]).
    # TRL 1.x cannot cut prompts keeping their end; do it here, before it tokenizes.
    train_set = truncate_prompts(data["train"], tokenizer, t.max_prompt_length)
    test_set = truncate_prompts(data.get("test"), tokenizer, t.max_prompt_length)
    if uses_reference and t.precompute_ref_log_probs:  # one log-prob cache all processes share
        train_set = reference_cache(train_set, recipe, tokenizer, "train")
        test_set = reference_cache(test_set, recipe, tokenizer, "test")

    processing_class = tokenizer
    if recipe.method in ("simpo", "orpo", "slic"):  # TRL's experimental trainers tokenize text their own way
        train_set, test_set = as_text(train_set, tokenizer), as_text(test_set, tokenizer)
        processing_class = without_added_bos(tokenizer, train_set[0]["prompt"])

    # Trainer (it precomputes the reference log-probs here, when asked)
    if uses_reference:  # the log-probs are read from / kept in the shared cache (refcache)
        trainer_kwargs["reference_keys"] = refcache.reference_keys(recipe, train_set, test_set)
    start = time.perf_counter()
    trainer = trainer_cls(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                          processing_class=processing_class, peft_config=peft_config, **ref_kwargs, **trainer_kwargs)
    trainer.reference_pass = refcache.reference_pass(trainer, time.perf_counter() - start)  # into result.json
    free_reference(trainer, recipe)
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
    return finish_stage(trainer, recipe, tokenizer, train_output, extra=trainer.reference_pass)


# ---------------------------------------------------------------------------- SimPO / ORPO rows

def as_text(dataset, tokenizer):
    """Conversational pairs as the text the other stages train on, for CPOTrainer/ORPOTrainer.

    Those trainers append an eos to a reply unless its last token is one; given chat turns, the
    template's reply ends with glue after the end-of-turn token (ChatML: "<|im_end|>\n"), so each
    reply would end "<|im_end|>\n<|im_end|>". Rendered here, each reply stops at its end-of-turn
    token (the tokenizer's eos), and they add nothing.
    """
    if dataset is None:
        return None
    eos = tokenizer.eos_token

    def row(example):
        prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
        out = {"prompt": prompt}
        for key in ("chosen", "rejected"):
            reply = tokenizer.apply_chat_template(example["prompt"] + example[key], tokenize=False)
            if not reply.startswith(prompt):
                raise ValueError("model.chat_template: the prompt renders differently before and inside a "
                                 "conversation, so replies cannot be cut from it")
            reply = reply[len(prompt):]
            end = reply.find(eos)
            out[key] = reply[:end + len(eos)] if end >= 0 else reply
        return out

    return dataset.map(row, remove_columns=dataset.column_names, desc="Rendering pairs as text")


def without_added_bos(tokenizer, prompt_text: str):
    """The tokenizer for CPOTrainer/ORPOTrainer: they put a bos before every prompt that lacks one,
    which DPO, KTO and SFT (and inference through the chat template) never see. Where the template
    writes no bos, a copy without one; else the tokenizer itself."""
    bos = tokenizer.bos_token
    if bos is None or prompt_text.startswith(bos):
        return tokenizer
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.bos_token = None
    return plain
