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
a Secret) and its CEL rules; render.recipe.from_spec() resolves those. No docstring on such a class: it
would become a second description in the CRD beside the stage field's own.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from alignment_trainer.recipe import (LABEL_SMOOTHING_LOSSES, LABEL_SMOOTHING_NEEDED, METHODS, GuardArgs,
                                      check_method, method_names, reads_outputs, training_methods)
from alignment_trainer.recipe import (AlpacaEvalArgs, DatasetRows, Eval, GenerateArgs, GrpoArgs, Judge, LabelArgs,
                                      LmEvalArgs, LoraArgs, ModelLoading, MtBenchArgs, ObjectStore, Reward, Training,
                                      all_loss_types, grouped)

from . import corev1
from .admission import ExtraArgs, ImageRef, MountPath, NodeSelector, trl_fields
from .base import ApiModel, Quantity, x_validations

Strategy = Literal["ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp"]
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


# Where a multi-node stage runs, in the order render chooses (render.manifests.build_stage).
MULTI_NODE_ENGINES = ("a JobSet when that CRD is installed, else a Kubeflow PyTorchJob when that one is, else an "
                      "Indexed Job with a headless Service")


def extra_args_description() -> str:
    return ("Further fields of the method's TRL config by their TRL names (" + grouped(trl_fields()["methods"].items())
            + "). Keys that are no such field, that the trainer sets itself (output_dir, deepspeed ...) or that have a "
            "typed field here are refused.")


# An s3:// source or export: s3://bucket[/prefix], the bucket an S3 bucket name (3-63 lowercase letters,
# digits, '.', '-'); never credentials in it (they come from objectStore.credentialsSecretName).
# No \s in it: CEL string literals refuse that escape (the CRD would not compile); \t \n \r are CEL's too.
S3_URI = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^@ \t\n\r]*)?$"
S3_URI_MESSAGE = ("an s3:// URI is s3://bucket/prefix: a bucket of 3-63 lowercase letters, digits, '.' and '-', "
                  "no credentials (objectStore.credentialsSecretName holds them)")


def s3_rule(field: str) -> tuple[str, str, str]:
    """The CEL twin of check_s3: an s3:// value of `field` must be s3://bucket/prefix."""
    return (f"!has(self.{field}) || !self.{field}.startsWith('s3://') || self.{field}.matches('{S3_URI}')",
            S3_URI_MESSAGE, f".{field}")


def check_s3(data, field: str = "source"):
    """A model_validator(mode="before"): on the whole mapping, so a refused URI that holds credentials is
    never echoed (errors show a mapping's type only); a bad bucket name is."""
    value = data.get(field) if isinstance(data, dict) else None
    if isinstance(value, str) and value.startswith("s3://") and not re.match(S3_URI, value):
        shown = "an s3:// URI with credentials (user:key@)" if "@" in value else repr(value)
        raise ValueError(f"{field}: {shown}: {S3_URI_MESSAGE}")
    return data


class ModelSpec(ApiModel, ModelLoading):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(s3_rule("source"))}

    source: str = Field(min_length=1, max_length=512, description=(
        "Base model: a Hugging Face Hub id (mistralai/Mistral-7B-v0.1), a local directory, or a "
        "path on the run's volume."))
    revision: str = Field("main", max_length=256, description="Hub revision: branch, tag or commit sha.")

    _s3_source = model_validator(mode="before")(classmethod(lambda cls, data: check_s3(data)))


def _readers_description() -> str:
    """Which methods read which data stage's output (recipe.reads_outputs), for datasets[].stage."""
    what = {"completions": "a generate stage's completions", "pairwise": "pairwise", "unpaired": "binary"}
    groups: dict[tuple[str, ...], list[str]] = {}
    for m in METHODS:
        if reads_outputs(m):
            groups.setdefault(reads_outputs(m), []).append(m)

    def read(kinds: tuple[str, ...]) -> str:
        label = [what[k] for k in kinds if k != "completions"]
        return " or ".join(([what["completions"]] if "completions" in kinds else [])
                           + ([f"a label stage's {' or '.join(label)} feedback"] if label else []))
    return "; ".join(f"{', '.join(ms)} read {read(kinds)}" for kinds, ms in groups.items())


class DatasetSpec(ApiModel, DatasetRows):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(
        ("has(self.source) != has(self.stage)", "a dataset gives exactly one of source or stage"),
        s3_rule("source"),
    )}

    source: str | None = Field(None, min_length=1, max_length=512, description=(
        "A Hub dataset id, a JSON/JSONL/CSV file (UTF-8, a byte-order mark and CRLF are fine; also "
        "compressed: .gz, .bz2, .xz, .zst; CSV values are read as text), a Parquet file, or a directory saved by `datasets` "
        "(local, or on the run's volume). Exclusive with stage."))
    stage: str | None = Field(None, min_length=1, max_length=40, description=(
        "Instead of a source: an earlier data stage whose dataset (its final/ on the run's volume) this reads. "
        + _readers_description() + "."))
    config: str | None = Field(None, max_length=256, description="Dataset configuration name, if it has several.")

    _s3_source = model_validator(mode="before")(classmethod(lambda cls, data: check_s3(data)))

    @model_validator(mode="after")
    def _source_or_stage(self) -> "DatasetSpec":
        if (self.source is None) == (self.stage is None):
            raise ValueError("a dataset gives exactly one of source or stage: source a file, directory or Hub id, stage "
                             "(an earlier generate or label stage)")
        return self


class TrainingSpec(ApiModel, Training):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(
        ("!has(self.maxPromptLength) || self.maxPromptLength < self.maxLength",
         "maxPromptLength must be below maxLength", ".maxPromptLength"),
    )}

    # Checked against the TRL configs the operator ships (api.admission): keys the typed fields or the trainer set
    # are refused.
    extra_args: ExtraArgs = Field(default_factory=dict, description=extra_args_description())


MATRIX_MAX_VARIANTS = 16  # a matrix's variants (the product of its value lists' sizes), at most
MATRIX_MAX_VALUES = 8     # values of one field, at most
# Training fields only some methods read (the rest every training method reads): a matrix over one of
# these on another method is refused, as it would train the same thing N times.
MATRIX_METHOD_FIELDS: dict[str, list[str]] = {
    "beta": [m for m, i in METHODS.items() if i.trains and i.beta is not None],
    "loss_type": [m for m, i in METHODS.items() if i.trains and len(i.loss_types) > 1],
    "label_smoothing": ["dpo"],
    "slic_lambda": ["slic"],
    "packing": ["sft"],
    "completion_only_loss": ["sft"],
    "precompute_ref_log_probs": [m for m, i in METHODS.items() if i.trains and i.reference],
    "max_prompt_length": [m for m, i in METHODS.items() if i.trains and m != "sft"],
}


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
    rules = [(" * ".join(f"(has(self.{TrainingSpec.model_fields[n].alias}) ? "
                         f"size(self.{TrainingSpec.model_fields[n].alias}) : 1)" for n in fields)
              + f" <= {MATRIX_MAX_VARIANTS}",
              f"a matrix expands into at most {MATRIX_MAX_VARIANTS} variants (the product of its lists' sizes)")]
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
# A tracking URI never carries credentials (user:password@host): a CEL rule (whose message never
# shows the value, as a pattern's would) and its Python twin refuse them; they come from a Secret.
URI_CREDENTIALS = "^[a-z]+://[^/]*@"


class TensorBoardSpec(ApiModel):
    enabled: bool = Field(True, description=(
        "Write TensorBoard event files to <mountPath>/<namespace>/<run>/<stage>/tensorboard/ on the run's "
        "volume (`tensorboard --logdir` on that directory shows every stage)."))


class WandbSpec(ApiModel):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(
        ("self.mode == 'offline' || has(self.apiKeySecretRef)",
         "wandb.apiKeySecretRef is required unless mode is offline", ".apiKeySecretRef"),
    )}

    project: str = Field(min_length=1, max_length=128, description="W&B project; runs are named <run>/<stage>.")
    entity: str | None = Field(None, max_length=128, description="W&B entity (team or user); default: the API key's.")
    mode: Literal["online", "offline"] = Field("online", description=(
        "offline writes the W&B run into the stage's directory on the volume only (wandb/offline-run-*; "
        "`wandb sync` uploads it later); online needs apiKeySecretRef."))
    api_key_secret_ref: SecretKeyRef | None = Field(None, description=(
        "Secret key holding the W&B API key, exposed as WANDB_API_KEY through a secretKeyRef; never copied."))
    base_url: str | None = Field(None, max_length=1024, pattern=r"^https?://[^\s/@]+(/\S*)?$", description=(
        "A self-hosted W&B server (WANDB_BASE_URL); default: W&B's cloud."))

    @model_validator(mode="after")
    def _key_when_online(self) -> "WandbSpec":
        if self.mode == "online" and self.api_key_secret_ref is None:
            raise ValueError("wandb.apiKeySecretRef is required unless mode is offline")
        return self


class MlflowSpec(ApiModel):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(
        (f"!self.trackingUri.matches('{URI_CREDENTIALS}')",
         "mlflow.trackingUri must not hold credentials (user:password@); give credentialsSecretName", ".trackingUri"),
    )}

    tracking_uri: str = Field(min_length=1, max_length=1024, pattern=TRACKING_URI, description=(
        "MLflow tracking server, e.g. http://mlflow.mlflow.svc:5000 (or databricks). No credentials in "
        "the URI: give credentialsSecretName."))
    experiment: str | None = Field(None, max_length=256, description=(
        "MLflow experiment, created if missing; default: the run's name. Runs are named <run>/<stage>."))
    credentials_secret_name: str | None = Field(None, max_length=253, pattern=corev1.DNS_SUBDOMAIN, description=(
        "A Secret in the run's namespace with keys username and password (basic auth) or token (bearer); "
        "each present key becomes MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN through a secretKeyRef."))

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data):
        """On the whole mapping, so the refusal never echoes the URI (errors show a mapping's type only)."""
        uri = data.get("trackingUri", data.get("tracking_uri")) if isinstance(data, dict) else None
        if isinstance(uri, str) and re.match(URI_CREDENTIALS, uri):
            raise ValueError("trackingUri must not hold credentials (user:password@); give credentialsSecretName")
        return data


class TrackingSpec(ApiModel):
    tensorboard: TensorBoardSpec = Field(default_factory=TensorBoardSpec, json_schema_extra={"default": {}},
                                         description="TensorBoard event files on the run's volume (on by default).")
    wandb: WandbSpec | None = Field(None, description="Log to Weights & Biases.")
    mlflow: MlflowSpec | None = Field(None, description="Log to an MLflow tracking server.")


# Admission rules stated once: the CEL rule's message and the Python check's words (`alignctl validate`).
JUDGE_URL_MESSAGE = "judge.baseUrl must not hold credentials (user:password@); the key comes from apiKeySecretRef"
REGEX_MESSAGE = ("must be a regular expression that both Python's re (the trainer's) and RE2 (the API server's) "
                 "read: no lookaround, backreferences or possessive quantifiers")
REWARD_STAGE_MESSAGE = "must name an earlier reward stage"


def _python_only(pattern: str) -> str | None:
    """The first construct of `pattern` that Python's re reads and RE2 refuses (lookaround, backreferences,
    atomic groups, conditionals, possessive quantifiers, \\Z); escapes and character classes skipped."""
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if pattern[i + 1:i + 2] in set("123456789Z"):
                return pattern[i:i + 2]
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            i += 2 if pattern[i + 1:i + 2] == "]" else 1  # a leading ] is a member
            continue
        elif c == "(":
            for head in ("(?=", "(?!", "(?<=", "(?<!", "(?P=", "(?>", "(?("):
                if pattern.startswith(head, i):
                    return head
        elif c in "*+?}" and pattern[i + 1:i + 2] == "+" and not (c == "?" and pattern[i - 1:i] == "("):
            return pattern[i:i + 2]
        i += 1
    return None


def regex_problem(pattern: str) -> str | None:
    """Why a reward's pattern is refused (REGEX_MESSAGE and the reason), None when both engines read it."""
    try:
        re.compile(pattern)
    except re.error as e:
        return f"{REGEX_MESSAGE} ({e})"
    found = _python_only(pattern)
    return f"{REGEX_MESSAGE} (RE2 has no {found!r})" if found else None


class JudgeSpec(ApiModel, Judge):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(
        (f"!self.baseUrl.matches('{URI_CREDENTIALS}')", JUDGE_URL_MESSAGE, ".baseUrl"),
    )}

    api_key_secret_ref: SecretKeyRef = Field(description="Secret holding the judge's API key.")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data):
        """On the whole mapping, so the refusal never echoes the URL (errors show a mapping's type only)."""
        url = data.get("baseUrl", data.get("base_url")) if isinstance(data, dict) else None
        if isinstance(url, str) and re.match(URI_CREDENTIALS, url):
            raise ValueError(JUDGE_URL_MESSAGE)
        return data


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

    # RE2 compiles the pattern when the rule runs: a pattern it cannot read fails the rule with its reason.
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(
        ("!has(self.pattern) || (''.matches(self.pattern) ? true : true)", f"pattern {REGEX_MESSAGE}", ".pattern"),
    )}

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


def _reward_rules(section: str) -> list[tuple[str, str, str]]:
    return [
        (f"!has(self.{section}) || self.{section}.rewards.all(r, !(r.kind in ['regex', 'format']) || has(r.pattern))",
         f"{section}.rewards: a regex or format reward needs a pattern", f".{section}.rewards"),
        (f"!has(self.{section}) || self.{section}.rewards.all(r, r.kind != 'reward_model' || has(r.rewardModel))",
         f"{section}.rewards: a reward_model reward needs rewardModel (an earlier reward stage)", f".{section}.rewards"),
        (f"!has(self.{section}) || self.{section}.rewards.all(r, r.kind != 'judge' || has(r.judge))",
         f"{section}.rewards: a judge reward needs judge (baseUrl, model, apiKeySecretRef)", f".{section}.rewards"),
    ]


# How a stage's CEL expression tells what kind of dataset an earlier stage `t` writes
# (alignment_trainer.recipe.output_kind).
_OUTPUT_KIND_CEL = {
    "completions": "t.method == 'generate'",
    "pairwise": "(t.method == 'label' && has(t.label) && t.label.feedback == 'pairwise')",
    "unpaired": "(t.method == 'label' && has(t.label) && t.label.feedback == 'binary')",
}


def _stage_dataset_rule() -> tuple[str, str, str]:
    """datasets[].stage names an earlier stage whose output the method reads (recipe.reads_outputs)."""
    accepts = " || ".join(f"(s.method in {ms} && ({' || '.join(_OUTPUT_KIND_CEL[k] for k in kinds)}))"
                          for kinds, ms in _grouped_readers().items())
    # datasets and testDatasets one after the other: CEL types them apart, so `+` does not join them.
    names = ("self.stages.exists(j, t, j < i && t.name == d.stage && ({accepts}))").format(accepts=accepts)
    return (f"self.stages.all(i, s, s.datasets.all(d, !has(d.stage) || {names}) && "
            f"s.testDatasets.all(d, !has(d.stage) || {names}))",
            "stages[].datasets[].stage must name an earlier stage whose output the method reads: " + "; ".join(
                f"{', '.join(ms)}: {' or '.join(OUTPUT_KIND_NAMES[k] for k in kinds)}"
                for kinds, ms in _grouped_readers().items()), ".stages")


def _rewards_model_rule() -> tuple[str, str, str]:
    """grpo's, label's and eval's rewards[].rewardModel name an earlier reward stage (checks._reward_problems)."""
    names = ("r.rewardModel", "self.stages.exists(j, t, j < i && t.name == r.rewardModel && t.method == 'reward')")
    each = " && ".join(f"(!has(s.{x}) || s.{x}.rewards.all(r, !has({names[0]}) || {names[1]}))" for x in REWARD_SECTIONS)
    return (f"self.stages.all(i, s, {each})",
            f"stages[].{{{','.join(REWARD_SECTIONS)}}}.rewards[].rewardModel {REWARD_STAGE_MESSAGE}", ".stages")


REWARD_SECTIONS = ("grpo", "label", "eval")


def data_stage_message() -> str:
    """eval's prompt sets read a data stage's dataset: any method of the table that writes one."""
    return "must name an earlier " + " or ".join(m for m, info in METHODS.items() if info.writes) + " stage"


# eval's datasets that may name a data stage instead of a source (checks._dataset_stage_problems).
EVAL_DATA_FIELDS = ("prompts", "alpacaEval.referenceOutputs", "alpacaEval.prompts", "mtBench.questions")


def _eval_data_stage_rule() -> tuple[str, str, str]:
    writers = [m for m, info in METHODS.items() if info.writes]
    checks = []
    for field in EVAL_DATA_FIELDS:
        d = f"s.eval.{field}"
        names = f"(!has({d}.stage) || self.stages.exists(j, t, j < i && t.name == {d}.stage && t.method in {writers}))"
        guard = " && ".join(f"has(s.eval.{'.'.join(field.split('.')[:k + 1])})" for k in range(field.count(".") + 1))
        checks.append(f"(!({guard}) || {names})")
    return (f"self.stages.all(i, s, !has(s.eval) || ({' && '.join(checks)}))",
            f"stages[].eval.{{{','.join(EVAL_DATA_FIELDS)}}}.stage {data_stage_message()}", ".stages")


OUTPUT_KIND_NAMES = {"completions": "a generate stage", "pairwise": "a label stage with feedback pairwise",
                     "unpaired": "a label stage with feedback binary"}


def _grouped_readers() -> dict[tuple[str, ...], list[str]]:
    groups: dict[tuple[str, ...], list[str]] = {}
    for m in METHODS:
        if reads_outputs(m):
            groups.setdefault(reads_outputs(m), []).append(m)
    return groups


def _label_smoothing_rules() -> list[tuple[str, str, str]]:
    """training.labelSmoothing only where the loss reads it (recipe.label_smoothing_problem)."""
    reads = list(LABEL_SMOOTHING_LOSSES)
    default_reads = [m for m, info in METHODS.items() if info.default_loss_type in reads]
    by_default = f"self.method in {default_reads}" if default_reads else "false"
    return [
        ("!has(self.training.labelSmoothing) || self.training.labelSmoothing == 0.0 || "
         f"(has(self.training.lossType) ? self.training.lossType in {reads} : {by_default})",
         f"training.labelSmoothing above 0 is read only by the lossTypes {', '.join(reads)} (method dpo); with "
         "this stage's method and lossType it would be ignored: set one of them or leave labelSmoothing 0",
         ".training.labelSmoothing"),
        (f"!has(self.training.lossType) || !(self.training.lossType in {list(LABEL_SMOOTHING_NEEDED)}) || "
         "(has(self.training.labelSmoothing) && self.training.labelSmoothing > 0.0)",
         f"lossType {' and '.join(LABEL_SMOOTHING_NEEDED)} need training.labelSmoothing, the fraction of flipped "
         "labels, with 0 < epsilon < 0.5", ".training.labelSmoothing"),
    ]


def _matrix_rules() -> list[tuple[str, str, str]]:
    """A matrix only on a training stage, over fields its method reads, with losses its method has."""
    trains = [m for m, i in METHODS.items() if i.trains]
    out = [(f"!has(self.matrix) || self.method in {trains}",
            f"matrix: only a training stage ({', '.join(trains)}) sweeps its training fields", ".matrix")]
    for name, methods in MATRIX_METHOD_FIELDS.items():
        alias = TrainingSpec.model_fields[name].alias
        out.append((f"!has(self.matrix) || !has(self.matrix.{alias}) || self.method in {methods}",
                    f"matrix.{alias}: only methods {', '.join(methods)} read training.{alias}", f".matrix.{alias}"))
    with_losses = {m: info.loss_types for m, info in METHODS.items() if len(info.loss_types) > 1}
    out.append(("!has(self.matrix) || !has(self.matrix.lossType) || self.matrix.lossType.all(x, "
                + " || ".join(f"(self.method == '{m}' && x in {list(t)})" for m, t in with_losses.items()) + ")",
                "matrix.lossType holds a loss that is not one of this method's: " + "; ".join(
                    f"{m}: {', '.join(t)}" for m, t in with_losses.items()), ".matrix.lossType"))
    return out


def _stage_rules(schema: dict, cls: type) -> None:
    """The stage's CEL rules, built when the schema is (so they follow the method table)."""
    with_losses = {m: info.loss_types for m, info in METHODS.items() if info.loss_types}
    schema.update(x_validations(
        (" || ".join(f"self.method == '{m}'" for m, info in METHODS.items() if not (info.trains or info.writes))
         + " || size(self.datasets) > 0",
         "a training, generate or label stage needs at least one dataset", ".datasets"),
        ("!(size(self.testDatasets) > 0 && has(self.testSplitSize))",
         "give testDatasets or testSplitSize, not both", ".testSplitSize"),
        ("!has(self.testSplitSize) || self.testSplitSize < 1.0 || self.testSplitSize == double(int(self.testSplitSize))",
         "testSplitSize must be a fraction below 1 or a whole number of rows", ".testSplitSize"),
        ("!has(self.training.lossType) || "
         + " || ".join(f"(self.method == '{m}' && self.training.lossType in {list(t)})" for m, t in with_losses.items()),
         "lossType is not one of this method's losses: " + "; ".join(
             f"{m}: {', '.join(t)}" for m, t in with_losses.items()), ".training.lossType"),
        *_label_smoothing_rules(),
        *_matrix_rules(),
        ("!has(self.lora) || self.lora.quantization == 'none' || self.resources.gpusPerNode > 0",
         "lora.quantization 4bit/8bit needs GPUs (resources.gpusPerNode > 0)", ".lora.quantization"),
        ("self.method != 'grpo' || has(self.grpo)", "method grpo needs a grpo section with rewards", ".grpo"),
        *_reward_rules("grpo"),
        ("self.method != 'label' || has(self.label)", "method label needs a label section with rewards", ".label"),
        *_reward_rules("label"),
        *_reward_rules("eval"),
        ("!has(self.eval) || size(self.eval.rewards) == 0 || has(self.eval.prompts)",
         "eval.rewards score the answers to eval.prompts: set eval.prompts", ".eval.prompts"),
        ("!has(self.eval) || !('judge' in self.eval.metrics) || has(self.eval.judge)",
         "eval.metrics includes judge but eval.judge is not set", ".eval.judge"),
        ("!has(self.eval) || !(has(self.eval.alpacaEval) || has(self.eval.mtBench)) || has(self.eval.judge)",
         "eval.alpacaEval and eval.mtBench are graded by an LLM judge: set eval.judge", ".eval.judge"),
    ))


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
        "of the stage's measured steps, at least 300."))
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
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(
        ("has(self.claimName) != has(self.volumeClaimTemplate)",
         "storage: set exactly one of claimName or volumeClaimTemplate"),
    )}

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
        "Extra environment variables (core/v1 EnvVar). Credentials come from a Secret through "
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
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(
        ("(has(self.min) ? 1 : 0) + (has(self.max) ? 1 : 0) + (has(self.atLeastAsGoodAs) ? 1 : 0) == 1",
         "a gate gives exactly one of min, max or atLeastAsGoodAs"),
    )}

    metric: str = Field(min_length=1, max_length=128, description=(
        "A metric of the eval stage's results (status.stages[].metrics), e.g. preference_accuracy, "
        "reward_margin, eval_loss, ifeval/prompt_level_strict_acc, alpaca_eval/length_controlled_winrate."))
    min: float | None = Field(None, description="Passes when the metric is at least this.")
    max: float | None = Field(None, description="Passes when the metric is at most this (losses, perplexity).")
    at_least_as_good_as: str | None = Field(None, max_length=40, description=(
        "Another eval stage (e.g. one that evaluates the SFT model): passes when the candidate's metric is at "
        "least as good as that stage's (higher, or lower for a loss, perplexity or seconds)."))

    @model_validator(mode="after")
    def _one_rule(self) -> "GateSpec":
        if sum(x is not None for x in (self.min, self.max, self.at_least_as_good_as)) != 1:
            raise ValueError(f"gate on {self.metric}: a gate gives exactly one of min, max or atLeastAsGoodAs")
        return self


# A Hub export: hf://org/name (a model repository, HubSpec.repo_id's form).
HF_URI = r"^hf://[A-Za-z0-9][-_.A-Za-z0-9]*/[-_.A-Za-z0-9]+$"


class ExportSpec(ApiModel):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(
        ("!self.uri.startsWith('s3://') || self.uri.matches('" + S3_URI + "')", S3_URI_MESSAGE, ".uri"),
        ("self.uri.startsWith('s3://') || self.uri.matches('" + HF_URI + "')",
         "uri is s3://bucket/prefix (an object store) or hf://org/name (a Hugging Face Hub model repository)", ".uri"),
    )}

    uri: str = Field(min_length=6, max_length=1024, description=(
        "Where the promoted model goes. s3://bucket/prefix (spec.objectStore's store): each object is read back and "
        "checked (size, SHA-256) before <prefix>/_EXPORT_COMPLETE.json (files, bytes, digest) is written, so a reader "
        "that waits for it never sees a partial model. hf://org/name: a Hugging Face Hub model repository (created "
        "if missing), pushed in one commit with trainer.hfTokenSecretRef's token. The exported README.md is the card "
        "of the eval that promoted the model, listing every export. A failed export is retried; its result (URI, "
        "digest, bytes, time) goes to status.promotion.exports."))
    private: bool = Field(True, description="hf:// only: create the repository private (an existing one keeps its "
                                            "setting).")

    _s3_uri = model_validator(mode="before")(classmethod(lambda cls, data: check_s3(data, "uri")))

    @field_validator("uri")
    @classmethod
    def _is_s3_or_hub(cls, value: str) -> str:
        if not value.startswith("s3://") and not re.match(HF_URI, value):
            raise ValueError(f"uri: {value!r} is neither s3://bucket/prefix (an object store) nor hf://org/name "
                             "(a Hugging Face Hub model repository)")
        return value


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


def _promote_rules() -> list[tuple[str, str, str]]:
    """promote names eval stages (CEL; promote_problems is the Python twin)."""
    return [
        ("!has(self.promote) || self.stages.exists(s, s.method == 'eval')",
         "promote decides on an eval stage's results: add a stage with method eval", ".promote"),
        ("!has(self.promote) || !has(self.promote.eval) || "
         "self.stages.exists(s, s.name == self.promote.eval && s.method == 'eval')",
         "promote.eval must name an eval stage", ".promote.eval"),
        ("!has(self.promote) || self.promote.gates.all(g, !has(g.atLeastAsGoodAs) || "
         "self.stages.exists(s, s.name == g.atLeastAsGoodAs && s.method == 'eval'))",
         "promote.gates[].atLeastAsGoodAs must name an eval stage", ".promote.gates"),
    ]


def promote_problems(spec: "AlignmentRunSpec") -> list[str]:
    p = spec.promote
    if p is None:
        return []
    evals = [s.name for s in spec.stages if s.method == "eval"]
    if not evals:
        return ["spec.promote: promote decides on an eval stage's results: add a stage with method eval"]
    out = []
    if p.eval is not None and p.eval not in evals:
        out.append(f"spec.promote.eval: {p.eval!r}: promote.eval must name an eval stage; accepted: {', '.join(evals)}")
    for k, g in enumerate(p.gates):
        if g.at_least_as_good_as is not None and g.at_least_as_good_as not in evals:
            out.append(f"spec.promote.gates[{k}].atLeastAsGoodAs: {g.at_least_as_good_as!r} is not an eval stage; "
                       f"accepted: {', '.join(evals)}")
    return out


HUB_WITH_PROMOTE = ("hub pushes the last stage's model whatever promote decides; with promote, push the promoted "
                    "model only: promote.exports: [{uri: hf://<repoId>}]")
HF_EXPORT_TOKEN = ("an hf:// export needs trainer.hfTokenSecretRef (a Secret with a Hugging Face token with write "
                   "access)")


class AlignmentRunSpec(ApiModel):
    model_config = {**ApiModel.model_config, "json_schema_extra": x_validations(
        ("!has(self.hub) || has(self.trainer.hfTokenSecretRef)",
         "hub: pushing needs trainer.hfTokenSecretRef (a Secret with a Hugging Face token with write access)",
         ".hub"),
        ("!has(self.hub) || !has(self.promote)", HUB_WITH_PROMOTE, ".hub"),
        ("!has(self.promote) || !has(self.promote.exports) || "
         "!self.promote.exports.exists(e, e.uri.startsWith('hf://')) || has(self.trainer.hfTokenSecretRef)",
         HF_EXPORT_TOKEN, ".promote.exports"),
        ("self.stages.exists(s, " + " && ".join(f"s.method != '{m}'" for m, info in METHODS.items() if not info.trains)
         + ")",
         f"at least one training stage ({', '.join(training_methods())}) is required", ".stages"),
        # Two-variable comprehensions (index, value) keep the cost bounded; map() would not.
        ("self.stages.all(i, s, !has(s.from) || self.stages.exists(j, t, j < i && t.name == s.from))",
         "stages[].from must name an earlier stage", ".stages"),
        ("self.stages.all(i, s, !has(s.eval) || !has(s.eval.reference) || "
         "self.stages.exists(j, t, j < i && t.name == s.eval.reference))",
         "stages[].eval.reference must name an earlier stage", ".stages"),
        ("self.stages.all(i, s, !has(s.eval) || !has(s.eval.rewardModel) || "
         "self.stages.exists(j, t, j < i && t.name == s.eval.rewardModel && t.method == 'reward'))",
         f"stages[].eval.rewardModel {REWARD_STAGE_MESSAGE}", ".stages"),
        _rewards_model_rule(),
        _eval_data_stage_rule(),
        _stage_dataset_rule(),
        *_promote_rules(),
    )}

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

    @model_validator(mode="after")
    def _hub_token(self, info: ValidationInfo) -> "AlignmentRunSpec":
        # A pod has only the Secret's token; `alignctl run --local` (context local) has HF_TOKEN or the HF login.
        if self.hub is not None and self.trainer.hf_token_secret_ref is None and not (info.context or {}).get("local"):
            raise ValueError("hub: pushing needs trainer.hfTokenSecretRef (a Secret with a Hugging Face token "
                             "with write access)")
        if self.hub is not None and self.promote is not None:
            raise ValueError(f"hub: {HUB_WITH_PROMOTE}")
        hub_exports = self.promote is not None and any(x.uri.startswith("hf://") for x in self.promote.exports)
        if hub_exports and self.trainer.hf_token_secret_ref is None and not (info.context or {}).get("local"):
            raise ValueError(f"promote.exports: {HF_EXPORT_TOKEN}")
        return self

    @model_validator(mode="after")
    def _promote_names_eval_stages(self) -> "AlignmentRunSpec":
        problems = promote_problems(self)
        if problems:
            raise ValueError("; ".join(p.removeprefix("spec.") for p in problems))
        return self
