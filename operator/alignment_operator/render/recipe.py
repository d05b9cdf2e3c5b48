"""(run, stage) -> the stage's recipe: the trainer's contract, rendered the same way for a
cluster (into a ConfigMap) and for `alignctl run --local`.

Pure: no I/O. A hyperparameter the stage leaves unset (learning rate, beta, prompt length)
stays unset here: the recipe fills it from the method table (alignment_trainer.recipe.METHODS),
so a rendered stage and a hand-written recipe get the same defaults.
"""

from __future__ import annotations

import json
import posixpath
from typing import TypeVar

from pydantic import BaseModel

from alignment_trainer.recipe import (
    METHODS, AlpacaEvalArgs, DatasetArgs, EvalArgs, GenerateArgs, GrpoArgs, JudgeArgs, LabelArgs, LmEvalArgs,
    LoraArgs, ModelArgs, MtBenchArgs, Recipe, RewardArgs, TrainingArgs,
)
from alignment_trainer.recipe import GuardArgs, TrackingArgs

from ..api import AlignmentRun, DatasetSpec, StageSpec
from ..api.spec import GenerateSpec, ObjectStoreSpec

JUDGE_API_KEY_ENV = "JUDGE_API_KEY"
M = TypeVar("M", bound=BaseModel)


def stage_dir(root: str, run: AlignmentRun, stage_name: str) -> str:
    """Where a stage writes checkpoint-N/, final/, result.json: <root>/<namespace>/<run>/<stage>, and
    on a cluster <root>/<namespace>/<run>/<uid>/<stage> (the run's first 8 UID characters): the volume
    outlives the run, and a run deleted and applied again under the same name is a new run that
    trains from its first stage, never one that finds the old run's final/ and reports it as its own."""
    uid = (run.metadata.model_extra or {}).get("uid")
    run_dir = posixpath.join(run.metadata.name, str(uid)[:8]) if uid else run.metadata.name
    return posixpath.join(root, run.metadata.namespace or "default", run_dir, stage_name)


def final_dir(root: str, run: AlignmentRun, stage_name: str) -> str:
    return posixpath.join(stage_dir(root, run, stage_name), "final")


def start_stage(run: AlignmentRun, index: int) -> StageSpec | None:
    """The stage whose final model stage `index` starts from; None means spec.model.

    `from` when given, else the nearest earlier stage that trains a policy (eval, generate and
    label stages make no model and a reward stage's is a reward model: a dpo stage after
    generate -> label starts from the model that generated).
    """
    return run.spec.start_stage(index)


def start_model(run: AlignmentRun, index: int, root: str) -> str:
    start = start_stage(run, index)
    return run.spec.model.source if start is None else final_dir(root, run, start.name)


def stage_dataset(root: str, run: AlignmentRun, stage_name: str) -> str:
    """The dataset a data stage (generate, label) leaves on the volume: <stage>/final/<METHODS[m].writes>."""
    producer = next(s for s in run.spec.stages if s.name == stage_name)
    return posixpath.join(final_dir(root, run, stage_name), METHODS[producer.method].writes)


def _dataset(d: DatasetSpec, run: AlignmentRun, root: str) -> DatasetArgs:
    path = d.source if d.stage is None else stage_dataset(root, run, d.stage)
    return from_spec(DatasetArgs, d, path=path, name=d.config)


def _eval_reference(run: AlignmentRun, index: int, root: str) -> str:
    """Eval compares against `eval.reference`, else the model the evaluated stage started from."""
    stage = run.spec.stages[index]
    if stage.eval is not None and stage.eval.reference is not None:
        return final_dir(root, run, stage.eval.reference)
    evaluated = start_stage(run, index)
    if evaluated is None:
        return run.spec.model.source
    return start_model(run, run.spec.stages.index(evaluated), root)


def _training(stage: StageSpec) -> TrainingArgs:
    t = stage.training
    return from_spec(TrainingArgs, t, per_device_eval_batch_size=t.per_device_train_batch_size)


def _eval_training(run: AlignmentRun, index: int) -> TrainingArgs:
    """An eval stage scores rewards with the evaluated stage's beta (dpo/ipo/kto: the KL strength
    it trained with) and cuts sequences with its max lengths, unless the eval stage sets its own."""
    stage = run.spec.stages[index]
    args = _training(stage)
    evaluated = start_stage(run, index)
    if evaluated is None:
        return args
    given, trained = stage.training.model_fields_set, evaluated.training
    update = {}
    info = METHODS[evaluated.method]
    if "beta" not in given and info.reference:
        update["beta"] = trained.beta or info.beta
    if not {"max_length", "max_prompt_length"} & given:  # the lengths go together
        update.update(max_length=trained.max_length, max_prompt_length=trained.max_prompt_length)
    return args.model_copy(update=update)


def build_recipe(run: AlignmentRun, index: int, root: str,
                 termination_message_path: str | None = None) -> Recipe:
    """The recipe of stage `index`, with every path under `root` (the volume's mount path)."""
    stage = run.spec.stages[index]
    m = run.spec.model
    start = start_model(run, index, root)
    first = start == m.source
    lora = stage.lora
    return Recipe(
        method=stage.method,
        model=from_spec(ModelArgs, m, model_name_or_path=start, model_revision=m.revision if first else "main"),
        # Preference methods use the model they start from as the frozen reference.
        ref_model=start if METHODS[stage.method].reference and METHODS[stage.method].trains else None,
        datasets=[_dataset(d, run, root) for d in stage.datasets],
        test_datasets=[_dataset(d, run, root) for d in stage.test_datasets],
        test_split_size=stage.test_split_size,
        training=_training(stage) if stage.method != "eval" else _eval_training(run, index),
        lora=None if lora is None else from_spec(
            LoraArgs, lora, target_modules="all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules),
        eval=None if stage.method != "eval" else _eval_args(run, index, root),
        grpo=None if stage.grpo is None else from_spec(
            GrpoArgs, stage.grpo, rewards=_rewards(run, stage.grpo.rewards, root, "grpo")),
        generate=from_spec(GenerateArgs, stage.generate or GenerateSpec()) if stage.method == "generate" else None,
        label=None if stage.label is None else from_spec(
            LabelArgs, stage.label, rewards=_rewards(run, stage.label.rewards, root, "label")),
        output_dir=stage_dir(root, run, stage.name),
        guards=GuardArgs.model_validate(stage.guards.model_dump()) if stage.guards else GuardArgs(),
        # Reference log-probs are kept once per volume, keyed by what determines them: a later stage,
        # a rerun or another run on the same volume that asks for the same reuses them.
        cache_dir=posixpath.join(root, "cache", "reference-logps") if METHODS[stage.method].reference else None,
        termination_message_path=termination_message_path,
        object_store=object_store_args(run, root),
        tracking=render_tracking(run, stage),
        run_name=run.metadata.name,
        stage_name=stage.name,
        base_model=m.source,
        base_model_revision=m.revision,
        gpu_seconds={s.name: s.gpu_seconds for s in run.status.stages if s.phase == "Succeeded"}
        if run.status is not None and any(s.phase == "Succeeded" for s in run.status.stages) else None,
        push_to_hub=run.spec.hub is not None and index == pushing_stage(run),
        hub_model_id=run.spec.hub.repo_id if run.spec.hub is not None else None,
        hub_private=run.spec.hub.private if run.spec.hub is not None else True,
    )


def object_store_args(run: AlignmentRun, root: str):
    """recipe.object_store when the run reads from or writes to a store: its endpoint and region, and the
    run's sources/ directory (beside its stages': each s3:// source fetched once, reused by every stage)."""
    from alignment_trainer.recipe import ObjectStoreArgs

    store = run.spec.object_store
    if store is None and '"s3://' not in json.dumps(run.spec.wire()):
        return None
    return from_spec(ObjectStoreArgs, store or ObjectStoreSpec(),
                     sources_dir=posixpath.join(posixpath.dirname(stage_dir(root, run, "_")), "sources"))


def pushing_stage(run: AlignmentRun) -> int:
    """spec.hub's push is done by the last stage that trains or evaluates (it holds the final model)."""
    return max(i for i, s in enumerate(run.spec.stages) if METHODS[s.method].trains or s.method == "eval")


def reward_judge_env(section: str, index: int) -> str:
    """The environment variable holding the API key of <section>.rewards[index]'s judge (a secretKeyRef)."""
    return f"{section.upper()}_REWARD_{index}_JUDGE_API_KEY"


def reward_judges(stage: StageSpec) -> list[tuple[str, object]]:
    """(env name, JudgeSpec) of every judge reward of a stage."""
    sections = (("grpo", stage.grpo), ("label", stage.label), ("eval", stage.eval))
    return [(reward_judge_env(name, k), r.judge) for name, section in sections if section is not None
            for k, r in enumerate(section.rewards) if r.judge is not None]


def _rewards(run: AlignmentRun, rewards, root: str, name: str) -> list[RewardArgs]:
    """A reward_model reward names an earlier reward stage (its final/ scores); a judge reward reads
    its key from reward_judge_env(name, k)."""
    return [from_spec(RewardArgs, r, model=final_dir(root, run, r.reward_model) if r.reward_model else None,
                      judge=None if r.judge is None else from_spec(JudgeArgs, r.judge,
                                                                  api_key_env=reward_judge_env(name, k)))
            for k, r in enumerate(rewards)]


def from_spec(args: type[M], spec: BaseModel, **resolved) -> M:
    """A recipe section from the run's: the fields both declare (once, in the trainer's contract) by name, and
    what render resolves from the run (a dataset's path, a reward stage's final/, a Secret's environment name)."""
    return args.model_validate({**spec.model_dump(include=set(args.model_fields) - set(resolved)), **resolved})


def render_tracking(run: AlignmentRun, stage: StageSpec) -> TrackingArgs:
    """The stage's tracking (its own, else the run's); credentials are pod env (manifests), never here."""
    t = stage.tracking or run.spec.tracking
    report = (["tensorboard"] if t.tensorboard.enabled else []) + (["wandb"] if t.wandb else []) + (
        ["mlflow"] if t.mlflow else [])
    w, m = t.wandb, t.mlflow
    return TrackingArgs(
        report_to=report,
        wandb_project=w.project if w else None, wandb_entity=w.entity if w else None,
        wandb_mode=w.mode if w else "online", wandb_base_url=w.base_url if w else None,
        mlflow_tracking_uri=m.tracking_uri if m else None, mlflow_experiment=(m.experiment or None) if m else None,
    )


def _eval_args(run: AlignmentRun, index: int, root: str) -> EvalArgs:
    e = run.spec.stages[index].eval
    reference = _eval_reference(run, index, root)
    # The base model as the reference keeps its pinned revision (a stage's final/ has none).
    revision = run.spec.model.revision if reference == run.spec.model.source else "main"
    if e is None:
        return EvalArgs(reference_model=reference, reference_revision=revision)
    return from_spec(
        EvalArgs, e,
        reference_model=reference,
        reference_revision=revision,
        reward_model=final_dir(root, run, e.reward_model) if e.reward_model else None,
        prompts=_dataset(e.prompts, run, root) if e.prompts else None,
        judge=None if e.judge is None else from_spec(JudgeArgs, e.judge, api_key_env=JUDGE_API_KEY_ENV),
        lm_eval=None if e.lm_eval is None else from_spec(LmEvalArgs, e.lm_eval),
        alpaca_eval=None if e.alpaca_eval is None else from_spec(
            AlpacaEvalArgs, e.alpaca_eval, reference_outputs=_dataset(e.alpaca_eval.reference_outputs, run, root),
            prompts=_dataset(e.alpaca_eval.prompts, run, root) if e.alpaca_eval.prompts else None),
        rewards=_rewards(run, e.rewards, root, "eval"),
        mt_bench=None if e.mt_bench is None else from_spec(
            MtBenchArgs, e.mt_bench, questions=_dataset(e.mt_bench.questions, run, root)),
    )
