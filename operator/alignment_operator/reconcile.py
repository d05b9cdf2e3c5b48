"""The operator's state machine: (run, observed children, now) -> (new status, actions).

Pure: no I/O, no clock, no Kubernetes client. `handlers.py` gathers what is observed, calls
`reconcile`, and `kube.py` applies the actions idempotently (create-if-absent, status patched
only when it changed). Because status is the memory and children have deterministic names, a
restarted operator recomputes the same answer and creates nothing twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from .api import AlignmentRun, AlignmentRunStatus, Condition, StageStatus

ChildState = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]


@dataclass(frozen=True)
class ObservedChild:
    """What the cluster says about one stage's Job or PyTorchJob."""

    stage: str
    name: str
    state: ChildState
    attempts: int = 0
    created: str | None = None
    finished: str | None = None
    message: str | None = None          # why it failed: the pod's reason and message
    result: dict[str, Any] | None = None  # the trainer's termination message (parsed JSON)
    spec_hash: str | None = None
    suspended: bool = False


@dataclass(frozen=True)
class CreateStage:
    index: int          # the shell renders and creates the stage's ConfigMap, Job/PyTorchJob (+ Service)
    suspend: bool


@dataclass(frozen=True)
class SetSuspend:
    stage: str
    name: str
    suspend: bool


@dataclass(frozen=True)
class DeleteChildren:
    """ttlSecondsAfterFinished elapsed: delete the run's Jobs (never the volume)."""


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class RequeueAfter:
    seconds: float


Action = CreateStage | SetSuspend | DeleteChildren | Event | RequeueAfter


@dataclass
class Outcome:
    status: AlignmentRunStatus
    actions: list[Action] = field(default_factory=list)


def stage_hash(run: AlignmentRun, index: int) -> str:
    """Fingerprint of what a stage runs: its own spec and the model it starts from."""
    stage = run.spec.stages[index]
    payload = {"stage": stage.wire(), "model": run.spec.model.wire() if index == 0 else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _metrics(result: dict[str, Any] | None) -> dict[str, float]:
    """The numbers of a trainer's termination message (flat, or under "metrics")."""
    result = result or {}
    raw = {**result, **(result.get("metrics") if isinstance(result.get("metrics"), dict) else {})}
    return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _condition(old: list[Condition], type_: str, status: str, reason: str, message: str,
               now: str, generation: int | None) -> Condition:
    """A metav1.Condition whose lastTransitionTime moves only when its status flips."""
    prev = next((c for c in old if c.type == type_), None)
    since = prev.last_transition_time if prev is not None and prev.status == status else now
    return Condition(type=type_, status=status, reason=reason, message=message,
                     last_transition_time=since, observed_generation=generation)


def reconcile(run: AlignmentRun, generation: int | None, children: dict[str, ObservedChild],
              now: str) -> Outcome:
    """Everything the operator decides, from what it can see."""
    old = run.status or AlignmentRunStatus()
    prior = {s.name: s for s in old.stages}
    events: list[Action] = []
    actions: list[Action] = []
    stages: list[StageStatus] = []
    edited: list[str] = []
    failed: StageStatus | None = None
    blocked = False  # an earlier stage has not succeeded: later ones wait

    for i, spec in enumerate(run.spec.stages):
        was = prior.get(spec.name) or StageStatus(name=spec.name)
        st = was.model_copy(deep=True)
        child = children.get(spec.name)
        current_hash = stage_hash(run, i)
        if st.spec_hash and st.spec_hash != current_hash and st.phase != "Pending":
            edited.append(spec.name)

        create = CreateStage(i, suspend=run.spec.suspend or bool(run.spec.queue_name))
        if st.phase in ("Succeeded", "Failed") or blocked:
            pass  # finished for good, or waiting behind an earlier stage (failed or not done)
        elif child is None and st.phase == "Pending":
            actions.append(create)
            st.phase = "Suspended" if run.spec.suspend else "Running"
            st.start_time = now
            st.spec_hash = current_hash
            events.append(Event("Normal", "StageStarted", f"stage {spec.name} ({spec.method}) started"))
        elif child is None:
            # The Job vanished (deleted by hand): recreate it; the trainer resumes from its checkpoint.
            actions.append(create)
            events.append(Event("Warning", "JobRecreated",
                                f"stage {spec.name}: Job {st.job_name} is gone; recreating it"))
        else:
            _observe(st, child, run, now, actions, events)
        if st.phase == "Failed":
            failed = st
        if st.phase != "Succeeded":
            blocked = True
        stages.append(st)

    status = _summarize(run, old, stages, failed, edited, generation, now)
    if status.phase != old.phase and status.phase in ("Succeeded", "Failed"):
        events.append(Event("Normal" if status.phase == "Succeeded" else "Warning", f"Run{status.phase}",
                            f"run {status.phase.lower()}: {status.progress} stages succeeded"
                            + (f"; model {status.model}" if status.phase == "Succeeded" and status.model else "")))
    ttl = run.spec.ttl_seconds_after_finished
    if status.phase in ("Succeeded", "Failed") and ttl is not None and status.completion_time:
        left = (_ts(status.completion_time) + timedelta(seconds=ttl) - _ts(now)).total_seconds()
        actions.append(DeleteChildren() if left <= 0 else RequeueAfter(left))
    return Outcome(status=status, actions=actions + events)


def _observe(st: StageStatus, child: ObservedChild, run: AlignmentRun, now: str,
             actions: list[Action], events: list[Action]) -> None:
    """Fold a running stage's Job into its status."""
    st.job_name = child.name
    st.attempts = max(st.attempts, child.attempts)
    st.start_time = st.start_time or child.created or now
    st.spec_hash = st.spec_hash or child.spec_hash
    if child.state == "Succeeded":
        st.phase = "Succeeded"
        st.completion_time = child.finished or now
        st.checkpoint = (child.result or {}).get("checkpoint", st.checkpoint)
        st.metrics = _metrics(child.result)
        st.message = None
        events.append(Event("Normal", "StageSucceeded", f"stage {st.name} succeeded: {_brief(st.metrics)}"))
        return
    if child.state == "Failed":
        st.phase = "Failed"
        st.completion_time = child.finished or now
        st.message = child.message or "the stage's Job failed"
        events.append(Event("Warning", "StageFailed", f"stage {st.name} failed: {st.message}"))
        return
    suspend, queued = run.spec.suspend, bool(run.spec.queue_name)
    # With Kueue the queue unsuspends admitted Jobs; the operator only ever suspends them.
    if suspend != child.suspended and (suspend or not queued):
        actions.append(SetSuspend(st.name, child.name, suspend))
        events.append(Event("Normal", "Suspended" if suspend else "Resumed",
                            f"stage {st.name} {'suspended' if suspend else 'resumed'}"))
    waiting_for_queue = child.suspended and queued and not suspend
    st.phase = "Suspended" if suspend or waiting_for_queue else "Running"
    st.message = f"waiting for Kueue to admit it (queue {run.spec.queue_name})" if waiting_for_queue else None


def _brief(metrics: dict[str, float]) -> str:
    keys = ("train_loss", "eval_loss", "eval_rewards/accuracies", "rewards/accuracies")
    shown = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics]
    return ", ".join(shown) or "no metrics reported"


def _summarize(run: AlignmentRun, old: AlignmentRunStatus, stages: list[StageStatus],
               failed: StageStatus | None, edited: list[str], generation: int | None,
               now: str) -> AlignmentRunStatus:
    done = sum(s.phase == "Succeeded" for s in stages)
    current = next((s for s in stages if s.phase != "Succeeded"), stages[-1])
    if failed is not None:
        phase = "Failed"
    elif done == len(stages):
        phase = "Succeeded"
    elif current.phase == "Suspended":
        phase = "Suspended"
    elif any(s.phase in ("Running",) for s in stages):
        phase = "Running"
    else:
        phase = "Pending"
    model = next((s.checkpoint for s, spec in zip(reversed(stages), reversed(run.spec.stages))
                  if spec.method != "eval" and s.phase == "Succeeded" and s.checkpoint), None)
    evaluation = dict(old.evaluation)
    for s, spec in zip(stages, run.spec.stages):
        if spec.method == "eval" and s.phase == "Succeeded":
            evaluation = {"stage": s.name, **s.metrics}
    finished = phase in ("Succeeded", "Failed")
    conditions = [
        _condition(old.conditions, "Ready", "True" if phase == "Succeeded" else "False",
                   "RunSucceeded" if phase == "Succeeded" else phase, f"{done}/{len(stages)} stages succeeded",
                   now, generation),
        _condition(old.conditions, "Progressing", "True" if phase == "Running" else "False",
                   f"Stage{current.phase}" if not finished else f"Run{phase}",
                   f"stage {current.name} is {current.phase.lower()}", now, generation),
        _condition(old.conditions, "Failed", "True" if failed else "False",
                   "StageFailed" if failed else "NoFailure",
                   f"stage {failed.name}: {failed.message}" if failed else "", now, generation),
    ]
    if edited:
        conditions.append(_condition(
            old.conditions, "SpecRejected", "True", "StageAlreadyRan",
            f"edits to stage(s) {', '.join(edited)} are not applied: they already ran. Revert the "
            f"edit, or create a new AlignmentRun (its model.source can point at a stage's final/)",
            now, generation))
    return AlignmentRunStatus(
        phase=phase,
        current_stage=current.name,
        progress=f"{done}/{len(stages)}",
        stages=stages,
        model=model,
        evaluation=evaluation,
        conditions=conditions,
        observed_generation=generation,
        start_time=old.start_time or next((s.start_time for s in stages if s.start_time), None),
        completion_time=(old.completion_time or now) if finished else None,
    )
