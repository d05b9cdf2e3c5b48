"""Sampling answers from a frozen model with transformers: exactly the settings asked for.

generate() answers greedily (eval's generations, rewards and benchmarks) or samples (generate's
completions, with do_sample and friends) in left-padded batches, stopping at the end-of-turn token.
transformers fills every setting a call leaves unset from the checkpoint's generation_config (an
Instruct model's repetition_penalty, top_k, min_p, ...); generate() sets it aside for the call, and
ignored_generation_settings names what was not used (result.json's generation_config_ignored).
"""

from __future__ import annotations

import torch

from .results import TaskProgress


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
    report = TaskProgress(task, len(prompts))
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
            report(min(start + batch_size, len(prompts)))
    finally:
        model.generation_config = own
    return answers
