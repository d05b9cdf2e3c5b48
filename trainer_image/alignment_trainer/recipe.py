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
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .methods import (BETA_MEANINGS, LABEL_SMOOTHING_LOSSES, LABEL_SMOOTHING_NEEDED, METHODS, DataKind,  # noqa: F401
                      MethodInfo, _method_enum, all_loss_types, beta_description, check_method, data_methods,
                      grouped, label_smoothing_problem, learning_rate_description, loss_type_description,
                      loss_type_problem, method_names, output_kind, preference_methods, reads_outputs,
                      training_methods)
from .outcome import NOT_LEARNING
from .rules import recipe_names, recipe_problems, recipe_rules, training_rules


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Defaults here equal the AlignmentRun API's (tests/unit/test_recipe_contract.py renders a default
# stage of every method and compares), so a hand-written recipe trains like the same stage in a run.

class ModelLoading(_Strict):
    """How a model is loaded: the fields a recipe (ModelArgs) and a run (api.spec.ModelSpec: camelCase, torch_dtype
    and attn_implementation shortened to dtype and attention by rules.API_NAMES) share, declared once."""

    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("bfloat16", description=(
        "Compute dtype and the dtype final/ is saved in. bfloat16 on Ampere or newer GPUs; float16 "
        "trains with dynamic loss scaling; auto keeps the checkpoint's own. Trainable weights always "
        "keep a float32 master copy: DeepSpeed ZeRO and FSDP hold it (sharded), under ddp or one "
        "process the model loads in float32 and runs under autocast, about 16 bytes per trained "
        "parameter with AdamW (weights, gradients, two moments) plus a float32 reference for "
        "full-fine-tuning DPO/KTO; use ZeRO, LoRA or precomputeRefLogProbs for large models. Frozen "
        "models (a LoRA base, the eval stage's) load in this dtype. CPU stages compute in float32."))
    attn_implementation: Literal["flash_attention_2", "sdpa", "eager"] = Field("sdpa", description=(
        "Attention kernel. sdpa works everywhere (on a GPU, bf16/fp16: torch's own FlashAttention-2 "
        "kernel); flash_attention_2 (varlen attention, for packing) needs a GPU and loads transformers' hub "
        "kernel kernels-community/flash-attn2 in the GPU trainer image (the [gpu] extra's kernels package; "
        "fetched from the Hub at the first load), or flash-attn where installed."))
    chat_template: str | None = Field(None, max_length=65536, description=(
        "Jinja chat template. Default: the tokenizer's own; ChatML when it has none."))
    trust_remote_code: bool = Field(False, description="Allow modelling code from the model's Hub repository to run.")



class ModelArgs(ModelLoading):
    """Which model to start from and how to load it (alignment-handbook's ModelArguments)."""

    model_name_or_path: str = Field(description="Hub id, local directory, or path on the run's volume.")
    model_revision: str = Field("main", description="Hub revision (branch, tag or commit).")
    tokenizer_name_or_path: str | None = Field(None, description="Tokenizer, if not the model's.")


class DatasetRows(_Strict):
    """Which rows of a dataset are read: the fields a recipe (DatasetArgs) and a run (api.spec.DatasetSpec,
    camelCase) share, declared once."""

    split: str = Field("train", max_length=256, description="Split to read, e.g. train_sft or train_prefs.")
    columns: list[str] | None = Field(None, max_length=64, description=(
        "Columns to keep. Default: the ones the method needs (messages; prompt/chosen/rejected; "
        "prompt/completion/label)."))
    weight: float = Field(1.0, gt=0, le=1, description=(
        "Fraction of the split's rows kept, 0 < weight <= 1 (alignment-handbook's dataset_mixer)."))
    max_invalid_fraction: float = Field(0.0, ge=0, lt=1, description=(
        "Fraction of rows that may be malformed (missing column, roles out of order, empty "
        "reply) and are skipped with a warning; above it the stage fails naming the first bad "
        "row. Default 0: every row must be valid. Scraped Hub sets such as HH-RLHF may need 0.01."))



class DatasetArgs(DatasetRows):
    """One dataset of a mixture."""

    path: str = Field(description=(
        "Hub id, local JSON/JSONL/CSV file (also .gz/.bz2/.xz/.zst; CSV values as text), Parquet file, or a "
        "`datasets` save_to_disk directory (a run's source, or the file its stage wrote)."))
    name: str | None = Field(None, description="Dataset configuration (the `name` of load_dataset; a run's config).")


class LoraArgs(_Strict):
    """LoRA / QLoRA adapter training (peft).

    Declared once for the recipe and the AlignmentRun (api.spec.LoraSpec: camelCase, lora_alpha and lora_dropout
    shortened to alpha and dropout by rules.API_NAMES, and target_modules a list there)."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    lora_alpha: int = Field(32, gt=0, description="Adapter scaling, lora_alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field("all-linear", description=(
        "Module names to adapt, or all-linear: every linear layer but the output head (peft's shorthand)."))
    quantization: Literal["none", "4bit", "8bit"] = Field("none", description=(
        "QLoRA: load the base model quantized with bitsandbytes (GPU stages only). The adapters keep float32 "
        "master weights either way, and a stage with lora defaults to an adapter's learning rate "
        "(training.learningRate)."))
    merge: bool = Field(True, description="Merge the adapter into a standalone model in the stage's final/.")


Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
]


class Training(_Strict):
    """Hyperparameters, named as in TRL's SFTConfig / DPOConfig / KTOConfig: the fields a recipe (TrainingArgs) and
    a run (api.spec.TrainingSpec: camelCase, a few shortened by rules.API_NAMES) share, declared once."""

    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the training data (num_train_epochs).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps, overriding epochs.")
    learning_rate: float | None = Field(None, gt=0, description=learning_rate_description())
    lr_scheduler_type: Scheduler = Field("cosine", description="Learning-rate schedule (lr_scheduler_type).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Sequences per device per micro-step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    max_length: int = Field(1024, gt=0, description="Longest tokenized sequence, prompt and completion together.")
    max_prompt_length: int | None = Field(None, gt=0, description=(
        "Preference methods and generate: prompts are cut to this many tokens, keeping their end. Default: "
        "half of maxLength (generate: no cut). Must be below maxLength."))
    beta: float | None = Field(None, gt=0, description=beta_description())
    loss_type: str | None = Field(None, json_schema_extra=lambda schema: schema.update(enum=all_loss_types()),
                                  description=loss_type_description())
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "Epsilon, the assumed fraction of flipped preference labels, 0 <= epsilon < 0.5, read only by the "
        f"lossTypes {', '.join(LABEL_SMOOTHING_LOSSES)} (cdpo: the original DPO code's label_smoothing, HALOs "
        "uses 0.2; the others TRL's). A value above 0 with any other loss or method is refused (it would be "
        f"ignored); {' and '.join(LABEL_SMOOTHING_NEEDED)} need one above 0."))
    slic_lambda: float = Field(0.1, ge=0, description=(
        "slic: weight of the cross-entropy regulariser on the chosen reply (HALOs' lambda_coef, 0.1); "
        "beta is SLiC's hinge margin (default 1.0)."))
    packing: bool = Field(False, description="SFT: pack several examples into each maxLength sequence.")
    completion_only_loss: bool = Field(True, description=(
        "SFT: the loss covers only what the model answers: every assistant reply of a chat "
        "(through its end-of-turn token, any chat template) or the completion of prompt/completion "
        "data. false trains on the whole sequence, prompts included, as alignment-handbook's SFT "
        "recipes do."))
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass to save memory.")
    seed: int = Field(42, description="Seed for data order, splits and initialisation.")
    precompute_ref_log_probs: bool = Field(False, description=(
        "DPO/IPO/KTO: compute the reference model's log-probs once before training, so no "
        "reference stays in memory (they are cached in the stage's directory on the volume)."))
    save_steps: int = Field(100, gt=0, description="Write a resumable checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on the volume (oldest deleted first).")
    logging_steps: int = Field(10, gt=0, description="Log loss and metrics every N steps (metrics.jsonl, status).")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate on the test split every N steps; default: at the end.")
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Passed as-is to the TRL config; unknown keys are an error.")

    @field_validator("loss_type")
    @classmethod
    def _known_loss_type(cls, value: str | None) -> str | None:
        if value is not None and value not in all_loss_types():
            raise ValueError(f"{value!r} is not a loss type; accepted: {', '.join(all_loss_types())}")
        return value


class TrainingArgs(Training):
    """A recipe's hyperparameters: the run's, and what render derives from them."""

    per_device_eval_batch_size: int = Field(8, gt=0, description=(
        "Sequences per device per evaluation step (a run's: per_device_train_batch_size)."))


class Judge(_Strict):
    """An OpenAI-compatible chat endpoint used as a judge: the fields a recipe (JudgeArgs) and a run
    (api.spec.JudgeSpec, camelCase) share, declared once; each adds where the API key comes from."""

    base_url: str = Field(min_length=1, max_length=1024, description=(
        "OpenAI-compatible API base URL, e.g. https://api.openai.com/v1. No credentials in it: the key comes "
        "from apiKeySecretRef."))
    model: str = Field(min_length=1, max_length=256, description="Judge model name.")
    max_prompts: int = Field(50, gt=0, description="Prompts judged, each once per order (position-swapped).")
    timeout_seconds: float = Field(120.0, gt=0, description="Longest wait for one judge answer, in seconds.")
    max_retries: int = Field(3, ge=1, le=20, description=(
        "Tries per judge request (timeouts, 5xx, unparseable answers), with backoff; then the stage fails "
        "(retryable), keeping the answers already generated for the next attempt."))


class JudgeArgs(Judge):
    """A judge in a recipe: its API key from the environment."""

    api_key_env: str = Field("JUDGE_API_KEY", description=(
        "Environment variable holding the API key (a run's apiKeySecretRef, through a secretKeyRef)."))


class LmEvalArgs(_Strict):
    """lm-evaluation-harness tasks, run through lm_eval.simple_evaluate on the evaluated model.

    Declared once for the recipe and the AlignmentRun (api.spec.LmEvalSpec: the same fields, camelCase)."""

    tasks: list[str] = Field(min_length=1, max_length=64, description=(
        "lm-evaluation-harness task or group names (ifeval, gsm8k, mmlu, ...) or paths of task YAML files "
        "on the run's volume (custom tasks, e.g. on local JSON data with dataset_path: json)."))
    data_files: dict[str, str] = Field({}, description=(
        "Task name -> a JSON/JSONL file on the volume that replaces that task's Hub dataset (e.g. ifeval -> an "
        "offline copy of google/IFEval); prompts, checkers and metrics stay lm-eval's."))
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt. Default: each task's own.")
    limit: float | None = Field(None, gt=0, description="Documents per task: a count, or a fraction below 1. Default: all.")
    apply_chat_template: bool = Field(True, description="Format prompts with the model's own chat template.")
    batch_size: int = Field(8, gt=0, description="Requests per forward pass or generate call.")
    max_gen_toks: int | None = Field(None, gt=0, description="Cap on tokens generated per request. Default: each task's own.")
    reference: bool = Field(False, description=(
        "Also run the tasks on the reference model, side by side (keys prefixed reference_)."))


class AlpacaEvalArgs(_Strict):
    """AlpacaEval 2: the model's answers against reference outputs, annotated by alpaca-eval with eval.judge.

    Declared once for the recipe and the AlignmentRun (api.spec.AlpacaEvalSpec, camelCase, whose datasets may
    name a stage)."""

    reference_outputs: DatasetArgs = Field(description=(
        "Reference answers: columns instruction, output (and generator), e.g. tatsu-lab/alpaca_eval "
        "alpaca_eval_gpt4_baseline split eval."))
    prompts: DatasetArgs | None = Field(None, description=(
        "Instructions the model answers (column instruction); None: those of reference_outputs."))
    annotator_config: str | None = Field(None, max_length=1024, description=(
        "An alpaca-eval annotator config directory on the volume. Default: AlpacaEval 2's "
        "weighted_alpaca_eval_gpt4_turbo, pointed at eval.judge."))
    max_instances: int | None = Field(None, gt=0, description="First N instructions only. Default: all.")
    max_new_tokens: int = Field(2048, gt=0, description="Longest answer.")
    lc_glm: Literal["length_controlled_v1", "length_controlled_minimal"] = Field(
        "length_controlled_v1", description=(
            "alpaca-eval's length-control GLM: length_controlled_v1 (the leaderboard's; only for AlpacaEval's 805 "
            "instructions in order) or length_controlled_minimal (length alone, for other instruction sets)."))


class MtBenchArgs(_Strict):
    """MT-Bench: two-turn answers graded 1-10 per turn by eval.judge (single-answer grading).

    Declared once for the recipe and the AlignmentRun (api.spec.MtBenchSpec, camelCase, whose questions may
    name a stage)."""

    questions: DatasetArgs = Field(description=(
        "Questions: prompt (the two user turns), category, reference (answers for math/reasoning/coding, "
        "optional), prompt_id; e.g. HuggingFaceH4/mt_bench_prompts."))
    max_questions: int | None = Field(None, gt=0, description="First N questions only. Default: all.")
    max_new_tokens: int = Field(1024, gt=0, description="Longest answer per turn.")


class Eval(_Strict):
    """What an eval stage generates: the fields a recipe (EvalArgs) and a run (api.spec.EvalSpec, camelCase) share,
    declared once; the rest of each names models, datasets, a judge's key and rewards the other's way."""

    metrics: list[Literal["preference", "loss", "generations", "judge"]] = Field(
        ["preference", "loss", "generations"], max_length=4, description=(
            "What to measure: held-out preference accuracy and reward margins against the "
            "reference; held-out loss and perplexity; generations for a prompt set; an LLM-judge "
            "win rate (needs judge)."))
    max_new_tokens: int = Field(256, gt=0, description="Longest generation.")
    num_generations: int = Field(16, gt=0, description="Prompts generated for.")


class EvalArgs(Eval):
    """What the eval method measures."""

    reference_model: str | None = Field(None, description="Model to compare against (preference accuracy, judge).")
    reference_revision: str = Field("main", description=(
        "Hub revision of reference_model (the run's model.revision when the reference is the base model); "
        "ignored for a local directory."))
    reward_model: str | None = Field(None, description=(
        "A reward model (a reward stage's final/): scores the held-out pairs (reward_model_accuracy) and the "
        "model's and the reference's generations (reward_model_win_rate)."))
    prompts: DatasetArgs | None = Field(None, description="Prompts to generate for; default: test-split prompts.")
    judge: JudgeArgs | None = Field(None, description=(
        "LLM judge; required when metrics include judge, and for alpaca_eval and mt_bench."))
    lm_eval: LmEvalArgs | None = Field(None, description="lm-evaluation-harness tasks (IFEval, GSM8K, custom, ...).")
    alpaca_eval: AlpacaEvalArgs | None = Field(None, description="AlpacaEval 2 win rate and length-controlled win rate.")
    mt_bench: MtBenchArgs | None = Field(None, description="MT-Bench 1-10 grades per turn, category and overall.")
    rewards: list["RewardArgs"] = Field(default_factory=list, description=(
        "Rewards (grpo's kinds) scoring both models' greedy answers to `prompts` (which carry the reference "
        "columns the rules read): mean_reward and reference_mean_reward; [] measures none."))


class TrackingArgs(_Strict):
    """Experiment tracking through transformers' own integrations (TrainingArguments.report_to).

    Credentials never appear here: W&B reads WANDB_API_KEY, MLflow MLFLOW_TRACKING_USERNAME/PASSWORD or
    MLFLOW_TRACKING_TOKEN from the environment (on a cluster: secretKeyRefs)."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Trackers the stage logs to; [] logs to none.")
    tracked_run_name: str | None = Field(None, description=(
        "The run's name in every tracker; default: <run_name>/<stage_name> (else the output directory's name)."))
    tensorboard_dir: str | None = Field(None, description="TensorBoard event files' directory; default: <output_dir>/tensorboard.")
    wandb_project: str | None = Field(None, description="W&B project (WANDB_PROJECT); required with wandb.")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user); default: the API key's.")
    wandb_mode: Literal["online", "offline"] = Field("online", description=(
        "offline writes the W&B run under <output_dir>/wandb/ only (`wandb sync` uploads it later)."))
    wandb_base_url: str | None = Field(None, description="A self-hosted W&B server (WANDB_BASE_URL); default: W&B's cloud.")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking server URI; required with mlflow.")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment (created if missing); default: the run_name.")

    @model_validator(mode="after")
    def _check(self) -> "TrackingArgs":
        if "wandb" in self.report_to and not self.wandb_project:
            raise ValueError("tracking.wandb_project: required when report_to includes wandb")
        if "mlflow" in self.report_to and not self.mlflow_tracking_uri:
            raise ValueError("tracking.mlflow_tracking_uri: required when report_to includes mlflow")
        return self


class Reward(_Strict):
    """One reward: the fields a recipe (RewardArgs) and a run (api.spec.RewardSpec, camelCase) share, declared
    once; each adds what scores a reward_model or judge reward (a path and a key variable; a stage and a Secret)."""

    kind: Literal["exact_match", "contains", "regex", "format", "reward_model", "judge"] = Field(description=(
        "exact_match: the completion equals the prompt row's `column` value (1, else 0); contains: the completion "
        "contains it; regex: `pattern`'s first group (or whole match) equals it; format: the completion matches "
        "`pattern` (no column); reward_model: the score of rewardModel's final/; judge: an LLM judge's 1-10 grade "
        "of the answer (MT-Bench's single-answer prompt) / 10."))
    column: str = Field("answer", min_length=1, max_length=128, description=(
        "The prompts' reference-answer column the rules compare with."))
    pattern: str | None = Field(None, max_length=1024, description=(
        "A regular expression (Python's re, in the syntax RE2 shares: no lookaround or backreferences); required "
        "for regex and format."))
    weight: float = Field(1.0, description="This reward's weight in the sum.")


class RewardArgs(Reward):
    """One reward of a recipe: a rule on the completion's text, a reward model, or a judge."""

    model: str | None = Field(None, description=(
        "A reward stage's final/ (a sequence-classification model); required for reward_model (a run's rewardModel)."))
    judge: JudgeArgs | None = Field(None, description="The OpenAI-compatible endpoint of a judge reward.")

    @model_validator(mode="after")
    def _check(self) -> "RewardArgs":
        if self.kind in ("regex", "format") and self.pattern:  # needed: rules.reward_pattern_rule
            import re
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern: {self.pattern!r} is not a Python regex: {e}") from None
        if self.kind == "reward_model" and not self.model:
            raise ValueError("model: required for a reward_model reward (a reward stage's final/)")
        if self.kind == "judge" and self.judge is None:
            raise ValueError("judge: required for a judge reward (base_url, model, api_key_env)")
        return self


EvalArgs.model_rebuild()


class GrpoArgs(_Strict):
    """What a grpo stage generates and how it is rewarded (TRL GRPOConfig names).

    Declared once for the recipe and the AlignmentRun (api.spec.GrpoSpec, camelCase, whose rewards name stages
    and Secrets)."""

    rewards: list[RewardArgs] = Field(min_length=1, description="Summed (weighted) into each completion's reward.")
    num_generations: int = Field(8, ge=2, description=(
        "Completions sampled per prompt (the group); must divide training.perDeviceBatchSize x "
        "gradientAccumulationSteps (each batch holds whole groups)."))
    max_completion_length: int = Field(256, gt=0, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    use_vllm: bool = Field(False, description="Generate with vLLM colocated (GPU images with vllm installed).")
    eval_prompts: int = Field(64, gt=0, description=(
        "Held-out prompts answered before and after training; result: their mean reward."))


class GenerateArgs(_Strict):
    """What a generate stage samples: num_generations completions per prompt from the stage's model.

    Declared once for the recipe and the AlignmentRun (api.spec.GenerateSpec: the same fields, camelCase)."""

    num_generations: int = Field(8, ge=1, description="Completions sampled per prompt (HALOs samples 8).")
    max_completion_length: int = Field(256, gt=0, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (1.0: the policy's own distribution).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest token set holding this mass.")
    max_prompts: int | None = Field(None, gt=0, description="First N prompts only. Default: all.")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call.")
    use_vllm: bool = Field(False, description=(
        "Sample with vLLM (GPU stages on an image with vllm installed); refused by the trainer otherwise."))


class LabelArgs(_Strict):
    """How a label stage turns a generate stage's completions into feedback.

    Declared once for the recipe and the AlignmentRun (api.spec.LabelSpec, camelCase, whose rewards name stages
    and Secrets)."""

    rewards: list[RewardArgs] = Field(min_length=1, description=(
        "Summed (weighted) into each completion's score; the kinds grpo has (rules against a reference "
        "column the prompts carry, a format rule, a reward stage's final/)."))
    feedback: Literal["pairwise", "binary"] = Field("pairwise", description=(
        "pairwise: per prompt the best against the worst completion (prompt/chosen/rejected, for dpo and the "
        "other pairwise methods; prompts whose completions tie are skipped); binary: each completion desirable "
        "when its score is above threshold, undesirable below (prompt/completion/label, for kto)."))
    threshold: float = Field(0.5, description="binary feedback: the score separating desirable from undesirable.")
    min_margin: float = Field(0.0, ge=0, description=(
        "pairwise feedback: a prompt gives a pair only when its best score exceeds its worst by more than this "
        "(0: all but ties; HALOs' online DPO labels with 0.01)."))


class ObjectStore(_Strict):
    """An S3-compatible store: the fields a recipe (ObjectStoreArgs) and a run (api.spec.ObjectStoreSpec, camelCase)
    share, declared once; credentials come from the environment only (a run's credentialsSecretName)."""

    endpoint_url: str | None = Field(None, max_length=1024, pattern=r"^https?://[^\s/@]+(/\S*)?$", description=(
        "An S3-compatible store (MinIO, Ceph RGW, versitygw, R2, GCS's XML API ...), e.g. "
        "http://minio.storage.svc:9000. Default: AWS S3 (or the pods' AWS_ENDPOINT_URL)."))
    region: str | None = Field(None, max_length=64, pattern=r"^[a-z0-9-]+$", description=(
        "The buckets' region. Default: the pods' AWS_REGION, else us-east-1."))


class ObjectStoreArgs(ObjectStore):
    """Where s3:// sources are read from and exports written to (credentials: the environment only)."""

    sources_dir: str | None = Field(None, description=(
        "Where s3:// sources are fetched to (once; later stages reuse them); default: <output_dir>/../sources."))


class ExportArgs(_Strict):
    """One export of the stage's model (promote.exports[]): written, verified, then marked complete."""

    uri: str = Field(description="s3://bucket/prefix the model's files go under.")


# What a guard reports (live.LearningGuard), each in a logging step's metrics with its figure, which the operator
# reads (api.status.StageProgress.degraded_<what>: the key with '_' for '/'), and the reason a fatal guard fails
# the stage with (outcome.NOT_LEARNING).
REWARD_TIES = "degraded/reward_ties"
REWARD_FAILURES = "degraded/reward_failures"
CHANCE_ACCURACY = "degraded/preference_accuracy"
ZERO_GRAD_NORM = "degraded/grad_norm"
GUARD_FIGURES = (REWARD_TIES, REWARD_FAILURES, CHANCE_ACCURACY, ZERO_GRAD_NORM)


class GuardArgs(_Strict):
    """When a stage learns nothing (live.LearningGuard): what counts, and whether it fails the stage."""

    reward_ties_fraction: float = Field(0.9, ge=0, le=1, description=(
        "GRPO: the share of groups whose rewards all tie (TRL's frac_reward_zero_std: nothing to learn from them) "
        "above which a logging step counts as learning nothing."))
    reward_failure_fraction: float = Field(0.2, ge=0, le=1, description=(
        "A reward or judge that fails (a judge that gives no grade) on more than this share of a logging "
        "interval's samples: Degraded at once."))
    chance_accuracy: float = Field(0.55, ge=0, le=1, description=(
        "Preference stages: training-batch rewards/accuracies at or below this after warmup counts as chance."))
    zero_grad_norm: float = Field(0.0, ge=0, description=(
        "Any stage that trains: a logged gradient norm (grad_norm) at or below this counts as a step whose "
        "gradients are all zero: no weight receives any signal (a saturated or frozen model, nothing left to "
        "learn from). 0, the default, means exactly zero: healthy training never logs that (a real gradient, "
        "however small, is not 0 in float32), while healthy norms span orders of magnitude (DPO's shrinks with "
        "sigmoid(-beta * margin), 2e-9 at a margin of 20 nats), so any positive default would flag some healthy "
        "stage."))
    steps: int = Field(5, ge=1, description="Logging steps in a row that must count as learning nothing.")
    fatal: bool = Field(False, description=(
        f"Fail the stage (reason {NOT_LEARNING}, exit 2) instead of only warning (status condition Degraded)."))

    def describe(self, key: str, value: float) -> str:
        """One line for a figure the guard reported (GUARD_FIGURES; the trainer's error, the operator's warning)."""
        if key == REWARD_TIES:
            return (f"{value:.0%} of GRPO groups' rewards tie (frac_reward_zero_std {value:.2f} above "
                    f"{self.reward_ties_fraction} for {self.steps} logging steps): the reward cannot tell completions "
                    "apart")
        if key == REWARD_FAILURES:
            return f"the reward failed on {value:.0%} of samples (more than {self.reward_failure_fraction:.0%})"
        if key == ZERO_GRAD_NORM:
            return (f"gradient norm {value:g} (at most {self.zero_grad_norm:g}) for {self.steps} logging steps: "
                    "no weight moves (a saturated or frozen model, or nothing to learn from)")
        return (f"preference accuracy on training batches {value:.2f}, at chance (at most {self.chance_accuracy}) "
                f"for {self.steps} logging steps after warmup")


class Recipe(_Strict):
    """One stage, everything the trainer needs and nothing it does not."""

    method: str = Field(json_schema_extra=_method_enum, description="A row of METHODS: sft, dpo, ipo, kto, ...")
    model: ModelArgs = Field(description="The model this stage starts from.")
    ref_model: str | None = Field(None, description=(
        "Reference model for methods that have one (METHODS[method].reference), loaded like the policy; "
        "None: the starting model itself (or, with LoRA, the adapter-disabled base)."))
    datasets: list[DatasetArgs] = Field(default_factory=list, description="The training mixture.")
    test_datasets: list[DatasetArgs] = Field(default_factory=list, description="Held-out data, same shape.")
    test_split_size: float | None = Field(
        None, gt=0, description="Held-out rows taken from the training mixture: a count, or a fraction below 1.")
    training: TrainingArgs = Field(default_factory=TrainingArgs, description="Hyperparameters.")
    lora: LoraArgs | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    eval: EvalArgs | None = Field(None, description="For method eval: what to measure.")
    grpo: GrpoArgs | None = Field(None, description="For method grpo: generations and rewards.")
    generate: GenerateArgs | None = Field(None, description="For method generate: what is sampled (default: GenerateArgs()).")
    label: LabelArgs | None = Field(None, description="For method label: the rewards and the kind of feedback written.")
    guards: GuardArgs = Field(default_factory=GuardArgs, description="When training learns nothing, and what then.")
    output_dir: str = Field(description="Where checkpoint-N/, final/, metrics.jsonl and result.json go.")
    cache_dir: str | None = Field(None, description=(
        "Where precomputed reference log-probs are kept, keyed by what determines them, so a later stage, a "
        "rerun or another run sharing this directory reuses them; default: <output_dir>/cache."))
    termination_message_path: str | None = Field(
        None, description="Where to write the compact JSON outcome (result or failure; Kubernetes' termination message).")
    tracking: TrackingArgs = Field(default_factory=TrackingArgs, description=(
        "Experiment tracking: TensorBoard event files in the output directory by default; W&B, MLflow."))
    object_store: ObjectStoreArgs | None = Field(None, description=(
        "s3:// sources and exports: the store's endpoint and region (credentials from the environment only)."))
    exports: list[ExportArgs] = Field(default_factory=list, description=(
        "Object-store exports of the model this stage leaves (its final/, an eval stage's evaluated model)."))
    push_to_hub: bool = Field(False, description="Upload final/ to the Hub (needs HF_TOKEN and hub_model_id).")
    hub_model_id: str | None = Field(None, description="Hub repository for push_to_hub.")
    hub_private: bool = Field(True, description="Create the Hub repository private (an existing one keeps its setting).")
    # Provenance for the model card and result.json.
    run_name: str | None = Field(None, description="The AlignmentRun this stage belongs to (model card).")
    stage_name: str | None = Field(None, description="The stage's name in its run (model card, result.json).")
    base_model: str | None = Field(None, description="The run's base model (model card).")
    base_model_revision: str | None = Field(None, description="The run's base model revision (model card).")
    gpu_seconds: dict[str, float] | None = Field(None, description=(
        "GPU-seconds of the run's stages that finished before this one (GPUs x wall time of every attempt, "
        "as the operator counted them; 0: CPU only), for the model card."))

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return check_method(value)

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        """The rules a stage holds in a run too (rules.recipe_rules, worded in the recipe's names), then the
        method's defaults from the one table."""
        info = METHODS[self.method]
        problems = recipe_problems(recipe_rules(), self, "", _names())
        if problems:
            raise ValueError("; ".join(problems))
        if self.method == "generate" and self.generate is None:
            self.generate = GenerateArgs()
        t = self.training
        # Method-dependent defaults, from the one table (an adapter's own learning rate under LoRA/QLoRA).
        if t.learning_rate is None:
            t.learning_rate = info.default_learning_rate(self.lora is not None)
        if t.beta is None:  # a method without a beta (sft, reward, generate, label) reads none and gets none
            t.beta = info.beta
        if t.max_prompt_length is None and info.data == "pairwise":
            t.max_prompt_length = t.max_length // 2
        problems = recipe_problems(training_rules(), t, "training", _names())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def info(self) -> MethodInfo:
        return METHODS[self.method]

    @property
    def effective_loss_type(self) -> str | None:
        """The TRL loss_type this recipe trains with (ipo is DPO with loss_type ipo)."""
        return self.training.loss_type or self.info.default_loss_type

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


@cache
def _names() -> dict[str, str]:
    """The run's name of every recipe field -> the recipe's (rules.recipe_names), for refusals."""
    return recipe_names(Recipe)


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The recipe file's mapping, unvalidated (YAML or JSON); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise SystemExit(f"recipe {path}: cannot read: {e}") from e
    if not isinstance(data, dict):
        raise SystemExit(f"recipe {path}: expected a mapping, got {type(data).__name__}")
    return data


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; errors name the file."""
    return Recipe.model_validate(read_recipe_file(path))
