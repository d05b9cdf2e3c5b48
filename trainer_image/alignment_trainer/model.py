"""Model and tokenizer loading: chat template, end-of-turn token, pad token, LoRA/QLoRA, merge.

The one invariant this module keeps: the token that ends an assistant turn in the chat
template is the tokenizer's eos_token, the model config's eos_token_id and (first) in
generation_config.eos_token_id. A model trained on a template whose turns end in <|im_end|>
but whose generation_config waits for </s> never stops talking.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .recipe import LoraArgs, ModelArgs
from .tiny import CHATML_TEMPLATE, IM_END, IM_START

log = logging.getLogger(__name__)
_SENTINEL = "\u2063alignment-trainer-sentinel\u2063"


# ---------------------------------------------------------------------------- source

class ModelSourceError(ValueError):
    """The model source is neither a local directory nor a Hub repository we can read (fix the recipe)."""


class HubUnreachable(ConnectionError):
    """The source reads as a Hub id but the Hub cannot be reached (retryable)."""


HUB_CHECK_TIMEOUT_S = 10.0


def check_source(source: str, revision: str = "main", field: str = "model.model_name_or_path") -> None:
    """Fail in seconds when `source` is neither a local model directory nor a readable Hub repo.

    transformers reads a string as a local path when such a directory exists and as a Hub id
    otherwise; a typo'd path then becomes a Hub download that retries for over a minute and ends
    in an error about internet connections. This check says which reading failed and why.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    path = Path(source).expanduser()
    if path.is_dir():
        return
    named = f"{field}: {source!r}"
    if path.exists():
        raise ModelSourceError(f"{named} is a file; a model source is a directory holding config.json "
                               "and the weights, or a Hugging Face Hub id (org/name)")
    as_path = f"as a local path: no such directory ({path.absolute()})"
    try:
        validate_repo_id(source)
        hub_id = not source.startswith(("/", "./", "../", "~"))
    except HFValidationError:
        hub_id = False
    if not hub_id:
        raise ModelSourceError(
            f"{named} is not a model: {as_path}; as a Hugging Face Hub id: not one (an id is 'name' or "
            "'org/name'). Fix the path (on a cluster: a path on the run's volume, under its mountPath) "
            "or give a Hub id")
    if isinstance(try_to_load_from_cache(source, "config.json", revision=revision), str):
        return  # in the local Hub cache: loads offline too
    if constants.HF_HUB_OFFLINE:
        raise ModelSourceError(
            f"{named} is not a model here: {as_path}; as a Hub id (revision {revision!r}): not in the local "
            f"Hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading it. Fix the "
            "path, download the model into the cache first, or unset HF_HUB_OFFLINE")
    try:
        HfApi().model_info(source, revision=revision, timeout=HUB_CHECK_TIMEOUT_S)
    except RevisionNotFoundError as e:
        raise ModelSourceError(f"{named}: the Hub repository has no revision {revision!r} "
                               "(model.model_revision; spec.model.revision in a run)") from e
    except RepositoryNotFoundError as e:
        raise ModelSourceError(
            f"{named} is not a model: {as_path}; as a Hub id: no such repository on {constants.ENDPOINT}, "
            "or it is private or gated and no token with access was given (HF_TOKEN; "
            "spec.trainer.hfTokenSecretRef in a run). Fix the path or the id, or give a token") from e
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeouts, proxies: one message
        if type(e).__name__ in ("GatedRepoError", "HfHubHTTPError") and getattr(e, "response", None) is not None \
                and getattr(e.response, "status_code", 0) in (401, 403):
            raise ModelSourceError(f"{named}: the Hub refuses access ({e.response.status_code}); give a token "
                                   "with access (HF_TOKEN; spec.trainer.hfTokenSecretRef in a run)") from e
        raise HubUnreachable(
            f"{named} is not a model here: {as_path}; as a Hub id: cannot reach {constants.ENDPOINT} "
            f"({type(e).__name__}: {e}). Fix the path, make the Hub reachable (HF_ENDPOINT for a mirror), "
            "or put the model on the run's volume and give its path") from e


# ---------------------------------------------------------------------------- tokenizer

def load_tokenizer(args: ModelArgs) -> PreTrainedTokenizerBase:
    """Tokenizer with a chat template, a consistent eos and a pad token distinct from it."""
    check_source(args.model_name_or_path, args.model_revision)
    if args.tokenizer_name_or_path:
        check_source(args.tokenizer_name_or_path, args.model_revision, field="model.tokenizer_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(
        args.tokenizer_name_or_path or args.model_name_or_path,
        revision=args.model_revision, trust_remote_code=args.trust_remote_code)
    original_eos = tokenizer.eos_token

    # Chat template: the recipe's, else the tokenizer's own, else ChatML (adding its tokens).
    if args.chat_template:
        tokenizer.chat_template = args.chat_template
    elif not tokenizer.chat_template:
        missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        tokenizer.chat_template = CHATML_TEMPLATE

    # The end-of-turn token becomes the eos: generation stops where training turns ended.
    tokenizer.eos_token = end_of_turn_token(tokenizer)

    # Pad: never the eos (a collator that masks pad ids would then never train the stop).
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        if original_eos and original_eos != tokenizer.eos_token:
            tokenizer.pad_token = original_eos
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    # Left padding for generation; TRL's collators pad themselves.
    tokenizer.padding_side = "left"
    return tokenizer


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token the chat template writes right after an assistant message's content."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception as e:  # a template that cannot render a plain user/assistant exchange
        raise ValueError(f"model.chat_template: cannot render a user/assistant exchange: {e}") from e
    if _SENTINEL not in text:
        raise ValueError("model.chat_template: the template does not render the assistant message's content")
    after = text.split(_SENTINEL, 1)[1]
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    stripped = after.lstrip(" ")
    for token in specials:
        if token and stripped.startswith(token):
            return token
    raise ValueError(
        "model.chat_template: an assistant turn must end with a special end-of-turn token (e.g. <|im_end|>, "
        f"<|eot_id|>, </s>), otherwise the trained model never stops; the template writes {after[:40]!r} "
        "after the assistant's message")


# ---------------------------------------------------------------------------- model

def resolve_dtype(name: str) -> torch.dtype | str:
    """`auto` keeps the checkpoint's dtype on GPU and trains in float32 on CPU."""
    if name == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


# ---------------------------------------------------------------------------- precision
#
# What a stage computes in and what it keeps, per model.dtype:
#   GPU, bfloat16 / float16: trainable weights have an fp32 master copy and the forward/backward
#     run under bf16 autocast (fp16: autocast with dynamic loss scaling). DeepSpeed ZeRO and FSDP
#     keep the fp32 copy themselves (the weights load in the requested dtype and they upcast);
#     everywhere else (one process, ddp) the trainable weights load in float32; LoRA/QLoRA
#     adapters are float32 too (peft makes them so; keep_fp32_masters undoes TRL's bf16 cast).
#   CPU: float32 throughout (no autocast); bfloat16 only decides the dtype final/ is saved in.
#   Frozen models (the eval stage's, a LoRA base) load in the requested dtype.
# final/ is written in the requested dtype (float32 for auto on CPU), the same on every path.

def checkpoint_dtype(args: ModelArgs) -> torch.dtype:
    """The dtype model.dtype asks for, `auto` read from the checkpoint's config (float32 on CPU)."""
    dtype = resolve_dtype(args.torch_dtype)
    if dtype != "auto":
        return dtype
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(full_model_source(args.model_name_or_path), revision=args.model_revision,
                                        trust_remote_code=args.trust_remote_code)
    saved = getattr(config.get_text_config(), "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def mixed_precision(args: ModelArgs) -> str:
    """accelerate's mixed_precision for a stage: bf16, fp16 (loss-scaled) or no (CPU, float32)."""
    if not torch.cuda.is_available():
        return "no"
    dtype = checkpoint_dtype(args)
    if dtype == torch.bfloat16:
        if not torch.cuda.is_bf16_supported():
            raise ValueError("model.dtype: bfloat16 needs an Ampere or newer GPU; use float16 (loss-scaled) or float32")
        return "bf16"
    return "fp16" if dtype == torch.float16 else "no"


def engine_keeps_fp32_masters() -> bool:
    """DeepSpeed ZeRO and FSDP (under mixed precision) hold an fp32 copy of the trainable weights."""
    import os

    return any(os.environ.get(var, "false").lower() == "true"
               for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"))


def trainable_dtype(args: ModelArgs, lora: LoraArgs | None) -> torch.dtype | str:
    """The dtype full fine-tuning loads its weights in: float32 (the master copy) unless the
    distributed engine keeps one itself; LoRA's frozen base stays in the requested dtype (peft
    keeps the adapter weights in float32)."""
    if lora is not None:
        return resolve_dtype(args.torch_dtype)
    if engine_keeps_fp32_masters() and mixed_precision(args) != "no":
        return resolve_dtype(args.torch_dtype)
    return torch.float32


def keep_fp32_masters(model) -> list[str]:
    """The trainable parameters TRL cast to a 16-bit dtype, back to float32 (their names).

    TRL 1.16 casts every trainable parameter to bfloat16 when the base is 4/8-bit quantized
    (trl/trainer/{sft,dpo,kto,grpo,reward}_trainer.py, __init__: "When using QLoRA, the PEFT
    adapter weights are converted to bf16"): the QLoRA adapters then have no fp32 master, and
    AdamW's updates fall below bfloat16's resolution (tiny model, LoRA SFT, 10 steps: 0.21% of
    lora_A's entries change at lr 5e-7, 2.7% at 5e-6; in float32 >99.9%). peft made them float32
    and they train under bf16 autocast like every other trainable weight here. Called on the
    trainer's model before the optimizer exists (training.train); DeepSpeed ZeRO and FSDP keep
    their own fp32 copy, so there nothing is cast (ZeRO-3 also needs one dtype across parameters).
    """
    if engine_keeps_fp32_masters():
        return []
    cast = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast.append(name)
    if cast:
        log.info("training %d parameters TRL had cast to 16 bits in float32 (fp32 master weights)", len(cast))
    return cast


def load_model(args: ModelArgs, tokenizer: PreTrainedTokenizerBase, path: str | None = None,
               lora: LoraArgs | None = None, trainable: bool = False, revision: str | None = None) -> PreTrainedModel:
    """The causal LM at `path` (default: the recipe's model), matched to `tokenizer`.

    trainable: the model the stage trains (and a full-fine-tuning reference, loaded exactly like
    it): float32 master weights where no engine keeps them (see trainable_dtype).
    revision: the Hub revision of `path` (default: model.model_revision), e.g. the eval stage's
    reference when it is the run's base model at its pinned revision.
    """
    on_gpu = torch.cuda.is_available()
    revision = args.model_revision if revision is None else revision
    if path and path != args.model_name_or_path:
        check_source(path, revision, field="ref_model")
    if args.attn_implementation == "flash_attention_2" and not on_gpu:
        raise ValueError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa or eager on CPU")
    dtype = trainable_dtype(args, lora) if trainable else resolve_dtype(args.torch_dtype)
    kwargs: dict = dict(revision=revision, dtype=dtype, trust_remote_code=args.trust_remote_code)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if lora is not None and lora.quantization != "none":
        kwargs.update(quantization_kwargs(lora.quantization, on_gpu))
    return _from_pretrained(path or args.model_name_or_path, kwargs, tokenizer)


def adapter_base(source: str) -> str | None:
    """The base model of a LoRA adapter directory (the final/ of a stage with lora.merge false)."""
    import json
    from pathlib import Path

    config = Path(source) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path")


def full_model_source(source: str) -> str:
    """`source`, or for an adapter directory the full model under it (adapters may stack)."""
    seen = [source]
    while (base := adapter_base(seen[-1])) is not None and len(seen) < 16:
        seen.append(base)
    return seen[-1]


def _from_pretrained(source: str, kwargs: dict, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A full model from `source`; an adapter directory is loaded onto its base and merged, so a
    stage can start from (or evaluate) an earlier stage that kept its adapter unmerged."""
    base = adapter_base(source)
    if base is None:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        match_tokenizer(model, tokenizer)
        return model
    if "quantization_config" in kwargs or engine_keeps_fp32_masters():
        raise ValueError(f"model: {source} is a LoRA adapter (an earlier stage with lora.merge false); merging it "
                         "into a quantized or DeepSpeed/FSDP-sharded base is not supported: set lora.merge true on "
                         "that stage")
    from peft import PeftModel

    log.info("%s is a LoRA adapter: loading it onto its base %s and merging", source, base)
    merged = PeftModel.from_pretrained(_from_pretrained(base, kwargs, tokenizer), source).merge_and_unload()
    merged.config._name_or_path = source  # an adapter trained on it names this, not the bare base, as its base
    return merged


def quantization_kwargs(quantization: str, on_gpu: bool) -> dict:
    """QLoRA: the frozen base in 4 or 8 bits (bitsandbytes, CUDA only)."""
    if not on_gpu:
        raise ValueError(f"lora.quantization: {quantization} (QLoRA) needs a CUDA GPU (bitsandbytes); "
                         "use quantization: none on CPU")
    import os

    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # Each process holds its own quantized copy on its own GPU.
    return {"quantization_config": config, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}


def match_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings for added tokens; make config and generation_config agree on eos/pad."""
    # num_embeddings, not weight.shape: under ZeRO-3 the weight is a partitioned, empty placeholder.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        log.info("resizing token embeddings to %d for added special tokens", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    eos = tokenizer.eos_token_id
    model.config.eos_token_id = eos
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    previous = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    # The end-of-turn token first; keep the checkpoint's own stop tokens as extra stops.
    gen.eos_token_id = [eos] + [t for t in previous if t is not None and t != eos]
    if len(gen.eos_token_id) == 1:
        gen.eos_token_id = eos
    gen.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------------------- LoRA

def lora_config(lora: LoraArgs, new_tokens: bool = False):
    """peft LoraConfig for the trainer; new_tokens: also train the (resized) embeddings."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM", modules_to_save=["embed_tokens", "lm_head"] if new_tokens else None)


def added_tokens(model_args: ModelArgs, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether load_tokenizer added tokens the checkpoint's embeddings do not have."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(full_model_source(model_args.model_name_or_path), revision=model_args.model_revision,
                                        trust_remote_code=model_args.trust_remote_code)
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    return vocab is not None and len(tokenizer) > vocab


def merge_adapter(model_args: ModelArgs, tokenizer: PreTrainedTokenizerBase, adapter_dir: str, out_dir: str) -> None:
    """Base weights + trained adapter -> a standalone model in out_dir (no peft needed to load it).

    Reloads the base in full precision on CPU instead of merging the training copy: that works
    the same after ZeRO-3 (sharded) and QLoRA (quantized base) training.
    """
    from peft import PeftModel

    dtype = resolve_dtype(model_args.torch_dtype) if model_args.torch_dtype != "auto" else "auto"
    base = _from_pretrained(model_args.model_name_or_path, dict(
        revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code, dtype=dtype,
        device_map="cpu"), tokenizer)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
