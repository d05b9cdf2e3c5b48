"""The operator's state machine: (run, observed children, now) -> (new status, actions).

Pure: no I/O, no clock, no Kubernetes client. Every transition lives here (start, finish,
fail, interrupt, retry, suspend, recreate, ttl), for both shells: the cluster shell
(`controller.py` observes Jobs through kube.py and applies the actions idempotently) and the
local shell (`local/`, stages as child processes). Because status is the memory and children
have deterministic names, a restarted operator recomputes the same answer and creates nothing
twice.

Retry is one feature for both shells: the run's `alignment.dev/retry` annotation, set to a value
status.retryRequest has not seen, puts every failed stage back to Pending once (its failed child
is deleted first; the new one resumes from the newest checkpoint). `alignctl run --local` sets
a fresh value each time it runs. Succeeded stages are never redone.

A child the API server refuses to create (invalid, forbidden, over quota) is something the shell
observes like a failed child: `ObservedChild(state="Refused", refusal=...)`. The stage waits a
backoff and tries again, CREATE_TRIES times in a row at most (counted in status), then fails with
the server's message; a spec change or a retry request lets it try again. An object of the same
name that is not the run's (a 409 on create) is such a refusal: never adopted, never replaced; one
that is going away (being deleted, or left by an earlier run of the same name for the garbage
collector) is waited for without counting.

Children are the run's by their controller ownerReference (observe.py); one being deleted never
finishes a stage: the stage waits for it to go, and a Running stage whose child is gone gets a
new one (counted in attempts, resuming from the newest checkpoint). A stage attempt runs the spec
it started with (status.stages[].attemptSpec): a recreated Job or a restarted group never picks up
an edit that SpecRejected reported as not applied. A stage whose pods cannot start (image pull,
missing Secret, unschedulable, the Job's FailedCreate) says why in its message, its reason and the
Reconciling condition; with startDeadlineSeconds it fails with that cause when the time is up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from alignment_trainer import outcome
from alignment_trainer.recipe import METHODS

from .api import RETRY_ANNOTATION, AlignmentRun, AlignmentRunStatus, Condition, StageStatus
from .api.status import ComparisonRow, condition
from .identity import attempt_spec, child_name, spec_hash, stage_hash
from .render.recipe import stage_dir
from .health import (RANK_STALE_S, charge_lost_work, hang_timeout, hang_words, note_checkpoint, rank_silent_for,
                     silent_for, stopped_ranks, warnings as learning_warnings)
from .api.spec import ModelSpec, StageSpec
from .graph import inputs
from . import promotion
from .progress import completed
from .progress import summary as progress_summary

# Interrupted: the child was stopped by a signal and is gone (the local shell's Ctrl-C).
# Refused: the API server refused to create it just now (the cluster shell's create failed; see Refusal).
# Deleting: it has a deletionTimestamp; whatever it says, it finishes nothing (the stage waits for it to go).
FINISHED = ("Succeeded", "Failed", "Held")  # run phases after which nothing runs (Held: promote's gates failed)
ChildState = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Interrupted", "Refused", "Deleting"]
STOPPED = ("Failed", "Interrupted")  # a Pending stage with such a child is to run again (a retry)
CREATE_TRIES = 3          # refused creates in a row before the stage fails
REFUSAL_BACKOFF = 5.0     # seconds before the second try; doubled before each later one
SERVER_MESSAGE_LIMIT = 800  # of the server's words in status (an Event holds 1024 characters)
NOT_STARTED_POLL = 15.0   # seconds between looks at a stage whose pods have not started and say nothing yet
DELETING_POLL = 5.0       # seconds between looks at a child that is being deleted (its DELETED event may be missed)
SECRET_POLL = 10.0        # seconds between looks at the Secrets a run waits for (nothing watches Secrets)


@dataclass(frozen=True)
class Refusal:
    """The API server's answer to a create it refused (HTTP 4xx: 422 Invalid, 403 Forbidden by RBAC,
    an admission policy or a ResourceQuota, 400 BadRequest, ...)."""

    kind: str
    name: str
    code: int
    reason: str     # the Status reason: Invalid, Forbidden, BadRequest, AlreadyExists, ...
    message: str    # the Status message, as the server wrote it
    going: bool = False  # 409: the object in the way is going away (being deleted, or an earlier run's of this
                         # name, left to the garbage collector): try again, without counting a refusal


@dataclass(frozen=True)
class Cause:
    """Why a child's pods have not started: a container's waiting reason (ImagePullBackOff,
    CreateContainerConfigError, ...), PodScheduled=False's reason (Unschedulable), the Job's FailedCreate."""

    reason: str
    message: str    # names the pod (or Job) and says what is wrong, as the kubelet, scheduler or controller wrote it


@dataclass(frozen=True)
class ObservedChild:
    """What a shell says about one stage's child: a Job, JobSet or PyTorchJob, or a local process."""

    stage: str
    name: str
    state: ChildState
    attempts: int = 0                   # pods (processes) this child started
    kind: str = "Job"
    created: str | None = None
    finished: str | None = None
    message: str | None = None          # why it failed: the pod's reason and message
    result: dict[str, Any] | None = None  # the trainer's termination message (parsed JSON)
    spec_hash: str | None = None
    suspended: bool = False
    group: bool = False                 # several ranks that restart together (an Indexed Job's ranks)
    gpus: int | None = None             # accelerators it held (None: the stage's nodes x gpusPerNode)
    failure: str | None = None          # a failed group: 'input', 'disruption' or 'failure' (counted)
    refusal: Refusal | None = None      # state Refused: what the API server said
    uid: str | None = None              # the object's UID: a delete is made only if it is still this object
    started: bool = True                # a pod of it has run its container (False: none has yet)
    waiting: Cause | None = None        # not started: why, when the pods or the Job say
    since: str | None = None            # when it could start: the Job's startTime (reset on resume), else created
    disruptions: int = 0                # its pods disrupted (preempted, evicted, drained), replaced uncounted
    disruption: str | None = None       # the last such pod's words
    stopped: tuple[str, ...] = ()       # its ranks seen stopped (the local shell reads their process states)


@dataclass(frozen=True)
class CreateStage:
    index: int          # the shell renders and creates the stage's ConfigMap, Job/PyTorchJob (+ Service)
    suspend: bool


@dataclass(frozen=True)
class SetSuspend:
    stage: str
    name: str
    kind: str
    suspend: bool


@dataclass(frozen=True)
class DeleteChild:
    """A failed child of a stage being retried, or one whose stage missed its start deadline: delete it
    (with its pods) before a new one starts, only if it is still the object of `uid` (a precondition)."""

    stage: str
    name: str
    kind: str
    uid: str | None = None


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


Action = CreateStage | SetSuspend | DeleteChild | DeleteChildren | Event | RequeueAfter


@dataclass
class Outcome:
    status: AlignmentRunStatus
    actions: list[Action] = field(default_factory=list)


def attempt_run(run: AlignmentRun, status: AlignmentRunStatus | None, index: int) -> AlignmentRun:
    """The run as stage `index`'s current attempt renders it: with the spec the attempt pinned when it
    started (status.stages[].attemptSpec), so a recreated Job or a restarted group runs what it ran,
    never an edit reported as not applied. The run itself when nothing is pinned."""
    name = run.spec.stages[index].name
    st = next((s for s in (status.stages if status else []) if s.name == name), None)
    if st is None or not st.attempt_spec or st.attempt_spec == attempt_spec(run, index):
        return run
    pinned = run.model_copy(deep=True)
    pinned.spec.stages[index] = StageSpec.model_validate(st.attempt_spec["stage"])
    if st.attempt_spec.get("model") is not None:
        pinned.spec.model = ModelSpec.model_validate(st.attempt_spec["model"])
    return pinned


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _metrics(result: dict[str, Any] | None) -> dict[str, float]:
    """The numbers of a trainer's termination message (flat, or under "metrics")."""
    result = result or {}
    raw = {**result, **(result.get("metrics") if isinstance(result.get("metrics"), dict) else {})}
    return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def reconcile(run: AlignmentRun, generation: int | None, children: dict[str, ObservedChild],
              now: str, slots: int | None = None, lacking: dict[str, list[str]] | None = None) -> Outcome:
    """Everything the operator decides, from what it can see. Stages form a graph by what they read
    (graph.inputs): a stage starts once its inputs succeeded, siblings side by side, at most
    spec.parallelism (and `slots`, what the shell can hold: the local shell's cores) running at once. A
    failed stage's readers wait, reason InputFailed; the run is Failed once nothing else can run."""
    old = run.status or AlignmentRunStatus()
    prior = {s.name: s for s in old.stages}
    events: list[Action] = []
    actions: list[Action] = []
    stages: list[StageStatus] = []
    edited: list[str] = []
    failed: StageStatus | None = None
    interrupted: StageStatus | None = None
    phases: dict[str, str] = {}  # this pass's phase of each stage so far (inputs come first in spec order)
    doomed: set[str] = set()     # stages that failed, and those that read one: they cannot run now
    startable: list[tuple[int, StageStatus]] = []  # Pending stages whose inputs succeeded, no child yet
    retry = run.metadata.annotations.get(RETRY_ANNOTATION)
    retrying = retry is not None and retry != old.retry_request

    for i, spec in enumerate(run.spec.stages):
        was = prior.get(spec.name) or StageStatus(name=spec.name)
        st = was.model_copy(deep=True)
        child = children.get(spec.name)
        current_hash = stage_hash(run, i)
        needs = inputs(run, i)
        blocked = any(phases.get(n) != "Succeeded" for n in needs)  # an input has not succeeded: it waits
        lost = [n for n in needs if n in doomed]
        if st.spec_hash and st.spec_hash != current_hash and st.phase != "Pending":
            edited.append(spec.name)
        if retrying and st.phase == "Failed" and not blocked:
            events.append(Event("Normal", "StageRetried", f"stage {spec.name}: trying again from its newest "
                                f"checkpoint (it failed before: {st.message})"))
            st.phase, st.completion_time, st.message, st.reason = "Pending", None, None, None
            st.previous_attempts = st.attempts
            st.create_refusals, st.last_refusal_time = 0, None
            st.disruptions = 0  # counted again, up to maxDisruptions
            st.attempt_spec = None  # a new attempt: it runs the spec as it is now
        elif st.create_refusals and generation != old.observed_generation and not blocked:
            # The spec changed since the API server refused the stage's child: try again at once.
            if st.phase == "Failed":
                events.append(Event("Normal", "StageRetried", f"stage {spec.name}: the run's spec changed; "
                                    f"creating its children again (refused before: {st.message})"))
                st.phase, st.completion_time, st.message, st.reason = "Pending", None, None, None
            st.create_refusals, st.last_refusal_time = 0, None
            if st.phase == "Pending" and not st.previous_attempts:
                st.attempt_spec = None  # nothing of it ran: it starts with the spec as it is now

        create = CreateStage(i, suspend=run.spec.suspend or bool(run.spec.queue_name))
        if st.phase in ("Succeeded", "Failed"):
            pass  # finished for good
        elif blocked and st.phase == "Pending" and child is None:
            # waiting for what it reads; an input that failed (or waits on a failed one) stops it here
            st.message, st.reason = (f"not started: stage {', '.join(lost)} it reads failed", "InputFailed") \
                if lost else (None, None)
        elif blocked:
            pass
        elif child is not None and child.state == "Deleting":
            # Whatever it says, it finishes nothing: the stage waits for it to go, then goes on (a
            # Running stage gets a new child, a retried one its first).
            st.message = f"{child.kind} {child.name} is being deleted; the stage goes on once it is gone"
            st.reason = "WaitingForDeletion"
            actions.append(RequeueAfter(DELETING_POLL))
        elif child is not None and child.state == "Refused":
            _refused(st, child.refusal or Refusal(child.kind, child.name, 0, "Unknown", child.message or ""),
                     now, actions, events)
        elif child is None and st.phase == "Pending" and (wait := refusal_wait(st, now)) > 0:
            actions.append(RequeueAfter(wait))  # refused before: the backoff has not passed yet
        elif child is not None and st.phase == "Pending" and (child.state in STOPPED or (
                st.reason == "Hang" and child.state != "Succeeded")):  # a hung group: every rank goes
            # The stopped child of a stage that is to run again (a retry): gone first, then a new one.
            # (A succeeded child is never deleted: it folds in below, whatever status says.)
            actions.append(DeleteChild(spec.name, child.name, child.kind, child.uid))
            if st.reason != "Hang":  # a hang's words (which rank stopped) stay until the new child starts
                st.message = f"retrying: deleting the {child.state.lower()} {child.kind} {child.name} first"
        elif child is None and st.phase == "Pending":
            startable.append((i, st))  # started below, within parallelism
        elif child is None:
            # The child vanished (deleted by hand, or the watch missed it): a new one, counted as an
            # attempt, runs what the attempt ran; the trainer resumes from its newest checkpoint.
            actions.append(create)
            _end_attempt(st, run, None, now)  # the vanished child's time counts; the new one's starts now
            st.start_time = now
            st.previous_attempts = st.attempts
            st.attempts += 1
            st.message, st.reason = f"{st.job_name} was gone while the stage ran; recreated it", "ChildRecreated"
            st.progress = None  # the new child loads and resumes before it reports: no hang clock until it does
            events.append(Event("Warning", "JobRecreated",
                                f"stage {spec.name}: {st.job_name} is gone; recreating it (attempt {st.attempts}, "
                                f"resuming from the newest checkpoint)"))
        else:
            _fold_child(st, child, run, now, actions, events)
        if st.phase == "Failed":
            failed = failed or st
            doomed.add(st.name)
        elif lost and st.phase == "Pending":
            doomed.add(st.name)
        if child is not None and child.state == "Interrupted" and st.phase == "Pending":
            interrupted = st
        _variant(st, run)
        phases[st.name] = st.phase
        stages.append(st)

    if lacking:  # the Secrets stages would read, read by the shell before it starts any (secret_refs.missing)
        _hold(startable, stages, lacking, prior, actions, events)
    else:
        _start(run, startable, stages, slots, now, actions, events)
    status = promotion.apply(run, _run_status(run, old, stages, failed, interrupted, edited, generation, now), old,
                             now, generation)  # spec.promote: the decision once every stage succeeded
    if retrying:
        status.retry_request = retry
    hung = [f"stage {s.name}: {s.last_restart}" for s in status.stages if s.last_restart]
    if hung:  # the last restart for a hang, naming the rank(s) that stopped when known
        status.conditions.append(condition(old.conditions, "Restarted", "True", "Hang", "; ".join(hung), now, generation))
    degraded = [f"stage {s.name}: {w}" for s in status.stages for w in s.warnings]
    if degraded or any(c.type == "Degraded" for c in old.conditions):
        status.conditions.append(condition(
            old.conditions, "Degraded", "True" if degraded else "False", "LearningNothing" if degraded else "Learning",
            "; ".join(degraded), now, generation))
    if status.phase != old.phase and status.phase in FINISHED:
        events.append(Event("Normal" if status.phase == "Succeeded" else "Warning", f"Run{status.phase}",
                            f"run {status.phase.lower()}: {status.progress} stages succeeded"
                            + (f"; {status.promotion.message}" if status.promotion else "")
                            + (f"; model {status.model}" if status.phase == "Succeeded" and status.model else "")))
    ttl = run.spec.ttl_seconds_after_finished
    if status.phase in FINISHED and ttl is not None and status.completion_time:
        left = (_ts(status.completion_time) + timedelta(seconds=ttl) - _ts(now)).total_seconds()
        actions.append(DeleteChildren() if left <= 0 else RequeueAfter(left))
    return Outcome(status=status, actions=actions + events)


def _variant(st: StageStatus, run: AlignmentRun) -> None:
    """A stage expanded from a matrix (or an eval of several stages) says what it is a variant of."""
    of = run.expansion.get(st.name)
    st.variant_of, st.matrix = (of.of, dict(of.values) or None) if of is not None else (None, None)


def limit(run: AlignmentRun, slots: int | None) -> int | None:
    """How many stages may run at once: spec.parallelism and the shell's slots, whichever is less."""
    bounds = [n for n in (run.spec.parallelism, slots) if n is not None]
    return min(bounds) if bounds else None


def _start(run: AlignmentRun, startable: list[tuple[int, StageStatus]], stages: list[StageStatus],
           slots: int | None, now: str, actions: list[Action], events: list[Action]) -> None:
    """Start the stages whose inputs succeeded, in spec order, while fewer than the limit run; the
    others wait for a free slot (reason WaitingForSlot)."""
    cap = limit(run, slots)
    running = [s.name for s in stages if s.phase in ("Running", "Suspended")]
    suspend = run.spec.suspend or bool(run.spec.queue_name)
    for i, st in startable:
        if cap is not None and len(running) >= cap:
            st.message = (f"waiting for a free slot: {len(running)} of at most {cap} stages run at once "
                          f"({', '.join(running)})")
            st.reason = "WaitingForSlot"
            continue
        spec = run.spec.stages[i]
        actions.append(CreateStage(i, suspend=suspend))
        st.phase = "Suspended" if run.spec.suspend else "Running"
        st.start_time, st.message, st.reason = now, None, None
        if not st.attempt_spec:  # a restarted group or an interrupted stage goes on with what it ran
            st.attempt_spec = attempt_spec(run, i)
        st.spec_hash = spec_hash(st.attempt_spec)
        # Recorded now, not when the child is first seen: one status write per transition.
        st.job_name, st.attempts = child_name(run, spec.name), st.previous_attempts + 1
        st.gpus = stage_gpus(run, spec.name)
        running.append(st.name)
        events.append(Event("Normal", "StageStarted", f"stage {spec.name} ({spec.method}) started"))


def _hold(startable: list[tuple[int, StageStatus]], stages: list[StageStatus], lacking: dict[str, list[str]],
          prior: dict[str, StageStatus], actions: list[Action], events: list[Action]) -> None:
    """A Secret a stage of the run reads is missing: no stage starts (no GPU is spent on stages whose
    successor could not start), the ones that could start say what is missing for the whole run, each
    lacking stage what it lacks; looked at again in SECRET_POLL seconds, as nothing watches Secrets."""
    readers: dict[str, list[str]] = {}  # each missing thing once, with the stages that read it
    for name, lines in lacking.items():
        for line in lines:
            readers.setdefault(line, []).append(name)
    everything = "; ".join(f"stage{'s' * (len(n) > 1)} {', '.join(n)}: {line}" for line, n in readers.items())
    holding = {st.name for _, st in startable}
    for _, st in startable:
        st.reason, st.message = "SecretMissing", f"waiting for Secrets before any stage starts: {everything}"
        if st.message != getattr(prior.get(st.name), "message", None):  # one Event per change
            events.append(Event("Warning", "SecretMissing", f"stage {st.name}: {st.message}"))
    for st in stages:
        if st.name in lacking and st.name not in holding and st.phase == "Pending":
            st.reason, st.message = "SecretMissing", "waiting: " + "; ".join(lacking[st.name])
    actions.append(RequeueAfter(SECRET_POLL))


def stage_gpus(run: AlignmentRun, stage: str) -> int:
    """The accelerators a stage's attempt holds: nodes x gpusPerNode (0: CPU only)."""
    r = next(s.resources for s in run.spec.stages if s.name == stage)
    return r.nodes * r.gpus_per_node


def _end_attempt(st: StageStatus, run: AlignmentRun, child: ObservedChild | None, now: str) -> None:
    """An attempt ended (finished, failed, interrupted, restarted as a group, or its child vanished):
    its wall time, and GPUs x that, are added to the stage's."""
    if not st.start_time:
        return
    end = (child.finished if child is not None else None) or now
    wall = max(0.0, (_ts(end) - _ts(st.start_time)).total_seconds())
    gpus = child.gpus if child is not None and child.gpus is not None else \
        st.gpus if st.gpus is not None else stage_gpus(run, st.name)
    st.gpus = gpus
    st.wall_seconds = round(st.wall_seconds + wall, 3)
    st.gpu_seconds = round(st.gpu_seconds + wall * gpus, 3)


def _note_learning(st: StageStatus, run: AlignmentRun, events: list[Action]) -> None:
    """The stage's warnings from its last progress report: what it fails to learn; a Warning Event when new."""
    guards = next((s.guards for s in run.spec.stages if s.name == st.name), None)
    learning = learning_warnings(st.progress, guards)
    if [w for w in learning if w not in st.warnings]:
        events.append(Event("Warning", "Degraded", f"stage {st.name}: {'; '.join(learning)}"))
    st.warnings = learning


def _fold_child(st: StageStatus, child: ObservedChild, run: AlignmentRun, now: str,
                actions: list[Action], events: list[Action]) -> None:
    """Fold what a running stage's child says into the stage's status."""
    st.job_name = child.name
    st.create_refusals, st.last_refusal_time = 0, None  # it exists: refusals in a row start again
    st.attempts = max(st.attempts, st.previous_attempts + child.attempts)
    st.start_time = st.start_time or child.created or now
    st.spec_hash = st.spec_hash or child.spec_hash
    if child.state in ("Succeeded", "Failed", "Interrupted"):  # the attempt ended (a restart below too)
        _end_attempt(st, run, child, now)
    if child.state == "Succeeded":
        st.phase = "Succeeded"
        st.completion_time = child.finished or now
        st.checkpoint = (child.result or {}).get("checkpoint", st.checkpoint)
        st.metrics = _metrics(child.result)
        st.progress = completed(st.progress, st.metrics.get("global_step"))
        st.tracking = {k: str(v) for k, v in ((child.result or {}).get("tracking") or {}).items()
                       if k in ("tensorboard", "wandb", "mlflow")}
        st.message, st.reason = None, None
        if child.result is None:  # its Job says done, but no pod of it was seen saying what it made
            st.message = (f"{child.kind} {child.name} succeeded, but no trainer result was read from its pods: "
                          "the stage's metrics and checkpoint are not recorded")
            events.append(Event("Warning", "StageResultMissing", st.message))
        events.append(Event("Normal", "StageSucceeded", f"stage {st.name} succeeded: {_brief(st.metrics)}"))
        _note_learning(st, run, events)  # a short stage may end before a running look saw its last report
        return
    if child.disruptions > st.disruptions:  # a pod disrupted and replaced by its Job: counted here, traced
        st.disruptions = child.disruptions
        cost = charge_lost_work(st)
        st.last_disruption = f"{child.disruption}; {cost}"
        st.progress = None  # the new pod loads and resumes before it reports: no hang clock until it does
        if _too_disrupted(st, run, child.disruption, events):
            st.completion_time = now
            _end_attempt(st, run, None, now)
            actions.append(DeleteChild(st.name, child.name, child.kind, child.uid))  # its new pod runs on
            return
        events.append(Event("Warning", "StageDisrupted", f"stage {st.name}: {child.disruption}; disruption "
                            f"{st.disruptions} of at most {_max_disruptions(run, st.name)}, not counted against "
                            f"backoffLimit: the new pod resumes from the newest checkpoint ({cost})"))
    if child.state == "Failed" and child.failure == "hang":  # the local shell stopped a hung stage
        _hung(st, child, run, now, actions, events, child.message or "Hang")
        return
    if child.state == "Failed" and child.group and child.failure == "disruption":
        st.disruptions += 1
        if _too_disrupted(st, run, child.message, events):
            st.completion_time = child.finished or now
            return
    if child.state == "Failed" and child.group and child.failure != "input":
        counted = child.failure != "disruption"
        if not counted or st.restarts < spec_backoff(run, st.name):
            # Every rank again from the newest checkpoint, never one rank alone: the failed child
            # goes first (the retry path below), then a new one starts.
            st.restarts += counted
            cost = charge_lost_work(st)
            if not counted:
                st.last_disruption = f"{child.message}; {cost}"
            st.phase, st.previous_attempts = "Pending", st.attempts
            why = f"restart {st.restarts} of {spec_backoff(run, st.name)}" if counted else \
                f"disruption {st.disruptions} of at most {_max_disruptions(run, st.name)}, not counted"
            st.message = f"restarting every rank ({why}; {cost}): {child.message}"
            events.append(Event("Warning", "GroupRestart", f"stage {st.name}: {st.message}"))
            return
    if child.state == "Failed":
        st.phase = "Failed"
        st.completion_time = child.finished or now
        st.message = child.message or "the stage's Job failed"
        st.reason = outcome.reason_of(st.message)  # the trainer's kind of failure (DataError, WorldSizeMismatch, ...)
        events.append(Event("Warning", "StageFailed", f"stage {st.name} failed: {st.message}"))
        return
    if child.state == "Interrupted":
        st.phase, st.completion_time = "Pending", None
        st.previous_attempts = st.attempts
        st.message = f"interrupted ({child.message or 'stopped'})"
        events.append(Event("Warning", "StageInterrupted", f"stage {st.name} {st.message}"))
        return
    suspend, queued = run.spec.suspend, bool(run.spec.queue_name)
    # With Kueue the queue unsuspends admitted Jobs; the operator only ever suspends them.
    if suspend != child.suspended and (suspend or not queued):
        actions.append(SetSuspend(st.name, child.name, child.kind, suspend))
        events.append(Event("Normal", "Suspended" if suspend else "Resumed",
                            f"stage {st.name} {'suspended' if suspend else 'resumed'}"))
    waiting_for_queue = child.suspended and queued and not suspend
    st.phase = "Suspended" if suspend or waiting_for_queue else "Running"
    note_checkpoint(st, stage_dir(run.spec.storage.mount_path, run, st.name))
    _note_learning(st, run, events)
    st.message = f"waiting for Kueue to admit it (queue {run.spec.queue_name})" if waiting_for_queue else None
    said, st.reason = st.reason, None
    if st.phase == "Running" and not child.suspended and (not child.started or child.waiting):
        _not_started(st, child, run, now, actions, events, said)
    elif st.phase == "Running" and child.state == "Running" and not child.suspended:
        _watch_hang(st, child, run, now, actions, events)


def _watch_hang(st: StageStatus, child: ObservedChild, run: AlignmentRun, now: str,
                actions: list[Action], events: list[Action]) -> None:
    """A running stage whose attempt reported before but no step and no heartbeat since its hang timeout
    (health.silent_for), or one of whose ranks sent no alive beat that long while the others went on
    (health.rank_silent_for), is hung: restarted as a group; otherwise looked at again when either is due."""
    waited = silent_for(st, _ts(now))
    if waited is None:
        return  # nothing reported yet: loading, reference precompute (startDeadlineSeconds covers not starting)
    own = next((s.hang_timeout_seconds for s in run.spec.stages if s.name == st.name), None)
    timeout = hang_timeout(st, own)
    quiet = rank_silent_for(st, _ts(now))
    rank_timeout = max(timeout, RANK_STALE_S)  # a beat reaches status within ~10 s: never sooner than that
    due = min(timeout - waited, rank_timeout - quiet if quiet is not None else math.inf)
    if due > 0:
        actions.append(RequeueAfter(due + 1))
        return
    stopped, beating = stopped_ranks(st, _ts(now), timeout)  # the local shell reads process states instead
    if child.stopped or waited >= timeout:
        words = hang_words(st, waited, timeout, list(child.stopped) or stopped, [] if child.stopped else beating)
    else:  # the stage reports (rank 0 between steps, waiting on the quiet rank in a collective): a rank stopped
        words = hang_words(st, quiet, rank_timeout, stopped, beating, from_ranks=True)
    _hung(st, child, run, now, actions, events, words)


def _hung(st: StageStatus, child: ObservedChild, run: AlignmentRun, now: str,
          actions: list[Action], events: list[Action], words: str) -> None:
    """A hung stage: every rank again from the newest complete checkpoint (its child deleted first, counted in
    restarts against backoffLimit), reason Hang and a Warning Event Hang; past backoffLimit it fails, reason Hang."""
    limit = spec_backoff(run, st.name)
    cost = charge_lost_work(st)
    actions.append(DeleteChild(st.name, child.name, child.kind, child.uid))  # (a stopped one too: gone first)
    if st.restarts >= limit:
        st.phase, st.completion_time, st.reason = "Failed", now, "Hang"
        st.message = f"{words}; not restarted: {st.restarts} restart(s) already (backoffLimit {limit})"
        events.append(Event("Warning", "StageFailed", f"stage {st.name} failed: {st.message}"))
        return
    st.restarts += 1
    st.restart_reasons["Hang"] = st.restart_reasons.get("Hang", 0) + 1
    st.phase, st.previous_attempts, st.reason = "Pending", st.attempts, "Hang"
    st.message = f"{words}; restarting every rank from the newest checkpoint (restart {st.restarts} of {limit}; {cost})"
    st.last_restart = st.message
    events.append(Event("Warning", "Hang", f"stage {st.name}: {st.message}"))


def start_deadline(run: AlignmentRun, stage: str) -> int | None:
    """stages[].startDeadlineSeconds, else spec.startDeadlineSeconds (None: no deadline)."""
    own = next(s.start_deadline_seconds for s in run.spec.stages if s.name == stage)
    return own if own is not None else run.spec.start_deadline_seconds


def _not_started(st: StageStatus, child: ObservedChild, run: AlignmentRun, now: str,
                 actions: list[Action], events: list[Action], said: str | None) -> None:
    """A running stage whose pods have not started (or whose new pod cannot): its message and reason say
    why (when the pods or the Job say), and if it never started, past startDeadlineSeconds the stage
    fails with that cause. The child is deleted then, so its pods give back what they hold (a pod that
    cannot pull its image holds its GPUs)."""
    cause = child.waiting
    deadline = start_deadline(run, st.name) if not child.started else None
    since = child.since or child.created or st.start_time or now
    waited = (_ts(now) - _ts(since)).total_seconds()
    if deadline is not None and waited >= deadline:
        why = cause.message if cause else "no pod of it started, and none said why"
        st.phase, st.completion_time, st.reason = "Failed", now, "StartDeadlineExceeded"
        _end_attempt(st, run, None, now)  # what it held while it could not start
        st.message = f"not started within startDeadlineSeconds ({deadline}s): {why}"
        actions.append(DeleteChild(st.name, child.name, child.kind, child.uid))
        events.append(Event("Warning", "StartDeadlineExceeded", f"stage {st.name}: {st.message}"))
        return
    if deadline is not None:
        actions.append(RequeueAfter(deadline - waited))  # to fail it on time, whatever else happens
    if cause is None:
        # Being scheduled, pulling, creating containers: nothing wrong said yet. Look again soon: a Job
        # that cannot create its pods says so only in Events, which nothing watches.
        actions.append(RequeueAfter(NOT_STARTED_POLL))
        return
    st.reason = cause.reason
    if cause.reason != said:  # one Event per cause, not one per pod update
        events.append(Event("Warning", "StageWaiting", f"stage {st.name}: {cause.message}"))
    st.message = f"waiting: {cause.message}" + (
        f" (the stage fails if it has not started {deadline}s after {since}: startDeadlineSeconds)"
        if deadline is not None else "")


def _refused(st: StageStatus, refusal: Refusal, now: str, actions: list[Action], events: list[Action]) -> None:
    """The API server refused to create one of the stage's children, so none of it runs: try again
    after a backoff, CREATE_TRIES times in a row at most, then fail the stage with the server's words
    (one Warning Event). The tries before that are in the stage's message (and the shell's log)."""
    if st.phase != "Pending":  # its Job vanished and the new one was refused: the next create counts on
        st.previous_attempts = st.attempts
    what = f"the API server refused to create {refusal.kind} {refusal.name} ({refusal.code} {refusal.reason})"
    server = clip(refusal.message, SERVER_MESSAGE_LIMIT)
    if refusal.going:  # what is in the way is going away: wait for it, counting nothing
        st.phase, st.completion_time, st.reason = "Pending", None, "WaitingForDeletion"
        st.message = f"{server}; trying again in {REFUSAL_BACKOFF:g}s"
        actions.append(RequeueAfter(REFUSAL_BACKOFF))
        return
    st.create_refusals += 1
    st.last_refusal_time = now
    if st.create_refusals >= CREATE_TRIES:
        st.phase, st.completion_time, st.reason = "Failed", now, "ChildRefused"
        st.message = f"{what} {st.create_refusals} times: {server}"
        events.append(Event("Warning", "ChildRefused", f"stage {st.name}: {st.message}"))
        return
    wait = refusal_backoff(st.create_refusals)
    st.phase, st.completion_time = "Pending", None
    st.message = f"{what}: {server}; trying again in {wait:g}s (try {st.create_refusals} of {CREATE_TRIES})"
    actions.append(RequeueAfter(wait))


def refusal_backoff(refusals: int) -> float:
    """Seconds to wait after the n-th refusal in a row: 5, 10, 20, ..."""
    return REFUSAL_BACKOFF * 2 ** (refusals - 1)


def refusal_wait(st: StageStatus, now: str) -> float:
    """Seconds left before a refused stage may try to create its children again (0: now)."""
    if not st.create_refusals or not st.last_refusal_time:
        return 0.0
    due = _ts(st.last_refusal_time) + timedelta(seconds=refusal_backoff(st.create_refusals))
    return max(0.0, (due - _ts(now)).total_seconds())


def clip(text: str, limit: int) -> str:
    """One line of at most `limit` characters (the server's messages can list many fields)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _max_disruptions(run: AlignmentRun, stage: str) -> int:
    return next(s.max_disruptions for s in run.spec.stages if s.name == stage)


def _too_disrupted(st: StageStatus, run: AlignmentRun, words: str | None, events: list[Action]) -> bool:
    """More disruptions than the stage's maxDisruptions: it fails (one Warning Event) instead of going on."""
    limit = _max_disruptions(run, st.name)
    if st.disruptions <= limit:
        return False
    st.phase, st.reason = "Failed", "TooManyDisruptions"
    st.message = (f"disrupted {st.disruptions} times (preemption, eviction, node drain), more than maxDisruptions "
                  f"({limit}); the last: {words or 'no message'}")
    events.append(Event("Warning", "StageFailed", f"stage {st.name} failed: {st.message}"))
    return True


def spec_backoff(run: AlignmentRun, stage: str) -> int:
    return next(s.backoff_limit for s in run.spec.stages if s.name == stage)


def _brief(metrics: dict[str, float]) -> str:
    keys = ("train_loss", "eval_loss", "eval_rewards/accuracies", "rewards/accuracies",
            "completions", "mean_reward", "pairs", "desirable", "preference_accuracy")  # generate, label, eval
    shown = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics]
    return ", ".join(shown) or "no metrics reported"


def _run_status(run: AlignmentRun, old: AlignmentRunStatus, stages: list[StageStatus],
                failed: StageStatus | None, interrupted: StageStatus | None, edited: list[str],
                generation: int | None, now: str) -> AlignmentRunStatus:
    """The run's status from its stages' (phase, conditions, model, evaluation)."""
    done = sum(s.phase == "Succeeded" for s in stages)
    active = [s for s in stages if s.phase in ("Running", "Suspended")]
    # What can still run: a running stage, or a pending one not stopped by a failed input.
    going = active or any(s.phase == "Pending" and s.reason != "InputFailed" for s in stages)
    current = next((s for s in stages if s.phase in ("Running", "Suspended")), None) \
        or (failed if failed is not None and not going else None) \
        or next((s for s in stages if s.phase != "Succeeded"), stages[-1])
    if failed is not None and not going:
        phase = "Failed"  # its siblings finished: nothing else can run until it is fixed and retried
    elif failed is not None:
        phase = "Suspended" if run.spec.suspend and all(s.phase == "Suspended" for s in active) else "Running"
    elif done == len(stages):
        phase = "Succeeded"
    elif current.phase == "Suspended":
        phase = "Suspended"
    elif any(s.phase in ("Running",) for s in stages):
        phase = "Running"
    else:
        phase = "Pending"
    model = next((s.checkpoint for s, spec in zip(reversed(stages), reversed(run.spec.stages))
                  if METHODS[spec.method].trains and s.phase == "Succeeded" and s.checkpoint), None)
    evaluation = dict(old.evaluation)
    for s, spec in zip(stages, run.spec.stages):
        if spec.method == "eval" and s.phase == "Succeeded":
            evaluation = {"stage": s.name, **s.metrics}
    rows = comparison(run, stages)
    best = next((r for r in rows if r.best), None)
    if best is not None:  # a sweep's model is its best variant's, its evaluation that variant's
        model = next((s.checkpoint for s in stages if s.name == best.stage and s.checkpoint), model)
        evaluation = {"stage": best.eval_stage, **best.metrics}
    finished = phase in ("Succeeded", "Failed")
    if failed is not None:  # every failed stage, named
        failed = failed.model_copy(update={"name": ", ".join(s.name for s in stages if s.phase == "Failed")})
    why = failed and (failed.reason or ("ChildRefused" if failed.create_refusals >= CREATE_TRIES else "StageFailed"))
    # A stage that waits on something the user must see (pods that cannot start, a refused or blocked
    # create, a child being deleted) names it in Reconciling, reason and words.
    waits = not finished and not interrupted and (current.reason or current.create_refusals) and current.message
    # Waiting for Kueue counts as work left; a suspension the user asked for does not.
    reconciling = phase in ("Pending", "Running") and not interrupted or (phase == "Suspended" and not run.spec.suspend)
    conditions = [
        condition(old.conditions, "Ready", "True" if phase == "Succeeded" else "False",
                   "RunSucceeded" if phase == "Succeeded" else phase, f"{done}/{len(stages)} stages succeeded",
                   now, generation),
        # kstatus (Flux, kpt, Config Sync): Reconciling=True while the operator has work left,
        # Stalled=True when the run cannot go on; a suspended run is neither (it waits for its user).
        condition(old.conditions, "Reconciling", "True" if reconciling else "False",
                   f"Run{phase}" if finished else "Interrupted" if interrupted
                   else (current.reason or f"Stage{current.phase}") if waits else f"Stage{current.phase}",
                   f"stage {interrupted.name}: {interrupted.message}" if interrupted
                   else f"stage {current.name} is {current.phase.lower()}" + (f": {current.message}" if waits else ""),
                   now, generation),
        condition(old.conditions, "Stalled", "True" if failed and finished else "False",
                   why if failed and finished else "NotStalled",
                   f"stage {failed.name} failed; fix it and retry (alignment.dev/retry)" if failed and finished
                   else f"stage {failed.name} failed; stages that do not read it go on" if failed else "",
                   now, generation),
        condition(old.conditions, "Failed", "True" if failed else "False",
                   why if failed else "NoFailure",
                   f"stage {failed.name}: {failed.message}" if failed else "", now, generation),
    ]
    if edited:
        conditions.append(condition(
            old.conditions, "SpecRejected", "True", "StageAlreadyRan",
            f"edits to stage(s) {', '.join(edited)} are not applied: they already ran. Revert the "
            f"edit, or create a new AlignmentRun (its model.source can point at a stage's final/)",
            now, generation))
    return AlignmentRunStatus(
        phase=phase,
        current_stage=current.name,
        progress=f"{done}/{len(stages)}",
        progress_summary=progress_summary(stages, done),
        stages=stages,
        model=model,
        evaluation=evaluation,
        conditions=conditions,
        observed_generation=generation,
        retry_request=old.retry_request,
        start_time=old.start_time or next((s.start_time for s in stages if s.start_time), None),
        completion_time=(old.completion_time or now) if finished else None,
        gpu_seconds=round(sum(s.gpu_seconds for s in stages), 3),
        gpu_hours=round(sum(s.gpu_seconds for s in stages) / 3600, 2),
        comparison=rows,
    )


def _lower_is_better(metric: str) -> bool:
    return any(w in metric for w in ("loss", "perplexity", "ppl", "seconds"))


def comparison(run: AlignmentRun, stages: list[StageStatus]) -> list[ComparisonRow]:
    """status.comparison: one row per stage an eval of several evaluated (the expanded eval entries),
    each eval's rows best first by its compareBy metric (rows without it last), the best marked."""
    by_name = {s.name: s for s in stages}
    groups: dict[str, list[ComparisonRow]] = {}
    for st, spec in zip(stages, run.spec.stages):
        of = run.expansion.get(st.name)
        if spec.method != "eval" or of is None or not of.evaluates:
            continue
        trained = by_name.get(of.evaluates)
        groups.setdefault(of.of, []).append(ComparisonRow(
            stage=of.evaluates, eval_stage=st.name, matrix=dict(trained.matrix or {}) if trained else {},
            metrics=dict(st.metrics) if st.phase == "Succeeded" else {},
            gpu_seconds=trained.gpu_seconds if trained else 0.0, gpus=trained.gpus if trained else None))
    rows: list[ComparisonRow] = []
    for eval_name, group in groups.items():
        metric = promotion.compare_metric(run, group[0].eval_stage)
        sign = 1 if _lower_is_better(metric) else -1
        group.sort(key=lambda r: (metric not in r.metrics, sign * r.metrics.get(metric, 0.0)))
        if group and metric in group[0].metrics:
            group[0].best = True
        rows += group
    return rows
