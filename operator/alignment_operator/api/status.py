"""AlignmentRun status: the operator's memory, and what `kubectl get/describe` shows.

Printer columns read explicit fields here (phase, currentStage, progress, model), never the
last condition.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationError

from .base import ApiModel, KubeObject

RunPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Held"]
StagePhase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
RETRY_REQUEST_MAX = 253  # status.retryRequest's maxLength: a longer alignment.dev/retry value is refused


class Condition(ApiModel):
    """metav1.Condition."""

    type: str = Field(max_length=316, description="Condition type: Ready, Reconciling, Stalled, Failed, SpecRejected.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field("", max_length=32768, description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, ge=0, description="Spec generation the condition was computed from.")


def condition(old: list[Condition], type_: str, status: str, reason: str, message: str,
               now: str, generation: int | None) -> Condition:
    """A metav1.Condition whose lastTransitionTime moves only when its status flips."""
    prev = next((c for c in old if c.type == type_), None)
    since = prev.last_transition_time if prev is not None and prev.status == status else now
    return Condition(type=type_, status=status, reason=reason, message=message,
                     last_transition_time=since, observed_generation=generation)


class StageProgress(ApiModel):
    """What a training stage reports while it runs (pushed by the trainer; see progress.py)."""

    percent: int = Field(ge=0, le=100, description="Share of the stage's optimizer steps done.")
    step: int | None = Field(None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps the stage will take.")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds left, as the trainer reported it.")
    epoch: float | None = Field(None, description="Epochs done (fractional).")
    loss: float | None = Field(None, description="Latest logged training loss.")
    grad_norm: float | None = Field(None, description="Latest logged gradient norm.")
    learning_rate: float | None = Field(None, description="Current learning rate.")
    reward_margin: float | None = Field(None, description="Preference stages: latest rewards/margins.")
    reward_accuracy: float | None = Field(None, description="Preference stages: latest rewards/accuracies.")
    tokens_per_second: float | None = Field(None, description="Training throughput over the last logging interval.")
    step_seconds: float | None = Field(None, ge=0, description="Mean seconds per optimizer step of this attempt.")
    checkpoint_step: int | None = Field(None, ge=0, description="Step of the newest complete checkpoint.")
    checkpoint_time: str | None = Field(None, description="When the newest complete checkpoint was written (RFC 3339).")
    work_at_risk_seconds: float | None = Field(None, ge=0, description=(
        "Seconds trained since the newest complete checkpoint (or since training resumed from it): the work a "
        "preemption or restart now would lose."))
    degraded_reward_ties: float | None = Field(None, description=(
        "Set once GRPO groups' rewards all tie on more than stages[].guards.rewardTiesFraction of them for "
        "guards.steps logging steps (frac_reward_zero_std): the figure. It stays until the stage ends."))
    degraded_reward_failures: float | None = Field(None, description=(
        "Set once a reward or judge failed on more than guards.rewardFailureFraction of an interval's samples: the share."))
    degraded_preference_accuracy: float | None = Field(None, description=(
        "Set once training-batch preference accuracy stayed at chance (at most guards.chanceAccuracy) for "
        "guards.steps logging steps after warmup: the accuracy."))
    degraded_grad_norm: float | None = Field(None, description=(
        "Set once the gradient norm stayed at or below guards.zeroGradNorm (default: exactly 0) for guards.steps "
        "logging steps: no weight moves. The figure: the last gradient norm."))
    ranks: dict[str, str] | None = Field(None, description=(
        "Each rank's last alive beat (RFC 3339), by rank: every process of the stage beats every few seconds "
        "whatever it does (inside a step too), a stopped one beats nothing, so a hang names the rank(s) that "
        "stopped. A beat moves no hang clock (lastUpdated)."))
    last_updated: str = Field(description="When the trainer sent this (RFC 3339).")


class CheckpointRef(ApiModel):
    """A checkpoint a stage wrote on the run's volume."""

    step: int = Field(ge=0, description="Optimizer steps it holds.")
    path: str = Field(description="Its directory (checkpoint-N) on the run's volume.")
    time: str | None = Field(None, description="When it was written (RFC 3339).")
    complete: bool = Field(True, description="Whole (trainer_state.json written last): a restart resumes from it.")


class StageStatus(ApiModel):
    name: str = Field(description="Stage name.")
    phase: StagePhase = Field("Pending", description="Pending, Running, Succeeded, Failed or Suspended.")
    job_name: str | None = Field(None, description=(
        "The stage's child that runs it: a Job, or for several nodes a JobSet, PyTorchJob or Indexed Job "
        "(spec.stages[].resources.nodes)."))
    attempts: int = Field(0, ge=0, description=(
        "Pods started for the stage, over every Job it had (retries resume from the checkpoint)."))
    restarts: int = Field(0, ge=0, description=(
        "Whole-group restarts of a multi-node stage counted against backoffLimit (disruptions are not counted)."))
    disruptions: int = Field(0, ge=0, description=(
        "Disruptions the stage met (preemption, eviction, node drain): not counted against backoffLimit, at most "
        "stages[].maxDisruptions."))
    create_refusals: int = Field(0, ge=0, description=(
        "Times in a row the API server refused to create the stage's Job, JobSet, PyTorchJob, Service, ConfigMap or "
        "volume (invalid, forbidden, over quota). The stage fails after a few; a successful create, a spec change "
        "or a retry request (alignment.dev/retry) starts the count again."))
    last_refusal_time: str | None = Field(None, description="When the API server last refused one of the stage's "
                                          "children (RFC 3339); the next try waits a backoff from here.")
    previous_attempts: int = Field(0, ge=0, description=(
        "Attempts of the stage's earlier Jobs (deleted for a retry, or recreated); a new Job's count adds to it."))
    start_time: str | None = Field(None, description="When the stage's Job was created (RFC 3339).")
    completion_time: str | None = Field(None, description="When the stage finished (RFC 3339).")
    checkpoint: str | None = Field(None, description="The stage's final model on the run's volume.")
    metrics: dict[str, float] = Field({}, description="Final metrics: train_loss, eval_loss, rewards/accuracies, ...")
    message: str | None = Field(None, description="Why the stage failed or waits.")
    reason: str | None = Field(None, max_length=64, description=(
        "Why the stage failed or waits, in one CamelCase word: the pods' cause (ImagePullBackOff, "
        "CreateContainerConfigError, Unschedulable, FailedCreate, ...), StartDeadlineExceeded, ..."))
    attempt_spec: KubeObject | None = Field(None, description=(
        "What the stage's current attempt runs: its spec (and spec.model, for a stage that starts from it) "
        "when it started. A Job recreated or a group restarted runs this again, never a later edit "
        "(edits to a stage that ran are refused: SpecRejected); a retry takes the spec as it is then."))
    spec_hash: str | None = Field(None, description="Hash of the stage's spec when it started; edits after that are refused.")
    tracking: dict[str, str] = Field({}, description=(
        "Where the stage's tracked run is: tensorboard (event files' directory on the volume), wandb (run URL, "
        "or the offline run's directory), mlflow (run URL)."))
    progress: StageProgress | None = Field(None, description="Live progress while the stage trains (its last report).")
    latest_checkpoint: CheckpointRef | None = Field(None, description=(
        "The stage's newest complete checkpoint while it trains (from its progress): where a restart resumes; "
        "progress.workAtRiskSeconds is the training since it."))
    lost_steps: int = Field(0, ge=0, description=(
        "Steps trained past the newest complete checkpoint when a disruption or restart struck, summed: work "
        "done again."))
    lost_seconds: float = Field(0.0, ge=0, description=(
        "Seconds of training past the newest complete checkpoint when a disruption or restart struck "
        "(progress.workAtRiskSeconds then), summed: the time it cost."))
    last_disruption: str | None = Field(None, description=(
        "The words of the stage's last disruption (a pod preempted, evicted or drained): what happened and what "
        "it cost, the steps and seconds of training back to the newest complete checkpoint."))
    restart_reasons: dict[str, int] = Field({}, description="Restarts counted in restarts, by reason (Hang: ...).")
    last_restart: str | None = Field(None, description=(
        "The words of the stage's last restart for a hang: how long nothing moved, at which step, the rank(s) that "
        "stopped when known."))
    warnings: list[str] = Field([], description=(
        "What the stage fails to learn, each with its figure (the run's Degraded condition): rewards that all tie, "
        "a reward failing on many samples, preference accuracy at chance, gradients that are all zero."))
    variant_of: str | None = Field(None, description=(
        "The stage of the spec this one was expanded from: a matrix stage (one entry per variant) or an eval "
        "stage that evaluates several stages (one entry per evaluated stage)."))
    matrix: KubeObject | None = Field(None, description="The matrix values this variant trains with, e.g. {beta: 0.1}.")
    gpus: int | None = Field(None, ge=0, description=(
        "Accelerators the stage holds while it runs (nodes x gpusPerNode); 0: a CPU-only stage, its gpuSeconds 0."))
    gpu_seconds: float = Field(0.0, ge=0, description=(
        "GPUs x wall time of each of the stage's attempts (restarts, recreated Jobs and retries included), added "
        "when an attempt ends."))
    wall_seconds: float = Field(0.0, ge=0, description="Wall time of the stage's ended attempts, summed.")


class ComparisonRow(ApiModel):
    """One evaluated stage of an eval that compares several, on the same held-out data and reference."""

    stage: str = Field(description="The evaluated stage.")
    eval_stage: str = Field(description="The eval stage's entry that evaluated it.")
    matrix: KubeObject = Field({}, description="The evaluated stage's matrix values.")
    metrics: dict[str, float] = Field({}, description="The eval's metrics for it.")
    gpu_seconds: float = Field(0.0, ge=0, description="The evaluated stage's gpuSeconds (its training).")
    gpus: int | None = Field(None, ge=0, description="Its GPUs (0: CPU only).")
    best: bool = Field(False, description="Best by the compared metric.")
    promoted: bool = Field(False, description=(
        "spec.promote promoted this stage (the best by promote.chooseBy among those that pass every gate): the model "
        "exported and served. It may differ from best when the best misses a gate or chooseBy is another metric."))


class GateResult(ApiModel):
    """One gate of spec.promote, measured on one candidate."""

    metric: str = Field(description="The metric gated on.")
    stage: str = Field(description="The eval stage (entry) whose result it is: the candidate's.")
    value: float | None = Field(None, description="The candidate's value; unset: the eval reported no such metric.")
    threshold: float | None = Field(None, description="What it had to meet: min or max, or the other stage's value.")
    rule: str = Field(description="min, max, or atLeastAsGoodAs:<eval stage>.")
    passed: bool = Field(description="Whether the candidate met it.")


class ExportResult(ApiModel):
    """One promote.exports[] entry's outcome."""

    uri: str = Field(description="Where the model was written (s3://bucket/prefix).")
    digest: str | None = Field(None, description="sha256 of the exported files' SHA-256 list (_EXPORT_COMPLETE.json).")
    bytes: int | None = Field(None, ge=0, description="Bytes written.")
    files: int | None = Field(None, ge=0, description="Files written.")
    seconds: float | None = Field(None, ge=0, description="Time the export took (0: already there, the same files).")
    attempts: int | None = Field(None, ge=0, description="Tries it took (retries after a store that did not answer).")
    completed: str | None = Field(None, description="When it was marked complete (RFC 3339).")
    error: str | None = Field(None, max_length=4096, description="Why it failed (never a credential).")


class PromotionStatus(ApiModel):
    """What spec.promote decided once every stage finished."""

    verdict: Literal["Promoted", "Held"] = Field(description="Promoted: a candidate passed every gate; Held: none did.")
    eval_stage: str = Field(description="The eval stage whose results decided.")
    stage: str | None = Field(None, description="The promoted (trained) stage; when held, the best candidate's.")
    matrix: KubeObject | None = Field(None, description=(
        "That stage's matrix values when it is a sweep's variant (e.g. {beta: 0.1}): which variant ships."))
    evaluated_by: str | None = Field(None, description="The eval stage (entry) whose results chose it.")
    model: str | None = Field(None, description="The promoted model on the run's volume (that stage's final/).")
    chosen_by: str | None = Field(None, description="The metric candidates were ranked by (several candidates).")
    candidates: int = Field(0, ge=0, description="Candidates the eval measured.")
    gates: list[GateResult] = Field([], description="Each gate on the chosen (or, when held, the best) candidate.")
    message: str = Field("", max_length=4096, description="The decision in one line: the gates that failed, or passed.")
    serving: str | None = Field(None, description="promote.serve's InferenceService (its name).")
    url: str | None = Field(None, description="The InferenceService's URL, once KServe reports it ready.")
    exports: list[ExportResult] = Field([], description=(
        "promote.exports' results: each URI with its digest, bytes and time, or its error."))


class AlignmentRunStatus(ApiModel):
    phase: RunPhase = Field("Pending", description="Pending, Running, Succeeded, Failed or Suspended.")
    current_stage: str | None = Field(None, description="The stage running now, or the last one.")
    progress: str | None = Field(None, description="Stages finished out of all, e.g. 1/3.")
    progress_summary: str | None = Field(None, max_length=128, description=(
        "What `kubectl get` shows: the running stage's live progress (e.g. `dpo 43% ETA 2h10m`), "
        "else the stages finished out of all."))
    stages: list[StageStatus] = Field([], description="One entry per stage, in spec order.")
    model: str | None = Field(None, description="Final model of the last training stage.")
    evaluation: KubeObject = Field({}, description="Results of the eval stage (preference accuracy, perplexity, win rate).")
    conditions: list[Condition] = Field([], description=(
        "Ready (the run succeeded), Reconciling (work left: kstatus InProgress), Stalled (a stage failed: "
        "kstatus Failed), Failed (with the stage's message), SpecRejected."))
    observed_generation: int | None = Field(None, description="Spec generation last acted upon.")
    retry_request: str | None = Field(None, max_length=RETRY_REQUEST_MAX, description=(
        "The alignment.dev/retry annotation value last acted upon (failed stages were retried once for it)."))
    start_time: str | None = Field(None, description="When the first stage started (RFC 3339).")
    completion_time: str | None = Field(None, description="When the run finished (RFC 3339).")
    gpu_seconds: float = Field(0.0, ge=0, description="The stages' gpuSeconds, summed.")
    gpu_hours: float = Field(0.0, ge=0, description="gpuSeconds / 3600, rounded to 0.01 (the GPU-H column).")
    promotion: PromotionStatus | None = Field(None, description=(
        "spec.promote's decision: Promoted (chosen stage, model path, each gate's value and verdict) or Held."))
    comparison: list[ComparisonRow] = Field([], description=(
        "An eval stage that evaluates several stages (a matrix's variants, or eval.stages): one row per evaluated "
        "stage, best first by eval.compareBy."))


Path = tuple[str | int, ...]


def writable(status: AlignmentRunStatus) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """`status` on the wire as the API server will take it, and what had to change for that, as
    (path, note) pairs. JSON has no NaN or Infinity (an eval stage can report one): a non-finite
    number is left out of its map (or nulled in a list); a string longer than its schema's
    maxLength is cut to it, keeping its head and end. Anything else the models refuse raises."""
    wire = status.model_dump(by_alias=True, exclude_none=True)  # the numbers as they are (JSON mode nulls some)
    notes: list[tuple[Path, str]] = []
    _drop_non_finite(wire, (), notes)
    for _ in range(8):  # each pass fixes every string the models found too long
        try:
            return AlignmentRunStatus.model_validate(wire).wire(), notes
        except ValidationError as e:
            errors = e.errors()
            if any(err["type"] != "string_too_long" for err in errors):
                raise
            for err in errors:
                *parent_path, key = err["loc"]
                parent: Any = wire
                for part in parent_path:
                    parent = parent[part]
                text, limit = parent[key], err["ctx"]["max_length"]
                parent[key] = text[:limit // 4] + "…" + text[-(limit - limit // 4 - 1):]
                notes.append((tuple(err["loc"]), f"{len(text)} characters cut to {limit}"))
    raise ValueError("status kept strings too long")  # not reached: each pass shortens them


def _drop_non_finite(obj: Any, path: Path, notes: list[tuple[Path, str]]) -> None:
    items = list(obj.items()) if isinstance(obj, dict) else list(enumerate(obj)) if isinstance(obj, list) else []
    for key, value in items:
        if isinstance(value, float) and not math.isfinite(value):
            notes.append(((*path, key), f"{value} is not a number JSON can carry: left out"))
            if isinstance(obj, dict):
                del obj[key]
            else:
                obj[key] = None
        else:
            _drop_non_finite(value, (*path, key), notes)
