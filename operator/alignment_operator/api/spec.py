"""AlignmentRun spec: a base model, datasets and ordered stages.

Every field is documented where it is declared; `alignctl crd` turns these descriptions into
the CRD, so `kubectl explain alignmentrun.spec.stages` shows them. Defaults follow
alignment-handbook's recipes where it has one (zephyr-7b-beta), TRL's otherwise. Defaults that
depend on the method (learning rate, beta, lengths) are left unset here and filled in when the
stage's recipe is rendered; their descriptions say what they become.

A section a run shares with the recipe (model, datasets, training, lora, judge, rewards, eval and its
benchmarks, grpo, generate, label, guards, objectStore) is declared once, in the trainer's contract
(alignment_trainer.recipe): the class here inherits it, camelCase by ApiModel's alias (api.base.API_NAMES
where the run's name is shorter), and adds only what a run names (a dataset that may name a stage, a stage,
a Secret); render.recipe.from_spec() resolves those. No docstring on such a class: it would become a second
description in the CRD beside the stage field's own.

The rules between fields are the rule table's (api.rules): each model puts its table's CEL into the CRD;
those of one object that need nothing outside it are also held as the model is read (api.base.holds), the
rest by api.checks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from alignment_trainer.recipe import METHODS, GuardArgs, check_method, method_names
from alignment_trainer.recipe import (AlpacaEvalArgs, DatasetRows, Eval, GenerateArgs, GrpoArgs, Judge, LabelArgs,
                                      LmEvalArgs, LoraArgs, ModelLoading, MtBenchArgs, ObjectStore, Reward, Training,
                                      all_loss_types, grouped)

from . import corev1
from .admission import ExtraArgs, ImageRef, MountPath, NodeSelector, trl_fields
from .base import ApiModel, Quantity, holds, x_validations
from .rules import (MATRIX_MAX_VARIANTS, dataset_rules, export_rules, gate_rules, grouped_readers, judge_rules,
                    matrix_size_rules, mlflow_rules, model_rules, reward_rules, spec_rules, stage_rules, storage_rules,
                    training_rules, wandb_rules)

Strategy = Literal["ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp"]
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


# Where a multi-node stage runs, in the order render chooses (render.manifests.build_stage).
MULTI_NODE_ENGINES = ("a JobSet when that CRD is installed, else a Kubeflow PyTorchJob when that one is, else an "
                      "Indexed Job with a headless Service")


def extra_args_description() -> str:
    return ("Further fields of the method's TRL config by their TRL names (" + grouped(trl_fields()["methods"].items())
            + "). Keys that are no such field, that the trainer sets itself (output_dir, deepspeed ...) or that have a "
            "typed field here are refused.")


class ModelSpec(ApiModel, ModelLoading):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(*model_rules())}

    source: str = Field(min_length=1, max_length=512, description=(
        "Base model: a Hugging Face Hub id (mistralai/Mistral-7B-v0.1), a local directory, or a "
        "path on the run's volume."))
    revision: str = Field("main", max_length=256, description="Hub revision: branch, tag or commit sha.")

    _early, _late = holds(*model_rules())


def _readers_description() -> str:
    """Which methods read which data stage's output (recipe.reads_outputs), for datasets[].stage."""
    what = {"completions": "a generate stage's completions", "pairwise": "pairwise", "unpaired": "binary"}
    groups = grouped_readers()

    def read(kinds: tuple[str, ...]) -> str:
        label = [what[k] for k in kinds if k != "completions"]
        return " or ".join(([what["completions"]] if "completions" in kinds else [])
                           + ([f"a label stage's {' or '.join(label)} feedback"] if label else []))
    return "; ".join(f"{', '.join(ms)} read {read(kinds)}" for kinds, ms in groups.items())


class DatasetSpec(ApiModel, DatasetRows):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(*dataset_rules())}

    source: str | None = Field(None, min_length=1, max_length=512, description=(
        "A Hub dataset id, a JSON/JSONL/CSV file (UTF-8, a byte-order mark and CRLF are fine; also "
        "compressed: .gz, .bz2, .xz, .zst; CSV values are read as text), a Parquet file, or a directory saved by `datasets` "
        "(local, or on the run's volume). Exclusive with stage."))
    stage: str | None = Field(None, min_length=1, max_length=40, description=(
        "Instead of a source: an earlier data stage whose dataset (its final/ on the run's volume) this reads. "
        + _readers_description() + "."))
    config: str | None = Field(None, max_length=256, description="Dataset configuration name, if it has several.")

    _early, _late = holds(*dataset_rules())


class TrainingSpec(ApiModel, Training):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(*training_rules())}

    # Checked against the TRL configs the operator ships (api.admission): keys the typed fields or the trainer set
    # are refused.
    extra_args: ExtraArgs = Field(default_factory=dict, description=extra_args_description())


MATRIX_MAX_VALUES = 8     # values of one field, at most


def _loss_type_items(schema: dict) -> None:
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "array":
            branch["items"]["enum"] = all_loss_types()


def _matrix_model() -> type:
    """stages[].matrix: each training field (but extraArgs) as a list of its values, each value checked
    as the field itself is."""
    from typing import Annotated, get_args

    from pydantic import create_model

    fields = {}
    for name, f in TrainingSpec.model_fields.items():
        if name == "extra_args":
            continue
        ann = f.annotation
        if type(None) in get_args(ann):  # a value in the list is never null
            ann = next(a for a in get_args(ann) if a is not type(None))
        item = Annotated[(ann, *f.metadata)] if f.metadata else ann
        extra = _loss_type_items if name == "loss_type" else None
        fields[name] = (list[item] | None, Field(None, min_length=1, max_length=MATRIX_MAX_VALUES,
                                                 json_schema_extra=extra, description=f"Values of training.{f.alias}."))
    rules = matrix_size_rules([TrainingSpec.model_fields[n].alias for n in fields])
    return create_model("MatrixSpec", __base__=ApiModel, __config__=None, **fields), rules


class LoraSpec(ApiModel, LoraArgs):
    # A list here (a structural schema has no list-or-string); render passes [all-linear] on as peft's shorthand.
    target_modules: list[str] = Field(["all-linear"], min_length=1, max_length=64, description=(
        "Module names to adapt; all-linear adapts every linear layer but the output head."))


class ResourcesSpec(ApiModel):
    nodes: int = Field(1, gt=0, description=f"Machines; more than one runs {MULTI_NODE_ENGINES}.")
    gpus_per_node: int = Field(8, ge=0, description="GPUs per machine, one training process each; 0 runs on CPU.")
    processes_per_node: int | None = Field(None, gt=0, description=(
        "Training processes per machine. Default: gpusPerNode, or 1 on CPU."))
    gpu_resource: str = Field("nvidia.com/gpu", max_length=317, pattern=corev1.EXTENDED_RESOURCE, description=(
        "Extended resource name of the GPUs (domain/name, e.g. nvidia.com/gpu, amd.com/gpu)."))
    cpu: Quantity | None = Field(None, description="CPU request and limit per pod, e.g. 32.")
    memory: Quantity | None = Field(None, description="Memory request and limit per pod, e.g. 512Gi.")
    shared_memory: Quantity = Field("16Gi", description="Size of /dev/shm (NCCL and data loaders need more than the default 64Mi).")


class SecretKeyRef(ApiModel):
    name: str = Field(min_length=1, max_length=253, pattern=corev1.DNS_SUBDOMAIN,
                      description="Secret name, in the run's namespace.")
    key: str = Field("token", min_length=1, max_length=253, pattern=corev1.CONFIG_KEY, description="Key inside the Secret.")


TRACKING_URI = r"^(https?://\S+|databricks(://\S+)?)$"


class TensorBoardSpec(ApiModel):
    enabled: bool = Field(True, description=(
        "Write TensorBoard event files to <mountPath>/<namespace>/<run>/<stage>/tensorboard/ on the run's "
        "volume (`tensorboard --logdir` on that directory shows every stage)."))


class WandbSpec(ApiModel):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(*wandb_rules())}

    project: str = Field(min_length=1, max_length=128, description="W&B project; runs are named <run>/<stage>.")
    entity: str | None = Field(None, max_length=128, description="W&B entity (team or user); default: the API key's.")
    mode: Literal["online", "offline"] = Field("online", description=(
        "offline writes the W&B run into the stage's directory on the volume only (wandb/offline-run-*; "
        "`wandb sync` uploads it later); online needs apiKeySecretRef."))
    api_key_secret_ref: SecretKeyRef | None = Field(None, description=(
        "Secret key holding the W&B API key, exposed as WANDB_API_KEY through a secretKeyRef; never copied."))
    base_url: str | None = Field(None, max_length=1024, pattern=r"^https?://[^\s/@]+(/\S*)?$", description=(
        "A self-hosted W&B server (WANDB_BASE_URL); default: W&B's cloud."))

    _early, _late = holds(*wandb_rules())


class MlflowSpec(ApiModel):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(*mlflow_rules())}

    tracking_uri: str = Field(min_length=1, max_length=1024, pattern=TRACKING_URI, description=(
        "MLflow tracking server, e.g. http://mlflow.mlflow.svc:5000 (or databricks). No credentials in "
        "the URI: give credentialsSecretName."))
    experiment: str | None = Field(None, max_length=256, description=(
        "MLflow experiment, created if missing; default: the run's name. Runs are named <run>/<stage>."))
    credentials_secret_name: str | None = Field(None, max_length=253, pattern=corev1.DNS_SUBDOMAIN, description=(
        "A Secret in the run's namespace with keys username and password (basic auth) or token (bearer); "
        "each present key becomes MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN through a secretKeyRef."))

    _early, _late = holds(*mlflow_rules())


class TrackingSpec(ApiModel):
    tensorboard: TensorBoardSpec = Field(default_factory=TensorBoardSpec, json_schema_extra={"default": {}},
                                         description="TensorBoard event files on the run's volume (on by default).")
    wandb: WandbSpec | None = Field(None, description="Log to Weights & Biases.")
    mlflow: MlflowSpec | None = Field(None, description="Log to an MLflow tracking server.")


class JudgeSpec(ApiModel, Judge):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(*judge_rules())}

    api_key_secret_ref: SecretKeyRef = Field(description="Secret holding the judge's API key.")

    _early, _late = holds(*judge_rules())


class LmEvalSpec(ApiModel, LmEvalArgs):
    pass


class AlpacaEvalSpec(ApiModel, AlpacaEvalArgs):
    reference_outputs: DatasetSpec = Field(description=(
        "Reference answers (instruction, output, generator), e.g. tatsu-lab/alpaca_eval config "
        "alpaca_eval_gpt4_baseline split eval for AlpacaEval 2."))
    prompts: DatasetSpec | None = Field(None, description=(
        "Instructions the model answers (column instruction). Default: those of referenceOutputs."))


class MtBenchSpec(ApiModel, MtBenchArgs):
    questions: DatasetSpec = Field(description=(
        "MT-Bench questions: prompt (two user turns), category, reference (answers for math/reasoning/coding, "
        "optional), prompt_id; e.g. HuggingFaceH4/mt_bench_prompts."))


class EvalSpec(ApiModel, Eval):
    reference: str | None = Field(None, max_length=63, description=(
        "Stage whose model is the reference. Default: the stage the evaluated stage started from."))
    reward_model: str | None = Field(None, max_length=63, description=(
        "An earlier reward stage whose model scores the held-out pairs (rewardModelAccuracy) and both "
        "models' generations (rewardModelWinRate)."))
    prompts: DatasetSpec | None = Field(None, description="Prompts to generate for. Default: prompts of the test split.")
    judge: JudgeSpec | None = Field(None, description=(
        "LLM judge (OpenAI-compatible); required when metrics include judge, and for alpacaEval and mtBench."))
    lm_eval: LmEvalSpec | None = Field(None, description=(
        "lm-evaluation-harness tasks (IFEval, GSM8K, MMLU, custom YAML tasks) through lm_eval.simple_evaluate."))
    alpaca_eval: AlpacaEvalSpec | None = Field(None, description=(
        "AlpacaEval 2: win rate, length-controlled win rate and standard errors, computed by alpaca-eval."))
    mt_bench: MtBenchSpec | None = Field(None, description=(
        "MT-Bench: two-turn answers graded 1-10 per turn by the judge; per-category and overall means."))
    stages: list[str] = Field([], max_length=16, description=(
        "Evaluate several stages on the same held-out data against the same reference and compare them "
        "(status.comparison, `alignctl compare`): stage names, a matrix stage meaning all its variants. The eval "
        "expands into one entry per evaluated stage, <name>-<stage>. Default: the stage it starts from (all of a "
        "matrix's variants when that is a matrix stage)."))
    compare_by: str | None = Field(None, max_length=128, description=(
        "The metric status.comparison sorts the evaluated stages by, best first (lower is better for loss, "
        "perplexity, seconds; higher for the rest). Default: preference_accuracy."))
    rewards: list["RewardSpec"] = Field([], max_length=16, description=(
        "Rewards (grpo's kinds: rules against a reference column, a format rule, an earlier reward stage) "
        "scoring both models' greedy answers to prompts, which must carry the reference columns: mean_reward "
        "and reference_mean_reward (e.g. the held-out reward of an online run's final model)."))


class RewardSpec(ApiModel, Reward):
    """One reward of a grpo stage: a rule on the completion's text, or an earlier reward stage's model."""

    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(*reward_rules())}

    reward_model: str | None = Field(None, max_length=40, description=(
        "An earlier stage with method reward whose model scores prompt + completion; required for reward_model."))
    judge: JudgeSpec | None = Field(None, description=(
        "For a judge reward: the OpenAI-compatible endpoint (its key only through apiKeySecretRef); required for judge."))


class GrpoSpec(ApiModel, GrpoArgs):
    rewards: list[RewardSpec] = Field(min_length=1, max_length=16, description=(
        "Rewards summed (weighted) into each completion's reward."))


class GenerateSpec(ApiModel, GenerateArgs):
    pass


class LabelSpec(ApiModel, LabelArgs):
    rewards: list[RewardSpec] = Field(min_length=1, max_length=16, description=(
        "Rewards summed (weighted) into each completion's score: grpo's rules against a reference column the "
        "prompts carry (exact_match, contains, regex), a format rule, or an earlier reward stage's model."))


EvalSpec.model_rebuild()


def _stage_rules(schema: dict, cls: type) -> None:
    """The stage's CEL rules (rules.stage_rules), built when the schema is (so they follow the method table)."""
    schema.update(x_validations(*stage_rules()))


MatrixSpec, _MATRIX_RULES = _matrix_model()
MatrixSpec.model_config["json_schema_extra"] = x_validations(*_MATRIX_RULES)


class GuardsSpec(ApiModel, GuardArgs):
    """When a stage learns nothing (the trainer's contract, alignment_trainer.recipe.GuardArgs): a Degraded
    condition and a warning with the figure, or with fatal a failed stage (reason NotLearning)."""


class StageSpec(ApiModel):
    model_config = {**ApiModel.model_config, "json_schema_extra": _stage_rules}

    name: str = Field(min_length=1, max_length=40, pattern=DNS_LABEL, description=(
        "Stage name, a DNS label unique in the run (names the Job: <run>-<name>-<hash of both>)."))
    method: str = Field(json_schema_extra=lambda schema: schema.update(enum=method_names()), description=(
        f"{' | '.join(method_names())}. Preference methods "
        "start from the previous stage's model and use it as the reference; reward trains a Bradley-Terry reward "
        "model (a sequence-classification final/) on pairs; grpo samples from the policy and trains on rewards; "
        "generate samples completions from the previous model and label scores them into pairwise or binary "
        "feedback (an online round: generate -> label -> dpo, read through datasets[].stage)."))
    from_: str | None = Field(None, alias="from", max_length=40, description=(
        "Earlier stage whose final model this stage starts from. Default: the previous stage; the "
        "first stage starts from spec.model."))
    datasets: list[DatasetSpec] = Field([], max_length=32, description=(
        "Training mixture (for eval: the held-out data). Required for training stages."))
    test_datasets: list[DatasetSpec] = Field([], max_length=32, description="Held-out data, same shape as datasets.")
    test_split_size: float | None = Field(None, gt=0, description=(
        "Held-out rows carved from the training mixture: a row count, or a fraction below 1. "
        "Exclusive with testDatasets."))
    training: TrainingSpec = Field(default_factory=TrainingSpec, json_schema_extra={"default": {}},
                                   description="Hyperparameters.")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, json_schema_extra={"default": {}},
                                     description="Machines and accelerators.")
    distributed: Strategy = Field("deepspeed-zero3", description=(
        "Parallelism: ddp, deepspeed-zero2, deepspeed-zero3 (alignment-handbook's default) or fsdp."))
    eval: EvalSpec | None = Field(None, description="For method eval: what to measure.")
    grpo: GrpoSpec | None = Field(None, description=(
        "For method grpo (online RL, TRL's GRPOTrainer): the datasets hold prompts (and reference answers); "
        "what is generated and how it is rewarded."))
    generate: GenerateSpec | None = Field(None, description=(
        "For method generate: the datasets hold prompts (and any columns a later label stage's rules read); "
        "what is sampled from the stage's model. Default: the defaults below."))
    label: LabelSpec | None = Field(None, description=(
        "For method label: the datasets name a generate stage; how its completions are scored and what "
        "feedback is written."))
    backoff_limit: int = Field(2, ge=0, description=(
        "Pod retries before the stage fails; a retry resumes from the newest checkpoint."))
    max_disruptions: int = Field(20, ge=0, description=(
        "Disruptions (preemption, eviction, node drain: a pod's DisruptionTarget condition) the stage may meet. "
        "They are not counted against backoffLimit: each one resumes from the newest checkpoint, is counted in "
        "status.stages[].disruptions and traced in an Event; one more than this fails the stage."))
    hang_timeout_seconds: int | None = Field(None, ge=1, description=(
        "Restart the stage (every rank, from its newest complete checkpoint; counted in status.stages[].restarts "
        "against backoffLimit, then it fails with reason Hang) when it has reported no step and no heartbeat "
        "for this long once training started. The trainer beats between steps (logging, evaluation, checkpoint "
        "writes, the next batch); loading and reference precompute come before its first report. Default: 10 "
        "of the stage's measured steps, at least 300. On a cluster a report reaches status up to ~10 s after "
        "the trainer made it (it pushes at most every 5 s, the operator writes at most every 5 s), and a pod "
        "without a CPU request is starved while its neighbours compute: under ~30 s a healthy stage can be "
        "restarted."))
    guards: GuardsSpec | None = Field(None, description=(
        "When training learns nothing (GRPO rewards that all tie, a reward or judge failing on many samples, "
        "preference accuracy at chance after warmup): thresholds, and fatal to fail the stage instead of only "
        "warning (the Degraded condition). Default: warn with the defaults below."))
    start_deadline_seconds: int | None = Field(None, ge=1, description=(
        "Fail the stage when its pods have not started training this long after its Job was created (or "
        "resumed), naming the cause: an image that cannot be pulled, a missing Secret or ConfigMap, pods "
        "that cannot be scheduled, a Job that cannot create pods (reason StartDeadlineExceeded). Unset: the "
        "stage waits and its message says why. Default: spec.startDeadlineSeconds."))
    tracking: TrackingSpec | None = Field(None, description=(
        "This stage's experiment tracking, replacing spec.tracking for it (e.g. a stage logging to W&B "
        "while the others do not)."))
    matrix: MatrixSpec | None = Field(None, description=(
        "A sweep: training fields, each with a list of values (e.g. {beta: [0.01, 0.1], lossType: [sigmoid, ipo]}). "
        f"The stage expands into one stage per combination (at most {MATRIX_MAX_VARIANTS}), named <name>-<values> "
        "(DNS-safe: dpo-0-01-sigmoid; a hash where that is too long), each with training plus its values, run side "
        "by side; status.stages[] shows each with its values. An eval stage starting from the matrix stage (by from, "
        "or as the next stage) or naming it in eval.stages evaluates every variant and compares them "
        "(status.comparison). Other stages name one variant."))

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return check_method(value)


class VolumeClaimTemplate(ApiModel):
    storage_class_name: str | None = Field(None, max_length=253, pattern=corev1.DNS_SUBDOMAIN, description="StorageClass; default: the cluster's default.")
    size: Quantity = Field("200Gi", description="Capacity; a 7B run keeps about 15 GiB per checkpoint.")
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]] = Field(
        ["ReadWriteOnce"], min_length=1, max_length=3, description="ReadWriteMany when a stage spans several nodes.")


class StorageSpec(ApiModel):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(*storage_rules())}

    claim_name: str | None = Field(None, max_length=253, pattern=corev1.DNS_SUBDOMAIN, description=(
        "An existing PersistentVolumeClaim in the run's namespace."))
    volume_claim_template: VolumeClaimTemplate | None = Field(None, description=(
        "A PersistentVolumeClaim the operator creates for the run (kept when the run is deleted)."))
    mount_path: MountPath = Field("/workspace", description=(
        "Where the volume is mounted; stage outputs go to <mountPath>/<namespace>/<run>/<uid>/<stage>/ (the "
        "run's first 8 UID characters: a run applied again under the same name starts afresh)."))


class TrainerSpec(ApiModel):
    image: ImageRef | None = Field(None, description="Trainer image. Default: the operator's (Helm value trainer.image).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Image pull policy.")
    env: list[corev1.shape("EnvVar", "core/v1 EnvVar.")] = Field([], max_length=128, description=(
        "Extra environment variables (core/v1 EnvVar). A name the operator sets too (OMP_NUM_THREADS, "
        "HF_HOME, ...) takes the value given here. Credentials come from a Secret through "
        "valueFrom.secretKeyRef; a plain value under a secret-looking name (*_TOKEN, *_API_KEY, "
        "*_SECRET, *_PASSWORD) is refused."))
    env_from: list[corev1.shape("EnvFromSource", "core/v1 EnvFromSource.")] = Field(
        [], max_length=32, description="Extra environment sources (core/v1 EnvFromSource).")
    hf_token_secret_ref: SecretKeyRef | None = Field(None, description=(
        "Secret with a Hugging Face token, exposed as HF_TOKEN through a secretKeyRef; never copied."))
    service_account_name: str | None = Field(None, max_length=253, pattern=corev1.DNS_SUBDOMAIN, description="Service account of the training pods.")
    node_selector: NodeSelector = Field({}, description="Node labels the training pods require.")
    tolerations: list[corev1.shape("Toleration", "core/v1 Toleration.")] = Field(
        [], max_length=64, description="Tolerations (core/v1 Toleration), e.g. for GPU taints.")
    affinity: corev1.shape("Affinity", "Pod affinity (core/v1 Affinity).") | None = Field(
        None, description="Pod affinity (core/v1 Affinity).")
    priority_class_name: str | None = Field(None, max_length=253, pattern=corev1.DNS_SUBDOMAIN, description="PriorityClass of the training pods.")


class HubSpec(ApiModel):
    repo_id: str = Field(min_length=3, max_length=96, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", description=(
        "Hub model repository the run's final model is pushed to (org/name), created if missing. The push "
        "is done by the last stage that trains or evaluates: a training stage pushes its final/, an eval "
        "stage the model it evaluated with a card carrying its results (model-index). The token comes "
        "from trainer.hfTokenSecretRef."))
    private: bool = Field(True, description="Create the repository private (an existing one keeps its setting).")


class ObjectStoreSpec(ApiModel, ObjectStore):
    credentials_secret_name: str | None = Field(None, max_length=253, pattern=corev1.DNS_SUBDOMAIN, description=(
        "A Secret in the run's namespace with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, exposed to the stages "
        "through secretKeyRef (never copied). Unset: the stages' service account's identity (IRSA / EKS Pod "
        "Identity / GKE or Azure workload identity, through the AWS SDK's credential chain)."))


class GateSpec(ApiModel):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(*gate_rules())}

    metric: str = Field(min_length=1, max_length=128, description=(
        "A metric of the eval stage's results (status.stages[].metrics), e.g. preference_accuracy, "
        "reward_margin, eval_loss, ifeval/prompt_level_strict_acc, alpaca_eval/length_controlled_winrate."))
    min: float | None = Field(None, description="Passes when the metric is at least this.")
    max: float | None = Field(None, description="Passes when the metric is at most this (losses, perplexity).")
    at_least_as_good_as: str | None = Field(None, max_length=40, description=(
        "Another eval stage (e.g. one that evaluates the SFT model): passes when the candidate's metric is at "
        "least as good as that stage's (higher, or lower for a loss, perplexity or seconds)."))

    _early, _late = holds(*gate_rules())


class ExportSpec(ApiModel):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(*export_rules())}

    uri: str = Field(min_length=6, max_length=1024, description=(
        "Where the promoted model goes. s3://bucket/prefix (spec.objectStore's store): each object is read back and "
        "checked (size, SHA-256) before <prefix>/_EXPORT_COMPLETE.json (files, bytes, digest) is written, so a reader "
        "that waits for it never sees a partial model. hf://org/name: a Hugging Face Hub model repository (created "
        "if missing), pushed in one commit with trainer.hfTokenSecretRef's token. The exported README.md is the card "
        "of the eval that promoted the model, listing every export. A failed export is retried; its result (URI, "
        "digest, bytes, time) goes to status.promotion.exports."))
    private: bool = Field(True, description="hf:// only: create the repository private (an existing one keeps its "
                                            "setting).")

    _early, _late = holds(*export_rules())


class ServeSpec(ApiModel):
    gpus: int = Field(0, ge=0, le=8, description=(
        "GPUs of the predictor: above 0, KServe's Hugging Face runtime serves with its vLLM backend; 0 with its "
        "huggingface (transformers) backend on CPU."))
    gpu_resource: str = Field("nvidia.com/gpu", max_length=317, pattern=corev1.EXTENDED_RESOURCE, description=(
        "Extended resource name of the GPUs."))
    cpu: Quantity | None = Field(None, description="CPU request and limit of the predictor.")
    memory: Quantity | None = Field(None, description="Memory request and limit of the predictor.")


class PromoteSpec(ApiModel):
    eval: str | None = Field(None, max_length=40, description=(
        "The eval stage whose results decide. An eval of several stages (a matrix's variants, eval.stages) "
        "makes each evaluated stage a candidate. Default: the last eval stage."))
    gates: list[GateSpec] = Field([], max_length=16, description=(
        "What the model must meet to ship; all must pass. None: the eval's (best) candidate is promoted."))
    choose_by: str | None = Field(None, max_length=128, description=(
        "Among candidates that pass every gate, the best by this metric (higher is better unless it names a loss, "
        "perplexity or seconds). Default: the eval's compareBy, else preference_accuracy."))
    serve: ServeSpec | None = Field(None, description=(
        "Once promoted, a KServe InferenceService (serving.kserve.io/v1beta1, the Hugging Face runtime; vLLM on GPUs) "
        "named after the run, owned by it (deleted with it), serving the promoted model from the run's volume "
        "(pvc://<claim>/<path>); its URL goes to status.promotion.url once KServe reports it. Needs KServe installed."))
    exports: list[ExportSpec] = Field([], max_length=8, description=(
        "Where the promoted model (only a promoted one) is written once the gates pass: object-store (s3://) and "
        "Hugging Face Hub (hf://) URIs."))


class AlignmentRunSpec(ApiModel):
    model_config = {**ApiModel.model_config,
                    "json_schema_extra": lambda schema, cls: schema.update(x_validations(*spec_rules()))}

    model: ModelSpec = Field(description="The base model the first stage starts from.")
    stages: list[StageSpec] = Field(min_length=1, max_length=16, json_schema_extra={
        # The API server itself refuses two stages with one name.
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}, description=(
        "Stages, e.g. sft, then dpo, then eval: each starts once the stages it reads succeeded (a stage reads "
        "its from, by default the previous model-making stage), so stages that read the same one run side by side."))
    storage: StorageSpec = Field(
        default_factory=lambda: StorageSpec(volume_claim_template=VolumeClaimTemplate()),
        json_schema_extra={"default": {"volumeClaimTemplate": {}}}, description=(
            "Volume for checkpoints and results, shared by the stages."))
    trainer: TrainerSpec = Field(default_factory=TrainerSpec, json_schema_extra={"default": {}},
                                 description="Training pod settings.")
    queue_name: str | None = Field(None, max_length=63, pattern=corev1.LABEL_VALUE, description=(
        "Kueue LocalQueue: sets kueue.x-k8s.io/queue-name on the children, which start suspended "
        "until Kueue admits them."))
    suspend: bool = Field(False, description="Suspend the running stage's Job (pods stop; resume continues from its checkpoint).")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, description=(
        "Delete the run's Jobs this long after it finishes; checkpoints on the volume stay."))
    start_deadline_seconds: int | None = Field(None, ge=1, description=(
        "stages[].startDeadlineSeconds for every stage that does not set its own."))
    parallelism: int | None = Field(None, ge=1, le=64, description=(
        "Stages run as a graph by what they read (from, datasets[].stage, eval's stages and reference): every "
        "stage whose inputs succeeded starts, siblings (a matrix's variants) side by side, each its own Job. "
        "At most this many run at once; default: all that can."))
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, json_schema_extra={"default": {}}, description=(
        "Experiment tracking for every stage, through transformers' own integrations: TensorBoard (on by "
        "default), Weights & Biases, MLflow. Each stage is one tracked run named <run>/<stage>; its links "
        "go to status.stages[].tracking and the final model's card."))
    object_store: ObjectStoreSpec | None = Field(None, description=(
        "The S3-compatible store that s3://bucket/prefix sources (spec.model.source, datasets[].source) are read "
        "from: fetched once into the run's directory on the volume (<run>/sources/<bucket>/<prefix>), checked, and "
        "reused by every later stage. A missing object or refused credentials fail the stage (exit 2, "
        "ObjectStoreError), an endpoint that does not answer is retried (ObjectStoreUnreachable); both name the "
        "URI, never a key."))
    promote: PromoteSpec | None = Field(None, description=(
        "Ship only what the run's own evaluation passes: gates on an eval stage's results, the best candidate "
        "among several, status.promotion (chosen stage, model, each gate's value and verdict) and the Promoted "
        "condition. A run whose gates fail ends in phase Held (Ready=False, Stalled=True), not Succeeded."))
    hub: HubSpec | None = Field(None, description=(
        "Push the final model and its card (base model, datasets, each stage's recipe, evaluation results) "
        "to the Hugging Face Hub. Not with promote: there promote.exports' hf://org/name pushes the promoted model "
        "only."))

    def start_stage(self, index: int) -> StageSpec | None:
        """The stage whose final model stage `index` starts from; None means the base model (render.recipe.start_stage)."""
        stage = self.stages[index]
        earlier = self.stages[:index]
        if stage.from_ is not None:
            return next(s for s in earlier if s.name == stage.from_)
        return next((s for s in reversed(earlier) if METHODS[s.method].trains and METHODS[s.method].policy), None)
