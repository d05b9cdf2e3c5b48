"""alignment-handbook recipes -> one AlignmentRun (`alignctl import handbook SFT.yaml DPO.yaml`).

A handbook recipe is one stage: model arguments, a dataset mixture (`dataset_mixture.datasets[]`
with id/config/split/columns/weight, or the older `dataset_mixer` {id: weight} + `dataset_splits`)
and the TRL trainer's arguments by their TRL names. The first recipe's model is the run's model;
each later recipe starts from the stage before it (its own model_name_or_path, the handbook's
published copy of that stage's output, is replaced by the chain). A recipe with `beta` is a
preference stage (dpo, or its loss_type), else sft. Each value lands where the run keeps it (model,
datasets, training, training.extraArgs for the TRL fields the run accepts by name); what cannot be
carried is returned, named, with why. Pure: dicts in, a run document and notes out.
"""

from __future__ import annotations

from typing import Any

from .api.admission import accepted_extra_args

MODEL = {"model_name_or_path": "source", "model_revision": "revision", "torch_dtype": "dtype",
         "attn_implementation": "attention", "chat_template": "chatTemplate", "trust_remote_code": "trustRemoteCode"}
TRAINING = {"num_train_epochs": "epochs", "max_steps": "maxSteps", "learning_rate": "learningRate",
            "lr_scheduler_type": "scheduler", "warmup_ratio": "warmupRatio", "weight_decay": "weightDecay",
            "per_device_train_batch_size": "perDeviceBatchSize",
            "gradient_accumulation_steps": "gradientAccumulationSteps", "max_seq_length": "maxLength",
            "max_length": "maxLength", "max_prompt_length": "maxPromptLength", "beta": "beta",
            "loss_type": "lossType", "label_smoothing": "labelSmoothing", "packing": "packing",
            "completion_only_loss": "completionOnlyLoss", "gradient_checkpointing": "gradientCheckpointing",
            "seed": "seed", "save_steps": "saveSteps", "save_total_limit": "saveTotalLimit",
            "logging_steps": "loggingSteps", "eval_steps": "evalSteps"}
# Not training values: where the stage writes, pushes and reports is the run's (its volume, status, tracking).
# spec.hub pushes the last stage's model with its card, once (a handbook recipe pushes each stage's).
HUB = "the final model stays on the run's volume; to push it, set spec.hub.repoId (<org>/<name>)"
NOT_CARRIED = {
    "output_dir": "each stage writes to the run's volume", "overwrite_output_dir": "each stage writes to the run's volume",
    "hub_model_id": HUB, "hub_strategy": HUB, "push_to_hub": HUB, "hub_private_repo": HUB,
    "report_to": "metrics go to metrics.jsonl and the status; set spec.tracking (wandb, mlflow) for a tracker",
    "log_level": "the trainer's own", "logging_strategy": "steps, by training.loggingSteps",
    "save_strategy": "steps, by training.saveSteps", "per_device_eval_batch_size": "the run uses perDeviceBatchSize for both",
    "bf16": "from spec.model.dtype (bfloat16 trains in bf16)", "fp16": "from spec.model.dtype (float16)",
    "tf32": "not a run setting", "preprocessing_num_workers": "use dataset_num_proc",
    "dataset_configs": "per dataset: config", "auto_insert_empty_system_msg": "the chat template decides",
}
DTYPES = {None: "auto", "auto": "auto", "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def _datasets(recipe: dict, notes: list[str], at: str) -> tuple[list[dict], list[dict], Any]:
    """(datasets, testDatasets, testSplitSize) of a recipe's mixture."""
    mixture = recipe.get("dataset_mixture")
    if isinstance(mixture, dict):
        out = []
        for d in mixture.get("datasets") or []:
            spec = {"source": d["id"]}
            for key, name in (("config", "config"), ("split", "split"), ("columns", "columns"), ("weight", "weight")):
                if d.get(key) is not None:
                    spec[name] = d[key]
            if spec.get("config") == "default":
                spec.pop("config")
            out.append(spec)
        if mixture.get("seed") is not None:
            notes.append(f"{at}dataset_mixture.seed {mixture['seed']}: not carried (the run shuffles and splits "
                         f"with training.seed)")
        return out, [], mixture.get("test_split_size")
    mixer = recipe.get("dataset_mixer") or {}
    splits = recipe.get("dataset_splits") or ["train", "test"]
    train = [{"source": d, "split": s, **({"weight": w} if w != 1 else {})}
             for d, w in mixer.items() for s in splits if "train" in s]
    test = [{"source": d, "split": s} for d in mixer for s in splits if "train" not in s]
    return train, test, None


def stage_of(recipe: dict, name: str, previous: str | None, notes: list[str]) -> dict:
    at = f"{name}: "
    method = "sft"
    if "beta" in recipe:
        method = "dpo"
    stage: dict[str, Any] = {"name": name, "method": method}
    if previous:
        stage["from"] = previous
    datasets, tests, split_size = _datasets(recipe, notes, at)
    stage["datasets"] = datasets
    if tests:
        stage["testDatasets"] = tests
    if split_size is not None:
        stage["testSplitSize"] = split_size
    training: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    accepted = set(accepted_extra_args())
    for key, value in recipe.items():
        if key in MODEL or key in ("dataset_mixture", "dataset_mixer", "dataset_splits"):
            continue
        if key in TRAINING:
            if key == "max_steps" and value in (-1, None):
                continue
            training[TRAINING[key]] = value
        elif key in NOT_CARRIED:
            notes.append(f"{at}{key}: {value!r} not carried ({NOT_CARRIED[key]})")
        elif key in accepted:
            extra[key] = value
        else:
            notes.append(f"{at}{key}: {value!r} not carried (not a field the run or TRL's "
                         f"{method.upper()}Config accepts here)")
    if method == "sft" and "completionOnlyLoss" not in training:
        # The handbook's SFT loss covers the whole chat (TRL without assistant_only_loss); the run's
        # default is the replies only: keep the recipe's meaning.
        training["completionOnlyLoss"] = False
        notes.append(f"{at}the loss covers the whole chat, as the handbook trains (completionOnlyLoss: false; "
                     f"remove it to train on the replies only)")
    if extra:
        training["extraArgs"] = extra
    stage["training"] = training
    return stage


def handbook_run(recipes: list[tuple[str, dict]], name: str, gpus: int = 8,
                 distributed: str = "deepspeed-zero3") -> tuple[dict, list[str]]:
    """(AlignmentRun document, notes on what was not carried) from (file name, recipe) pairs in order."""
    notes: list[str] = []
    first = recipes[0][1]
    model: dict[str, Any] = {}
    for key, field in MODEL.items():
        if key == "torch_dtype" and key in first:
            model[field] = DTYPES.get(first[key], first[key])  # null: the checkpoint's own
        elif first.get(key) is not None:
            model[field] = first[key]
    stages, previous = [], None
    for file, recipe in recipes:
        stem = "dpo" if "beta" in recipe else "sft"
        name_ = stem if stem not in [s["name"] for s in stages] else f"{stem}-{len(stages) + 1}"
        stage = stage_of(recipe, name_, previous, notes)
        if previous is not None:
            for key in MODEL:
                if key in recipe and key != "model_name_or_path" and recipe[key] != first.get(key):
                    notes.append(f"{name_}: {key}: {recipe[key]!r} not carried (one model setting per run: "
                                 f"{first.get(key)!r}, from {recipes[0][0]})")
            if recipe.get("model_name_or_path"):
                notes.append(f"{name_}: model_name_or_path {recipe['model_name_or_path']!r} replaced: the stage "
                             f"starts from {previous}'s final model")
        stage["resources"] = {"nodes": 1, "gpusPerNode": gpus}
        stage["distributed"] = distributed
        stages.append(stage)
        previous = name_
    doc = {"apiVersion": "alignment.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": name},
           "spec": {"model": model, "stages": stages}}
    return doc, notes
