"""The stage recipe: the one contract between the operator and the trainer.

A recipe describes one training (or evaluation) stage with TRL's own field names, the way
alignment-handbook recipes do. The operator renders one per stage into a ConfigMap; a person
can write one by hand and run it:

    python -m alignment_trainer recipe.yaml
    accelerate launch --config_file trainer_image/accelerate/zero3.yaml -m alignment_trainer recipe.yaml

This module is pure: it imports pydantic and yaml only (never torch), so the operator can
build and validate recipes without the training stack installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["sft", "dpo", "ipo", "kto", "orpo", "simpo", "eval"]
PREFERENCE_METHODS = ("dpo", "ipo", "orpo", "simpo")
TRAINING_METHODS = ("sft", "kto", *PREFERENCE_METHODS)

# TRL 1.16 loss_type values per trainer (DPOConfig, KTOConfig, experimental CPOConfig for SimPO).
# Kept here, torch-free, so the operator can refuse an unknown one at admission; the trainer
# checks them again against the TRL it runs.
LOSS_TYPES: dict[str, tuple[str, ...]] = {
    "dpo": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
            "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
    "ipo": ("ipo",),
    "kto": ("kto", "apo_zero_unpaired"),
    "simpo": ("simpo",),
    "orpo": (),
    "sft": (),
    "eval": (),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelArgs(_Strict):
    """Which model to start from and how to load it (alignment-handbook's ModelArguments)."""

    model_name_or_path: str = Field(description="Hub id, local directory, or path on the run's volume.")
    model_revision: str = Field("main", description="Hub revision (branch, tag or commit).")
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; bfloat16 on Ampere+ GPUs, float32 on CPU.")
    attn_implementation: Literal["flash_attention_2", "sdpa", "eager"] | None = Field(
        None, description="Attention kernel; None lets transformers choose (sdpa).")
    trust_remote_code: bool = Field(False, description="Run modelling code from the Hub repo.")
    chat_template: str | None = Field(
        None, description="Jinja chat template; default: the tokenizer's own, else ChatML.")
    tokenizer_name_or_path: str | None = Field(None, description="Tokenizer, if not the model's.")


class DatasetArgs(_Strict):
    """One dataset of a mixture."""

    path: str = Field(description="Hub id, local JSON/JSONL/Parquet/CSV file, or a `datasets` save_to_disk directory.")
    name: str | None = Field(None, description="Dataset configuration (the `name` of load_dataset).")
    split: str = Field("train", description="Split to read.")
    columns: list[str] | None = Field(None, description="Columns to keep; default: all the method needs.")
    weight: float = Field(1.0, gt=0, le=1, description="Fraction of rows kept (0 < w <= 1).")
    max_invalid_fraction: float = Field(
        0.0, ge=0, lt=1, description="Malformed rows skipped with a warning up to this fraction; above it, an error.")


class LoraArgs(_Strict):
    """LoRA / QLoRA adapter training (peft)."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    lora_alpha: int = Field(32, gt=0, description="Adapter scaling alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field("all-linear", description="Modules to adapt.")
    quantization: Literal["none", "4bit", "8bit"] = Field("none", description="QLoRA base quantization (GPU only).")
    merge: bool = Field(True, description="Merge the adapter into a standalone model in final/.")


class TrainingArgs(_Strict):
    """Hyperparameters, named as in TRL's SFTConfig / DPOConfig / KTOConfig."""

    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1: run the epochs.")
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler_type: str = Field("cosine")
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    per_device_train_batch_size: int = Field(8, gt=0)
    per_device_eval_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(1024, gt=0, description="Longest tokenized sequence (prompt + completion).")
    max_prompt_length: int | None = Field(None, gt=0, description="Prompts are cut to this many tokens, keeping their end.")
    beta: float = Field(0.1, gt=0, description="Preference methods: KL strength (DPO) or reward scale (SimPO).")
    loss_type: str | None = Field(None, description="TRL loss_type; default per method.")
    packing: bool = Field(False, description="SFT: pack sequences into max_length blocks.")
    completion_only_loss: bool | None = Field(None, description="SFT: train on completions only (prompt masked).")
    gradient_checkpointing: bool = Field(False)
    seed: int = Field(42)
    precompute_ref_log_probs: bool = Field(False, description="DPO: compute reference log-probs once, before training.")
    save_steps: int = Field(500, gt=0)
    save_total_limit: int | None = Field(2)
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, description="Evaluate every N steps; None: at the end only.")
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Passed as-is to the TRL config; unknown keys are an error.")


class JudgeArgs(_Strict):
    """An OpenAI-compatible chat endpoint used as a pairwise judge."""

    base_url: str = Field(description="e.g. https://api.openai.com/v1")
    model: str = Field(description="Judge model name.")
    api_key_env: str = Field("JUDGE_API_KEY", description="Environment variable holding the API key.")
    max_prompts: int = Field(50, gt=0)


class EvalArgs(_Strict):
    """What the eval method measures."""

    metrics: list[Literal["preference", "loss", "generations", "judge"]] = Field(
        default_factory=lambda: ["preference", "loss", "generations"], description="What to measure.")
    reference_model: str | None = Field(None, description="Model to compare against (preference accuracy, judge).")
    prompts: DatasetArgs | None = Field(None, description="Prompts to generate for; default: test-split prompts.")
    max_new_tokens: int = Field(128, gt=0)
    num_generations: int = Field(16, gt=0, description="How many prompts to generate for.")
    judge: JudgeArgs | None = None


class Recipe(_Strict):
    """One stage, everything the trainer needs and nothing it does not."""

    method: Method
    model: ModelArgs
    ref_model: str | None = Field(None, description="Preference methods: reference model; default: the starting model.")
    datasets: list[DatasetArgs] = Field(default_factory=list)
    test_datasets: list[DatasetArgs] = Field(default_factory=list)
    test_split_size: float | None = Field(
        None, gt=0, description="Held-out rows taken from the training mixture: a count, or a fraction below 1.")
    training: TrainingArgs = Field(default_factory=TrainingArgs)
    lora: LoraArgs | None = None
    eval: EvalArgs | None = None
    output_dir: str
    termination_message_path: str | None = Field(
        None, description="Where to write a compact JSON result (Kubernetes termination message).")
    push_to_hub: bool = False
    hub_model_id: str | None = None
    # Provenance for the model card and result.json.
    run_name: str | None = None
    stage_name: str | None = None
    base_model: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.method in TRAINING_METHODS and not self.datasets:
            raise ValueError(f"datasets: method {self.method!r} needs at least one dataset")
        if self.test_datasets and self.test_split_size is not None:
            raise ValueError("test_datasets and test_split_size are exclusive: give one")
        t = self.training
        known = LOSS_TYPES[self.method]
        if t.loss_type is not None and t.loss_type not in known:
            raise ValueError(
                f"training.loss_type: {t.loss_type!r} is not a {self.method} loss; "
                f"accepted: {', '.join(known) or 'none (leave it unset)'}")
        if t.max_prompt_length is not None and t.max_prompt_length >= t.max_length:
            raise ValueError(
                f"training.max_prompt_length ({t.max_prompt_length}) must be below "
                f"training.max_length ({t.max_length})")
        return self

    @property
    def effective_loss_type(self) -> str | None:
        """The TRL loss_type this recipe trains with (ipo is DPO with loss_type ipo)."""
        if self.training.loss_type:
            return self.training.loss_type
        return {"dpo": "sigmoid", "ipo": "ipo", "kto": "kto", "simpo": "simpo"}.get(self.method)

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from YAML or JSON; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SystemExit(f"recipe {path}: cannot read: {e}") from e
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise SystemExit(f"recipe {path}: expected a mapping, got {type(data).__name__}")
    return Recipe.model_validate(data)
