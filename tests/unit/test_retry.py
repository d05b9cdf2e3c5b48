"""Retry and interrupt as reconcile transitions, with what each shell feeds in: the cluster shell
observes the failed Job still there; the local shell observes nothing (its children are gone)."""

from __future__ import annotations

import pytest

from alignment_operator.api import RETRY_ANNOTATION, AlignmentRunStatus, StageStatus
from alignment_operator.reconcile import CreateStage, DeleteChild, Event, ObservedChild, reconcile, stage_hash

from test_reconcile import NOW, SFT_RESULT, make_run

DATA_ERROR = "DataError (exit code 2): dataset prefs.jsonl split train: line 1: column 'rejected' is missing"


def failed_at_dpo(run, attempts: int = 3) -> dict:
    return AlignmentRunStatus(phase="Failed", completion_time=NOW, stages=[
        StageStatus(name="sft", phase="Succeeded", job_name="tiny-sft", attempts=1, spec_hash=stage_hash(run, 0),
                    checkpoint=SFT_RESULT["checkpoint"], completion_time=NOW),
        StageStatus(name="dpo", phase="Failed", job_name="tiny-dpo", attempts=attempts, spec_hash=stage_hash(run, 1),
                    message=DATA_ERROR, completion_time=NOW),
        StageStatus(name="eval")]).wire()


def with_retry(status: dict, token: str | None):
    run = make_run(status=status)
    if token is not None:
        run.metadata.annotations[RETRY_ANNOTATION] = token
    return run


def dpo_job(state: str, attempts: int) -> dict[str, ObservedChild]:
    return {"sft": ObservedChild("sft", "tiny-sft", "Succeeded", 1, result=SFT_RESULT, finished=NOW),
            "dpo": ObservedChild("dpo", "tiny-dpo", state, attempts, message=DATA_ERROR if state == "Failed" else None)}


def creates(out) -> list[int]:
    return [a.index for a in out.actions if isinstance(a, CreateStage)]


def reasons(out) -> list[str]:
    return [a.reason for a in out.actions if isinstance(a, Event)]


def test_a_failed_run_stays_failed_without_a_retry_request():
    run = make_run()
    out = reconcile(with_retry(failed_at_dpo(run), None), 1, dpo_job("Failed", 3), NOW)
    assert out.status.phase == "Failed" and out.actions == []


@pytest.mark.parametrize("shell, observed", [("cluster", dpo_job("Failed", 3)), ("local", {})])
def test_retry_reruns_only_the_failed_stage_once(shell, observed):
    run = make_run()
    out = reconcile(with_retry(failed_at_dpo(run), "1"), 1, observed, NOW)
    dpo = out.status.stages[1]
    assert reasons(out)[0] == "StageRetried" and out.status.retry_request == "1"
    assert out.status.phase in ("Pending", "Running") and out.status.completion_time is None
    assert {c.type: c.status for c in out.status.conditions}["Failed"] == "False"
    assert 0 not in creates(out), "a succeeded stage is never redone"
    if shell == "cluster":  # the failed Job is deleted first; the next pass (Job gone) creates the new one
        assert [a for a in out.actions if isinstance(a, DeleteChild)] == [DeleteChild("dpo", "tiny-dpo", "Job")]
        assert creates(out) == [] and dpo.phase == "Pending" and "deleting the failed Job tiny-dpo" in dpo.message
        out = reconcile(with_retry(out.status.wire(), "1"), 1, {"sft": observed["sft"]}, NOW)
    assert creates(out) == [1] and out.status.stages[1].phase == "Running"
    assert "StageRetried" not in reasons(out) or shell == "local"

    # The new attempt counts on from the old ones; it fails again: the same token does nothing more.
    again = reconcile(with_retry(out.status.wire(), "1"), 1, dpo_job("Failed", 1), NOW)
    assert again.status.phase == "Failed" and again.status.stages[1].attempts == 4
    after = reconcile(with_retry(again.status.wire(), "1"), 1, dpo_job("Failed", 1), NOW)
    assert after.status.phase == "Failed" and after.actions == []
    # A new value retries again.
    assert "StageRetried" in reasons(reconcile(with_retry(after.status.wire(), "2"), 1, dpo_job("Failed", 1), NOW))


def test_a_retry_request_on_a_healthy_run_is_recorded_and_changes_nothing():
    run = make_run()
    running = AlignmentRunStatus(phase="Running", stages=[
        StageStatus(name="sft", phase="Running", job_name="tiny-sft", attempts=1, spec_hash=stage_hash(run, 0)),
        StageStatus(name="dpo"), StageStatus(name="eval")]).wire()
    out = reconcile(with_retry(running, "x"), 1, {"sft": ObservedChild("sft", "tiny-sft", "Running", 1)}, NOW)
    assert out.actions == [] and out.status.retry_request == "x" and out.status.phase == "Running"


def test_an_interrupted_stage_waits_pending_and_the_next_run_resumes_it():
    run = make_run()
    running = AlignmentRunStatus(phase="Running", stages=[
        StageStatus(name="sft", phase="Succeeded", attempts=1, spec_hash=stage_hash(run, 0),
                    checkpoint=SFT_RESULT["checkpoint"]),
        StageStatus(name="dpo", phase="Running", job_name="tiny-dpo", spec_hash=stage_hash(run, 1)),
        StageStatus(name="eval")]).wire()
    stopped = ObservedChild("dpo", "tiny-dpo", "Interrupted", 1, kind="process",
                            message="SIGINT at step 12/40; run the same command again to resume from checkpoint-10")
    out = reconcile(make_run(status=running), None, {"dpo": stopped}, NOW)
    dpo = out.status.stages[1]
    assert (out.status.phase, dpo.phase, dpo.attempts) == ("Pending", "Pending", 1)
    assert dpo.message.startswith("interrupted (SIGINT at step 12/40") and "StageInterrupted" in reasons(out)
    progressing = next(c for c in out.status.conditions if c.type == "Reconciling")
    assert progressing.reason == "Interrupted" and "checkpoint-10" in progressing.message
    assert creates(out) == []

    # The next `alignctl run --local` (nothing observed) starts it again; attempts count on.
    out = reconcile(make_run(status=out.status.wire()), None, {}, NOW)
    assert creates(out) == [1]
    out = reconcile(make_run(status=out.status.wire()), None,
                    {"dpo": ObservedChild("dpo", "tiny-dpo", "Succeeded", 1, kind="process", result={})}, NOW)
    assert out.status.stages[1].attempts == 2 and out.status.stages[1].phase == "Succeeded"


def two_node_dpo(backoff: int) -> tuple:
    run = make_run()
    stages = [s.wire() for s in run.spec.stages]
    stages[1]["resources"].update(nodes=2)
    stages[1]["backoffLimit"] = backoff
    run = make_run(stages=stages)
    running = AlignmentRunStatus(phase="Running", stages=[
        StageStatus(name="sft", phase="Succeeded", attempts=1, spec_hash=stage_hash(run, 0),
                    checkpoint=SFT_RESULT["checkpoint"]),
        StageStatus(name="dpo", phase="Running", job_name="tiny-dpo", attempts=1, spec_hash=stage_hash(run, 1)),
        StageStatus(name="eval")]).wire()
    return stages, running


def group_failed(kind: str) -> dict[str, ObservedChild]:
    return {"dpo": ObservedChild("dpo", "tiny-dpo", "Failed", 1, group=True, failure=kind,
                                 message="Error (exit code 1): rank 1 lost its NCCL peer")}


@pytest.mark.parametrize("kind, counted", [("disruption", 0), ("failure", 1)])
def test_a_failed_rank_restarts_every_rank_from_the_checkpoint(kind, counted):
    stages, running = two_node_dpo(backoff=1)
    out = reconcile(make_run(status=running, stages=stages), 1, group_failed(kind), NOW)
    dpo = out.status.stages[1]
    assert (out.status.phase, dpo.phase, dpo.restarts) == ("Pending", "Pending", counted)
    assert "GroupRestart" in reasons(out) and "restarting every rank" in dpo.message
    assert {c.type: c.status for c in out.status.conditions}["Failed"] == "False"
    # Next pass: the failed Job (both ranks) is deleted; once gone, a new one starts; attempts count on.
    out = reconcile(make_run(status=out.status.wire(), stages=stages), 1, group_failed(kind), NOW)
    assert [a for a in out.actions if isinstance(a, DeleteChild)] == [DeleteChild("dpo", "tiny-dpo", "Job")]
    out = reconcile(make_run(status=out.status.wire(), stages=stages), 1, {}, NOW)
    assert creates(out) == [1] and out.status.stages[1].attempts == 2


def test_counted_group_failures_stop_at_backoff_limit_and_bad_input_at_once():
    stages, running = two_node_dpo(backoff=1)
    once = reconcile(make_run(status=running, stages=stages), 1, group_failed("failure"), NOW).status.wire()
    once["stages"][1]["phase"] = "Running"  # the restarted group ran and failed again
    out = reconcile(make_run(status=once, stages=stages), 1, group_failed("failure"), NOW)
    assert out.status.stages[1].phase == "Failed" and out.status.stages[1].restarts == 1
    # A disruption never counts, whatever the count so far.
    out = reconcile(make_run(status=once, stages=stages), 1, group_failed("disruption"), NOW)
    assert out.status.stages[1].phase == "Pending" and out.status.stages[1].restarts == 1
    # The trainer's "fix your input": no restart at all.
    out = reconcile(make_run(status=running, stages=stages), 1, group_failed("input"), NOW)
    assert out.status.phase == "Failed" and "GroupRestart" not in reasons(out)
