"""The steps every training stage shares, each a plain function the stage calls in order.

setup_stage -> build_config -> (the stage's model, data and trainer) -> train -> finish_stage
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path

import torch

from . import outcome, tracking
from .checkpoints import newest_checkpoint
from .launch import check_world, configured_state_args, formed_world, init_distributed
from .live import (CheckpointClock, DivergedError, DivergenceGuard, Heartbeat, LearningGuard, ProgressPush,
                   use_own_callback)
from .model import (checkpoint_dtype, engine_keeps_fp32_masters, keep_fp32_masters, load_model, merge_adapter,
                    mixed_precision)
from .recipe import Recipe, TrainingArgs
from .results import (MetricsCallback, build_result, emit, finished_result, model_card, push_to_hub,
                      remove_incomplete_checkpoints, save_final, write_result)

log = logging.getLogger("alignment_trainer")

# Config fields the trainer sets itself: extra_args may not override them.
OWNED_FIELDS = {"output_dir", "resume_from_checkpoint", "deepspeed", "push_to_hub", "hub_model_id", "hub_token",
                "overwrite_output_dir", "logging_dir", "accelerator_config", "report_to", "run_name"}


# ---------------------------------------------------------------------------- setup

def setup_stage(recipe: Recipe) -> dict | None:
    """Logging, distributed state, output dir; the finished result if the stage already completed."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main = int(os.environ.get("RANK", "0")) == 0
    done = finished_result(recipe.output_dir)
    if done is not None:
        if main:
            emit("skipped", reason=f"{recipe.output_dir}/final and result.json exist: stage already complete",
                 checkpoint=done.get("checkpoint"))
            # the shell reads the outcome from the termination message, this attempt's as any other's (a Job
            # run again after its trainer finished: a hang restart, a Job deleted before its end was seen)
            outcome.write(recipe.termination_message_path, done)
        return done
    init_distributed()
    check_world(formed_world())  # before any data, model or step: a wrong world fails at once
    if main:
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
        for path in remove_incomplete_checkpoints(recipe.output_dir):
            log.warning("removed incomplete checkpoint %s (killed while saving)", path)
    return None


def has_test_split(recipe: Recipe) -> bool:
    return bool(recipe.test_datasets) or recipe.test_split_size is not None


def stage_label(recipe: Recipe) -> str:
    """How messages name the stage: its name in the run, else its output directory."""
    return f"stage {recipe.stage_name or recipe.output_dir}"


# ---------------------------------------------------------------------------- TRL config

def build_config(config_cls, recipe: Recipe, **method_fields):
    """config_cls (SFTConfig, DPOConfig, ...) from recipe.training, method fields and extra_args.

    Built before the model is loaded: under ZeRO-3 the DeepSpeed config it creates makes
    from_pretrained partition the weights as they load (zero3_init_flag).
    """
    t = recipe.training
    fields = {f.name for f in dataclasses.fields(config_cls)}
    on_gpu = torch.cuda.is_available()
    # Mixed precision follows model.dtype (model.py, "precision"), not the accelerate config file:
    # transformers reads ACCELERATE_MIXED_PRECISION when bf16 and fp16 are both off.
    precision = mixed_precision(recipe.model)
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision
    kwargs = dict(
        output_dir=recipe.output_dir,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps or -1, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, weight_decay=t.weight_decay,
        # transformers 5 folded warmup_ratio into warmup_steps: a float below 1 is a ratio.
        warmup_steps=min(t.warmup_ratio, 0.999),
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_length=t.max_length, seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing, activation_checkpointing=t.gradient_checkpointing,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_strategy="steps", logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps" if (t.eval_steps and has_test_split(recipe)) else "no", eval_steps=t.eval_steps,
        bf16=precision == "bf16", fp16=precision == "fp16", dataloader_pin_memory=on_gpu,
        **tracking.config_fields(recipe), disable_tqdm=True, include_num_input_tokens_seen="non_padding",
        # A NaN/inf loss must reach the logs (live.DivergenceGuard), not be averaged away.
        logging_nan_inf_filter=False,
        **configured_state_args(),
    )
    kwargs.update(method_fields)
    typed = set(TrainingArgs.model_fields) - {"extra_args"}
    for key, value in t.extra_args.items():
        if key in typed:
            raise ValueError(f"training.extra_args.{key}: set training.{key} instead")
        if key in OWNED_FIELDS:
            raise ValueError(f"training.extra_args.{key}: set by the trainer, not configurable")
        if key not in fields:
            import trl

            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"training.extra_args.{key}: not a {config_cls.__name__} field in TRL {trl.__version__}"
                             f"{hint}")
        kwargs[key] = value
    # Fields some TRL/transformers versions lack (activation_checkpointing) are left out.
    return config_cls(**{k: v for k, v in kwargs.items() if k in fields})


# ---------------------------------------------------------------------------- the reference

def load_reference(recipe: Recipe, tokenizer):
    """The frozen reference to hand TRL, or None where none is needed in memory.

    None under LoRA/QLoRA (TRL scores the reference with the adapter disabled: the very base the
    policy trains on, quantized the same way) and with precomputed reference log-probs (TRL
    computes them with the policy before its first step, when it still is the reference). A
    separate copy only for full fine-tuning, loaded exactly like the policy (dtype, quantization),
    so policy and reference agree at step 0. recipe.ref_model naming another model is loaded the
    same way.
    """
    other = recipe.ref_model not in (None, recipe.model.model_name_or_path)
    if not other and (recipe.lora is not None or recipe.training.precompute_ref_log_probs):
        return None
    return load_model(recipe.model, tokenizer, path=recipe.ref_model if other else None, lora=recipe.lora,
                      trainable=True)


def free_reference(trainer, recipe: Recipe) -> None:
    """With precomputed log-probs an explicitly loaded reference is not needed after __init__."""
    if recipe.training.precompute_ref_log_probs and getattr(trainer, "ref_model", None) is not None:
        trainer.ref_model = None
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def reference_cache(dataset, recipe: Recipe, tokenizer, split: str):
    """`dataset` as an Arrow file every process of the stage maps the same way (or None).

    TRL caches precomputed reference log-probs in a file beside the dataset's own; an in-memory
    dataset has none, so each process would pick its own temporary file and all but the first
    fail to find the one written. The file lives in recipe.cache_dir (the run volume's
    cache/reference-logps/ for a rendered stage; <output_dir>/cache/ for a hand-written recipe),
    named by a key of all that decides reference log-probs (reference_key). TRL then keys its
    log-probs file by that file's fingerprint and a hash of the reference weights, so a rerun, a
    later stage or another run on the volume that asks for the same log-probs finds them, and a
    change of any of these (or of the reference's weights) computes them anew.
    """
    if dataset is None:
        return None
    import hashlib
    import json

    import pyarrow as pa
    from accelerate import PartialState
    from datasets import Dataset

    if dataset._indices is not None:  # a select/shuffle view: write the rows in that order
        dataset = dataset.flatten_indices(keep_in_memory=True)
    digest = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, dataset.data.table.schema) as writer:
        writer.write_table(dataset.data.table)
    digest.update(sink.getvalue().to_pybytes())
    key = reference_key(recipe, tokenizer)
    digest.update(json.dumps(key, sort_keys=True, default=str).encode())
    path = Path(recipe.cache_dir or Path(recipe.output_dir) / "cache") / f"{split}-{digest.hexdigest()[:32]}.arrow"
    with PartialState().main_process_first():
        if not path.is_file():  # the main process writes it; the others find it when they enter
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            from datasets.arrow_writer import ArrowWriter

            with ArrowWriter(path=str(tmp), features=dataset.features) as writer:
                writer.write_table(dataset.data.table)
                writer.finalize()
            os.replace(tmp, path)
            # What decided these log-probs, for a person reading the cache (not read back).
            path.with_suffix(".key.json").write_text(json.dumps({**key, "rows": len(dataset)}, indent=1, default=str))
    return Dataset.from_file(str(path))


def reference_key(recipe: Recipe, tokenizer) -> dict:
    """What determines a stage's reference log-probs besides its rows (and the reference weights,
    which TRL hashes): the reference, how it is loaded and run, the chat template and tokenizer,
    the lengths, and how the trainer scores (KTO's KL completions depend on the batch size).
    Not the loss, beta or learning rate: a cDPO and a DPO stage on the same data share them."""
    t = recipe.training
    scorer = "kto" if recipe.method == "kto" else "pairwise"
    return {
        "scorer": scorer, "reference": recipe.ref_model or recipe.model.model_name_or_path,
        "revision": recipe.model.model_revision, "dtype": recipe.model.torch_dtype,
        "precision": mixed_precision(recipe.model), "attention": recipe.model.attn_implementation,
        "lora": recipe.lora is not None, "quantization": recipe.lora.quantization if recipe.lora else "none",
        "chat_template": tokenizer.chat_template, "vocab": len(tokenizer), "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token, "bos": tokenizer.bos_token,
        "max_length": t.max_length, "max_prompt_length": t.max_prompt_length,
        "ld_alpha": t.extra_args.get("ld_alpha"),
        "kl_batch": t.per_device_train_batch_size if scorer == "kto" else None,
        # replies scored through their end-of-turn token (tokens.CompletionEndsAtEndOfTurn); log-probs
        # cached before that included the template's glue after it and must not be read back
        "completion_end": "end_of_turn",
    }


# ---------------------------------------------------------------------------- prompt truncation

def _prompt_length(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_prompt(messages: list[dict], tokenizer, max_tokens: int) -> list[dict]:
    """Keep the END of a conversation prompt within max_tokens (chat template included).

    Drops whole early turns first (keeping a leading system message while it fits and the
    prompt starting with a user turn), then the system message, then cuts the last user
    message's text from the left, token by token.
    """
    if _prompt_length(tokenizer, messages) <= max_tokens:
        return messages
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
        for candidate in (system + turns, turns):
            if _prompt_length(tokenizer, candidate) <= max_tokens:
                return candidate
    # Only the last user turn is left and it alone is too long: keep its last tokens.
    last = dict(turns[-1])
    ids = tokenizer(last["content"], add_special_tokens=False)["input_ids"]
    overhead = _prompt_length(tokenizer, [{**last, "content": ""}])
    keep = max(max_tokens - overhead, 0)
    while keep > 0:
        last["content"] = tokenizer.decode(ids[-keep:])
        if _prompt_length(tokenizer, [last]) <= max_tokens:
            return [last]
        keep -= 1  # a decode/re-encode round trip may merge differently: shave one more
    raise ValueError(f"training.max_prompt_length: {max_tokens} tokens cannot hold even the chat template "
                     f"({overhead} tokens); raise it")


def truncate_prompts(dataset, tokenizer, max_tokens: int | None):
    """Apply truncate_prompt to a dataset's conversational `prompt` column (no-op when unset)."""
    if max_tokens is None or dataset is None or "prompt" not in dataset.column_names:
        return dataset
    return dataset.map(lambda row: {"prompt": truncate_prompt(row["prompt"], tokenizer, max_tokens)},
                       desc=f"Truncating prompts to {max_tokens} tokens")


# ---------------------------------------------------------------------------- train & finish

def train(trainer, recipe: Recipe):
    """trainer.train(), resuming from the newest complete checkpoint in output_dir."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # MetricsCallback prints JSON progress lines instead
    clock = CheckpointClock()  # first: the others read it after each save
    trainer.add_callback(clock)
    trainer.add_callback(LearningGuard(recipe.guards))  # before the rows are written: it adds its figures to them
    trainer.add_callback(MetricsCallback(recipe.output_dir, clock))
    trainer.add_callback(tracking.TrackedRun(recipe))  # after transformers' tracker callbacks
    trainer.add_callback(DivergenceGuard())  # after MetricsCallback: the NaN row is in metrics.jsonl
    push = None
    if use_own_callback():
        # transformers adds its KubeflowCallback whenever KUBEFLOW_TRAINER_SERVER_URL is set; ours
        # speaks the same contract with more in it (ALIGNMENT_PROGRESS_CALLBACK=transformers keeps theirs).
        from transformers.integrations import KubeflowCallback

        trainer.remove_callback(KubeflowCallback)
        push = ProgressPush(clock=clock)
        trainer.add_callback(push)
    heartbeat = Heartbeat(push)
    trainer.add_callback(heartbeat)
    keep_fp32_masters(trainer.model)  # QLoRA: TRL cast the adapters to bf16 (model.keep_fp32_masters)
    # TRL writes <output_dir>/README.md at each checkpoint from the loaded model's config ("a fine-tuned
    # version of [None]" for a local directory): the stage's own card (card.stage_card) instead.
    trainer.create_model_card = lambda *args, **kwargs: _stage_card(trainer, recipe)
    check_world(trainer.accelerator.num_processes)  # accelerate's state, as the steps will use it
    resume = newest_checkpoint(recipe.output_dir)
    if trainer.is_world_process_zero():
        emit("start", method=recipe.method, stage=recipe.stage_name, resume_from=resume,
             world_size=trainer.args.world_size, device=str(trainer.args.device))
    try:
        return trainer.train(resume_from_checkpoint=resume)
    finally:  # a stage that raises (diverged, not learning, bad data) skips on_train_end: no beat outlives it
        heartbeat.stop()
        if push is not None:
            push.stop_beats()


def _stage_card(trainer, recipe: Recipe) -> None:
    if trainer.is_world_process_zero():
        (Path(recipe.output_dir) / "README.md").write_text(model_card(recipe, trainer))


def finish_stage(trainer, recipe: Recipe, tokenizer, train_output, extra: dict | None = None) -> dict | None:
    """Evaluate on the test split, write final/, result.json (with the stage's `extra` metrics), the
    termination message; push."""
    check_finite(trainer)
    eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else None
    merge = None
    if recipe.lora is None:
        cast_to_saved_dtype(trainer, recipe)
    if recipe.lora and recipe.lora.merge:
        def merge(adapter_dir, out_dir):
            merge_adapter(recipe.model, tokenizer, adapter_dir, out_dir)
    final = save_final(trainer, recipe, tokenizer, merge)
    if not trainer.is_world_process_zero():
        return None
    result = build_result(recipe, trainer, train_output.metrics, eval_metrics, final)
    if tracking.links(trainer):
        result["tracking"] = tracking.links(trainer)
    result.update(extra or {})
    url = push_to_hub(recipe, final)
    if url:
        result["hub_url"] = url
    write_result(recipe, result)
    emit("done", **{k: v for k, v in result.items() if v is not None})
    return result


def check_finite(trainer) -> None:
    """A model with a NaN or inf weight is never saved as final/ (the next stage would start from it).
    Checks the trainable weights this process holds (under ZeRO-3 its own shards)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    for name, param in model.named_parameters():
        data = getattr(param, "ds_tensor", param)  # DeepSpeed ZeRO-3: the local partition
        if param.requires_grad and data.numel() and not torch.isfinite(data).all():
            raise DivergedError(f"weight {name} is not finite after {trainer.state.global_step} steps: "
                                "final/ is not written")


def cast_to_saved_dtype(trainer, recipe: Recipe) -> None:
    """After training: the fp32 master weights become model.dtype, the dtype final/ is saved in.

    Only where this process holds the whole model in float32 (one process, ddp); DeepSpeed
    gathers 16-bit weights itself and FSDP saves its full state dict.
    """
    if engine_keeps_fp32_masters():
        return
    dtype = checkpoint_dtype(recipe.model)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if dtype != torch.float32 and next(model.parameters()).dtype == torch.float32:
        log.info("final/: saving the float32 master weights as %s (model.dtype)", str(dtype).removeprefix("torch."))
        model.to(dtype)
