"""The operator's state machine as tables: observed state in, status and actions out."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alignment_operator.api import AlignmentRunStatus, StageStatus, parse_run
from alignment_operator.reconcile import (
    CreateStage, DeleteChildren, Event, ObservedChild, RequeueAfter, SetSuspend, reconcile, stage_hash,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = "2026-11-21T12:00:00Z"
SFT_RESULT = {"method": "sft", "checkpoint": "/workspace/default/tiny/sft/final", "train_loss": 1.25, "eval_loss": 1.5}


def make_run(status: dict | None = None, **spec_overrides):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"].update(namespace="default", uid="u-1", generation=1)
    doc["spec"].update(spec_overrides)
    if status is not None:
        doc["status"] = status
    return parse_run(doc)


def status_after(outcome) -> dict:
    """Feed a pass's status back, as the API server would store it."""
    return outcome.status.wire()


def sft_running(run) -> dict:
    return AlignmentRunStatus(phase="Running", stages=[
        StageStatus(name="sft", phase="Running", job_name="tiny-sft", spec_hash=stage_hash(run, 0), start_time=NOW),
        StageStatus(name="dpo"), StageStatus(name="eval")]).wire()


def child(stage, state, **kw) -> ObservedChild:
    return ObservedChild(stage=stage, name=f"tiny-{stage}", state=state, **kw)


def kinds(actions) -> list:
    return [type(a).__name__ for a in actions]


def events(actions) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Event)]


def test_new_run_creates_the_first_stage_only():
    out = reconcile(make_run(), 1, {}, NOW)
    assert [a for a in out.actions if isinstance(a, CreateStage)] == [CreateStage(0, suspend=False)]
    assert events(out.actions) == ["StageStarted"]
    s = out.status
    assert (s.phase, s.current_stage, s.progress) == ("Running", "sft", "0/3")
    assert [x.phase for x in s.stages] == ["Running", "Pending", "Pending"]
    assert s.observed_generation == 1
    assert {c.type: c.status for c in s.conditions} == {"Ready": "False", "Reconciling": "True", "Stalled": "False", "Failed": "False"}


@pytest.mark.parametrize("observed, phase, actions, evts", [
    # operator restarted mid-stage: the Job is there and running -> nothing created, nothing announced
    ({"sft": child("sft", "Running", attempts=1)}, "Running", [], []),
    # the Job was deleted by hand -> recreated (the trainer resumes from its checkpoint)
    ({}, "Running", ["CreateStage"], ["JobRecreated"]),
    # SFT finished -> its metrics recorded and DPO started
    ({"sft": child("sft", "Succeeded", attempts=1, result=SFT_RESULT, finished=NOW)}, "Running",
     ["CreateStage"], ["StageSucceeded", "StageStarted"]),
    # SFT failed -> the run fails with the pod's words, nothing else starts
    ({"sft": child("sft", "Failed", attempts=3, message="Error (exit code 1): dataset examples/data/sft.jsonl: "
                   "line 3: missing column 'messages'")}, "Failed", [], ["StageFailed", "RunFailed"]),
])
def test_transitions_from_a_running_sft_stage(observed, phase, actions, evts):
    run = make_run()
    run = make_run(status=sft_running(run))
    out = reconcile(run, 1, observed, NOW)
    assert out.status.phase == phase
    assert kinds([a for a in out.actions if not isinstance(a, Event)]) == actions
    assert events(out.actions) == evts


def test_success_records_checkpoint_and_metrics_and_starts_dpo():
    run = make_run()
    run = make_run(status=sft_running(run))
    out = reconcile(run, 1, {"sft": child("sft", "Succeeded", attempts=1, result=SFT_RESULT, finished=NOW)}, NOW)
    sft, dpo = out.status.stages[:2]
    assert sft.checkpoint == SFT_RESULT["checkpoint"] and sft.metrics == {"train_loss": 1.25, "eval_loss": 1.5}
    assert sft.completion_time == NOW
    assert CreateStage(1, suspend=False) in out.actions and dpo.phase == "Running"
    assert out.status.progress == "1/3" and out.status.current_stage == "dpo"
    assert out.status.model == SFT_RESULT["checkpoint"]
    assert sft.message is None and "StageResultMissing" not in events(out.actions)


def test_a_success_whose_result_was_never_read_says_so():
    """A child done whose pods were never seen (a JobSet's pods through Jobs the operator did not
    watch): the stage still succeeds, as its Job says, but not silently without metrics."""
    run = make_run()
    run = make_run(status=sft_running(run))
    out = reconcile(run, 1, {"sft": child("sft", "Succeeded", attempts=1, finished=NOW)}, NOW)
    sft = out.status.stages[0]
    assert sft.phase == "Succeeded" and sft.metrics in (None, {})
    assert "no trainer result was read" in sft.message
    assert events(out.actions)[:2] == ["StageResultMissing", "StageSucceeded"]


def test_failure_message_reaches_stage_and_condition():
    run = make_run()
    run = make_run(status=sft_running(run))
    msg = "Error (exit code 1): dataset examples/data/sft.jsonl: row 3: missing column 'messages'"
    out = reconcile(run, 1, {"sft": child("sft", "Failed", message=msg)}, NOW)
    assert out.status.stages[0].message == msg
    failed = next(c for c in out.status.conditions if c.type == "Failed")
    assert failed.status == "True" and "missing column 'messages'" in failed.message
    # Reconciling the failed run again changes nothing and announces nothing.
    again = reconcile(make_run(status=status_after(out)), 1, {"sft": child("sft", "Failed", message=msg)}, NOW)
    assert again.actions == [] and again.status == out.status


def test_whole_pipeline_to_succeeded_then_idempotent():
    run = make_run()
    observed: dict = {}
    status = None
    results = {"sft": SFT_RESULT, "dpo": {"checkpoint": "/w/dpo/final", "metrics": {"rewards/accuracies": 0.9}},
               "eval": {"checkpoint": "/w/dpo/final", "metrics": {"preference_accuracy": 0.92, "perplexity": 3.1}}}
    created = []
    for _ in range(10):
        out = reconcile(make_run(status=status), 1, observed, NOW)
        status = status_after(out)
        for a in out.actions:
            if isinstance(a, CreateStage):
                name = run.spec.stages[a.index].name
                created.append(name)
                observed[name] = child(name, "Succeeded", result=results[name], finished=NOW)
        if out.status.phase == "Succeeded":
            break
    assert created == ["sft", "dpo", "eval"]
    s = out.status
    assert (s.phase, s.progress, s.model) == ("Succeeded", "3/3", "/w/dpo/final")
    assert s.evaluation == {"stage": "eval", "preference_accuracy": 0.92, "perplexity": 3.1}
    assert "RunSucceeded" in events(out.actions)
    assert {c.type: c.status for c in s.conditions}["Ready"] == "True"
    # Restarted operator, everything done: no action at all, same status.
    final = reconcile(make_run(status=status), 1, observed, NOW)
    assert final.actions == [] and final.status.wire() == status


def test_suspend_and_resume_the_running_job():
    run = make_run()
    running = sft_running(run)
    out = reconcile(make_run(status=running, suspend=True), 2, {"sft": child("sft", "Running")}, NOW)
    assert SetSuspend("sft", "tiny-sft", "Job", True) in out.actions
    assert out.status.phase == "Suspended" and out.status.stages[0].phase == "Suspended"
    # The Job is now suspended; unsuspending the run resumes it.
    out = reconcile(make_run(status=status_after(out), suspend=False), 3,
                    {"sft": child("sft", "Suspended", suspended=True)}, NOW)
    assert SetSuspend("sft", "tiny-sft", "Job", False) in out.actions
    assert out.status.phase == "Running"


def test_new_run_created_suspended_and_kueue_is_left_to_admit():
    out = reconcile(make_run(suspend=True), 1, {}, NOW)
    assert CreateStage(0, suspend=True) in out.actions and out.status.phase == "Suspended"
    queued = make_run(queueName="gpu-queue")
    out = reconcile(queued, 1, {}, NOW)
    assert CreateStage(0, suspend=True) in out.actions, "Kueue admits by unsuspending"
    out = reconcile(make_run(status=status_after(out), queueName="gpu-queue"), 1,
                    {"sft": child("sft", "Suspended", suspended=True)}, NOW)
    assert not any(isinstance(a, SetSuspend) for a in out.actions), "never unsuspend what Kueue holds"
    assert "Kueue" in out.status.stages[0].message


def test_editing_a_stage_that_ran_is_refused_with_a_condition():
    run = make_run()
    status = sft_running(run)
    doc_stages = [s.wire() for s in run.spec.stages]
    doc_stages[0]["training"]["learningRate"] = 0.5
    out = reconcile(make_run(status=status, stages=doc_stages), 2, {"sft": child("sft", "Running")}, NOW)
    cond = next(c for c in out.status.conditions if c.type == "SpecRejected")
    assert cond.status == "True" and cond.reason == "StageAlreadyRan" and "sft" in cond.message
    assert not any(isinstance(a, CreateStage) for a in out.actions)
    # Editing a stage that has not run yet is fine.
    doc_stages = [s.wire() for s in run.spec.stages]
    doc_stages[1]["training"]["beta"] = 0.2
    out = reconcile(make_run(status=status, stages=doc_stages), 2, {"sft": child("sft", "Running")}, NOW)
    assert not any(c.type == "SpecRejected" for c in out.status.conditions)


def test_ttl_deletes_children_after_the_run_finished():
    done = AlignmentRunStatus(phase="Succeeded", progress="3/3", completion_time="2026-11-21T11:59:00Z", stages=[
        StageStatus(name=n, phase="Succeeded") for n in ("sft", "dpo", "eval")]).wire()
    out = reconcile(make_run(status=done, ttlSecondsAfterFinished=600), 1, {}, NOW)
    assert out.actions == [RequeueAfter(540.0)]
    out = reconcile(make_run(status=done, ttlSecondsAfterFinished=30), 1, {}, NOW)
    assert out.actions == [DeleteChildren()]
    assert reconcile(make_run(status=done), 1, {}, NOW).actions == [], "no ttl: children stay"


def test_condition_transition_time_moves_only_on_flips():
    first = reconcile(make_run(), 1, {}, "2026-11-21T10:00:00Z")
    later = reconcile(make_run(status=status_after(first)), 1, {"sft": child("sft", "Running")}, "2026-11-21T11:00:00Z")
    prog = next(c for c in later.status.conditions if c.type == "Reconciling")
    assert prog.last_transition_time == "2026-11-21T10:00:00Z"
