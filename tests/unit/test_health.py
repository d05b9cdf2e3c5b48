"""Health guards (issue 31): a stage that trains on fewer ranks than rendered, hangs, or learns nothing says
so and acts; status shows the work at risk. Pure tables: rendering and the reconcile state machine."""

from __future__ import annotations

import pytest

import yaml

from alignment_operator.api import parse_run
from alignment_operator.reconcile import Event, ObservedChild, reconcile
from alignment_operator.render.manifests import RenderContext, build_stage
from alignment_trainer import outcome
from alignment_trainer.launch import WORLD_ENV

from test_reconcile import NOW, ROOT, child, make_run, sft_running
from test_render import zephyr


def _containers(obj):
    """Every container template of a Job, JobSet or PyTorchJob."""
    if obj["kind"] == "Job":
        return obj["spec"]["template"]["spec"]["containers"]
    if obj["kind"] == "JobSet":
        return [c for r in obj["spec"]["replicatedJobs"] for c in r["template"]["spec"]["template"]["spec"]["containers"]]
    return [c for r in obj["spec"]["pytorchReplicaSpecs"].values() for c in r["template"]["spec"]["containers"]]


@pytest.mark.parametrize("nodes, gpus, ctx, kind", [
    (1, 8, {}, "Job"),
    (2, 8, {}, "Job"),                                      # Indexed Job + headless Service
    (3, 4, {"jobset_available": True}, "JobSet"),
    (2, 2, {"pytorchjob_available": True}, "PyTorchJob"),
])
def test_every_backend_tells_its_processes_the_world_rendered(nodes, gpus, ctx, kind):
    run = zephyr()
    run.spec.stages[0].resources.nodes, run.spec.stages[0].resources.gpus_per_node = nodes, gpus
    child_obj = next(o for o in build_stage(run, 0, RenderContext(**ctx), "h") if o["kind"] == kind)
    containers = _containers(child_obj)
    assert containers
    for c in containers:
        assert {"name": WORLD_ENV, "value": str(nodes * gpus)} in c["env"], c["env"]


def test_a_world_size_mismatch_fails_the_stage_with_that_reason_naming_both_numbers():
    said = outcome.failure("world size mismatch: the stage is rendered for 2 processes (nodes x processes per node) "
                           "but process 0 on tiny-sft-1 formed a world of 1; no step was trained", "WorldSizeMismatch")
    assert said["exit_code"] == outcome.FIX_INPUT, "the podFailurePolicy fails the stage at once, no retry"
    run = make_run()
    run = make_run(status=sft_running(run))
    out = reconcile(run, 1, {"sft": child("sft", "Failed", attempts=2, group=True, failure="input",
                                          message=outcome.describe(said, 2))}, NOW)
    sft = out.status.stages[0]
    assert sft.phase == "Failed" and sft.reason == "WorldSizeMismatch"
    assert "rendered for 2 processes" in sft.message and "formed a world of 1" in sft.message
    failed = next(c for c in out.status.conditions if c.type == "Failed")
    assert (failed.status, failed.reason) == ("True", "WorldSizeMismatch")
    assert sft.restarts == 0, "not restarted: a retry meets the same world"
    assert [a.reason for a in out.actions if isinstance(a, Event)] == ["StageFailed", "RunFailed"]


def test_a_plain_error_keeps_no_reason():
    assert outcome.reason_of("Error (exit code 1): boom") is None
    assert outcome.reason_of("DataError (exit code 2; fix it): x.jsonl line 3") == "DataError"
    assert outcome.reason_of(None) is None


# ---------------------------------------------------------------- the work at risk

def _running_with_progress(**progress):
    from alignment_operator.api import StageProgress

    run = make_run()
    status = sft_running(run)
    status["stages"][0]["progress"] = StageProgress(percent=42, step=42, total_steps=100, last_updated=NOW,
                                                    **progress).wire()
    return make_run(status=status)


def test_a_push_carries_the_newest_checkpoint_and_the_work_at_risk_into_status():
    from datetime import datetime, timezone

    from alignment_operator.progress import Report, stage_progress

    saved = datetime(2026, 11, 21, 11, 58, tzinfo=timezone.utc)
    p = stage_progress(Report(percent=42, eta_seconds=60, sent=datetime(2026, 11, 21, 12, tzinfo=timezone.utc),
                              metrics={"current_step": 42, "total_steps": 100, "checkpoint_step": 30,
                                       "checkpoint_time": saved.timestamp(), "work_at_risk_seconds": 118.0}))
    assert (p.checkpoint_step, p.checkpoint_time, p.work_at_risk_seconds) == (30, "2026-11-21T11:58:00Z", 118.0)
    run = make_run()
    run = _running_with_progress(**p.model_dump(include={"checkpoint_step", "checkpoint_time", "work_at_risk_seconds"}))
    assert run.status.stages[0].latest_checkpoint is None
    sft = reconcile(run, 1, {"sft": child("sft", "Running", attempts=1)}, NOW).status.stages[0]
    assert sft.latest_checkpoint.model_dump() == {
        "step": 30, "path": "/workspace/default/tiny/u-1/sft/checkpoint-30", "time": "2026-11-21T11:58:00Z",
        "complete": True}
    assert sft.wire()["progress"]["workAtRiskSeconds"] == 118.0


def test_a_disruption_says_what_it_cost_and_is_not_a_failure():
    run = _running_with_progress(checkpoint_step=30, work_at_risk_seconds=118.0)
    out = reconcile(run, 1, {"sft": child("sft", "Running", attempts=2, disruptions=1,
                                          disruption="pod tiny-sft-0 evicted")}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.disruptions, sft.restarts, sft.lost_steps) == ("Running", 1, 0, 12)
    (said,) = [a.message for a in out.actions if isinstance(a, Event) and a.reason == "StageDisrupted"]
    assert "cost 12 step(s), 118s of training: step 42 back to checkpoint-30" in said


@pytest.mark.parametrize("observed, phase", [
    (dict(state="Running", attempts=2, disruptions=1, disruption="pod tiny-sft-0 evicted"), "Running"),  # its Job replaced it
    (dict(state="Failed", group=True, failure="disruption", message="pod tiny-sft-0 evicted"), "Pending"),  # a group restarts
], ids=["one-pod", "group"])
def test_what_an_eviction_cost_stays_in_status(observed, phase):
    """Issue 31: after an eviction status says what it cost, in steps and seconds of training back to the newest
    complete checkpoint (lostSteps, lostSeconds, lastDisruption), counted apart from failures (restarts 0)."""
    run = _running_with_progress(checkpoint_step=30, work_at_risk_seconds=118.0)
    sft = reconcile(run, 1, {"sft": child("sft", **observed)}, NOW).status.stages[0]
    assert (sft.phase, sft.disruptions, sft.restarts, sft.lost_steps, sft.lost_seconds) == (phase, 1, 0, 12, 118.0)
    assert sft.last_disruption == "pod tiny-sft-0 evicted; cost 12 step(s), 118s of training: step 42 back to checkpoint-30"
    assert sft.wire()["lostSeconds"] == 118.0 and "lastDisruption" in sft.wire()


def test_the_local_runner_records_the_trainers_checkpoint_path(tmp_path):
    import json

    from alignment_operator.local.runner import LiveStatus

    run = make_run()
    run = make_run(status=sft_running(run))
    live = LiveStatus(run, 0, tmp_path)
    live.event({"event": "checkpoint", "step": 5, "path": "/w/runs/default/tiny/sft/checkpoint-5",
                "time": "2026-11-21T11:58:00+00:00", "complete": True})
    stage = json.loads((tmp_path / "status.json").read_text())["stages"][0]
    assert stage["latestCheckpoint"] == {"step": 5, "path": "/w/runs/default/tiny/sft/checkpoint-5",
                                         "time": "2026-11-21T11:58:00+00:00", "complete": True}


# ---------------------------------------------------------------- learning nothing

def test_a_stage_learning_nothing_makes_the_run_degraded_with_the_figure_once():
    from alignment_operator.progress import from_event

    p = from_event({"event": "progress", "step": 10, "total": 100, "loss": 0.0, "frac_reward_zero_std": 1.0,
                    "degraded/reward_ties": 1.0}, None, __import__("datetime").datetime(2026, 11, 21, 12))
    assert p.degraded_reward_ties == 1.0
    run = make_run()
    run = _running_with_progress(degraded_reward_ties=1.0)
    out = reconcile(run, 1, {"sft": child("sft", "Running", attempts=1)}, NOW)
    figure = "100% of GRPO groups' rewards tie (frac_reward_zero_std 1.00 above 0.9 for 5 logging steps)"
    sft = out.status.stages[0]
    assert sft.phase == "Running" and len(sft.warnings) == 1 and figure in sft.warnings[0]
    degraded = next(c for c in out.status.conditions if c.type == "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "LearningNothing") and figure in degraded.message
    (said,) = [a.message for a in out.actions if isinstance(a, Event) and a.reason == "Degraded"]
    assert said.startswith("stage sft: ") and figure in said
    again = reconcile(make_run(status=out.status.wire()), 1, {"sft": child("sft", "Running", attempts=1)}, NOW)
    assert "Degraded" not in [a.reason for a in again.actions if isinstance(a, Event)], "said once"


def test_zero_gradients_reach_status_as_degraded_with_the_figure_and_their_threshold_the_recipe():
    """The trainer's `degraded/grad_norm` (a gradient norm of 0 for guards.steps logging steps) is read from a
    push into status, worded in the stage's warnings and the run's Degraded condition; guards.zeroGradNorm
    reaches the stage's recipe."""
    from datetime import datetime, timezone

    from alignment_operator.api.spec import GuardsSpec
    from alignment_operator.progress import Report, stage_progress
    from alignment_operator.render.recipe import build_recipe

    sent = datetime(2026, 11, 21, 12, tzinfo=timezone.utc)
    p = stage_progress(Report(42, None, {"current_step": 42, "total_steps": 100, "grad_norm": 0.0,
                                         "degraded/grad_norm": 0.0}, sent), None)
    assert p.degraded_grad_norm == 0.0
    out = reconcile(_running_with_progress(grad_norm=0.0, degraded_grad_norm=0.0), 1,
                    {"sft": child("sft", "Running", attempts=1)}, NOW)
    figure = "gradient norm 0 (at most 0) for 5 logging steps: no weight moves"
    assert any(figure in w for w in out.status.stages[0].warnings), out.status.stages[0].warnings
    degraded = next(c for c in out.status.conditions if c.type == "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "LearningNothing") and figure in degraded.message
    run = make_run()
    run.spec.stages[1].guards = GuardsSpec(zero_grad_norm=1e-9)
    assert build_recipe(run, 1, "/workspace").guards.zero_grad_norm == 1e-9
    assert build_recipe(run, 0, "/workspace").guards.zero_grad_norm == 0.0, "exactly zero by default"


def test_a_stage_that_ends_before_a_running_look_still_says_what_it_failed_to_learn():
    """A short stage: its last report (with the figure) reaches status, and the next look already finds its Job
    done. The success keeps the figure: warnings, Degraded, one Warning Event (before: Succeeded, silent)."""
    run = _running_with_progress(grad_norm=0.0, degraded_grad_norm=0.0)
    out = reconcile(run, 1, {"sft": child("sft", "Succeeded", attempts=1, result={"checkpoint": "/w/final"})}, NOW)
    sft = out.status.stages[0]
    assert sft.phase == "Succeeded" and len(sft.warnings) == 1 and "gradient norm 0" in sft.warnings[0], sft
    assert next(c for c in out.status.conditions if c.type == "Degraded").status == "True"
    assert [a.reason for a in out.actions if isinstance(a, Event)].count("Degraded") == 1


def test_a_healthy_run_has_no_degraded_condition():
    out = reconcile(_running_with_progress(), 1, {"sft": child("sft", "Running", attempts=1)}, NOW)
    assert "Degraded" not in [c.type for c in out.status.conditions] and out.status.stages[0].warnings == []


def test_guards_reach_the_recipe_and_bad_ones_are_refused_naming_the_field():
    from alignment_operator.api import RunInvalid
    from alignment_operator.api.spec import GuardsSpec
    from alignment_operator.render.recipe import build_recipe

    run = make_run()
    run.spec.stages[1].guards = GuardsSpec(fatal=True, steps=3)
    recipe = build_recipe(run, 1, "/workspace")
    assert (recipe.guards.fatal, recipe.guards.steps, recipe.guards.reward_ties_fraction) == (True, 3, 0.9)
    assert build_recipe(run, 0, "/workspace").guards.fatal is False, "off by default"
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["spec"]["stages"][1]["guards"] = {"rewardTiesFraction": 1.5}
    with pytest.raises(RunInvalid, match=r"spec.stages\[1\].guards.rewardTiesFraction"):
        parse_run(doc)


# ---------------------------------------------------------------- hangs

def _silent(seconds_ago: int, hang: int | None = 60, restarts: int = 0, **progress):
    from datetime import datetime, timedelta

    from alignment_operator.api import StageProgress

    run = make_run()
    status = sft_running(run)
    sent = datetime.fromisoformat(NOW.replace("Z", "+00:00")) - timedelta(seconds=seconds_ago)
    status["stages"][0].update(startTime="2026-11-21T11:00:00Z", restarts=restarts, progress=StageProgress(
        percent=42, step=42, total_steps=100, checkpoint_step=40, last_updated=sent.isoformat(), **progress).wire())
    run = make_run(status=status)
    run.spec.stages[0].hang_timeout_seconds = hang
    return run


def _reasons(out):
    return [a.reason for a in out.actions if isinstance(a, Event)]


def test_a_stage_silent_past_its_hang_timeout_is_restarted_as_a_group_with_reason_hang():
    from alignment_operator.reconcile import CreateStage, DeleteChild

    run = _silent(100)
    out = reconcile(run, 1, {"sft": child("sft", "Running", attempts=2, group=True, uid="j1")}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.reason, sft.restarts, sft.restart_reasons, sft.lost_steps) == ("Pending", "Hang", 1,
                                                                                            {"Hang": 1}, 2)
    assert DeleteChild("sft", "tiny-sft", "Job", "j1") in out.actions
    assert "no progress or heartbeat for 100s (hangTimeoutSeconds 60) at step 42/100" in sft.message
    assert "restart 1 of 2" in sft.message and "back to checkpoint-40" in sft.message
    assert _reasons(out) == ["Hang"]
    restarted = next(c for c in out.status.conditions if c.type == "Restarted")
    assert (restarted.status, restarted.reason) == ("True", "Hang") and "at step 42/100" in restarted.message
    # the Job is still there (its deletion takes a while): deleted again, the words stay; once gone, a new one
    again = reconcile(make_run(status=out.status.wire()), 1, {"sft": child("sft", "Running", attempts=2, uid="j1")}, NOW)
    assert DeleteChild("sft", "tiny-sft", "Job", "j1") in again.actions and "at step 42/100" in again.status.stages[0].message
    fresh = reconcile(make_run(status=again.status.wire()), 1, {}, NOW)
    assert CreateStage(0, suspend=False) in fresh.actions and fresh.status.stages[0].phase == "Running"
    assert fresh.status.stages[0].restarts == 1 and "at step 42/100" in fresh.status.stages[0].last_restart


def test_a_stage_within_its_hang_timeout_is_looked_at_again_when_it_is_due():
    from alignment_operator.reconcile import DeleteChild, RequeueAfter

    out = reconcile(_silent(30), 1, {"sft": child("sft", "Running", attempts=1)}, NOW)
    assert out.status.stages[0].phase == "Running" and RequeueAfter(31) in out.actions
    assert not [a for a in out.actions if isinstance(a, DeleteChild)] and "Hang" not in _reasons(out)


def test_the_default_hang_timeout_is_ten_measured_steps_with_a_floor():
    # 40 s steps: 400 s; silent 350 s is no hang yet. 2 s steps: the floor, 300 s.
    assert reconcile(_silent(350, hang=None, step_seconds=40.0), 1,
                     {"sft": child("sft", "Running")}, NOW).status.stages[0].phase == "Running"
    assert reconcile(_silent(350, hang=None, step_seconds=2.0), 1,
                     {"sft": child("sft", "Running")}, NOW).status.stages[0].reason == "Hang"


def test_an_earlier_attempts_report_starts_no_hang_clock():
    run = _silent(100)
    run.status.stages[0].start_time = NOW  # this attempt started after the report (a restart): nothing yet
    out = reconcile(run, 1, {"sft": child("sft", "Running")}, NOW)
    assert out.status.stages[0].phase == "Running" and "Hang" not in _reasons(out)


def test_past_backoff_limit_a_hung_stage_fails_with_reason_hang():
    out = reconcile(_silent(100, restarts=2), 1, {"sft": child("sft", "Running", uid="j1")}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.reason) == ("Failed", "Hang") and "2 restart(s) already (backoffLimit 2)" in sft.message
    failed = next(c for c in out.status.conditions if c.type == "Failed")
    assert (failed.status, failed.reason) == ("True", "Hang")


def test_a_hung_local_stage_names_the_stopped_rank_and_restarts():
    run = _silent(0)
    words = "Hang: no progress or heartbeat for 61s (hangTimeoutSeconds 60) at step 5/20; stopped: rank 1 (pid 4321)"
    out = reconcile(run, 1, {"sft": ObservedChild("sft", "tiny-sft", "Failed", 1, kind="process", failure="hang",
                                                  message=words)}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.reason, sft.restarts) == ("Pending", "Hang", 1) and "stopped: rank 1 (pid 4321)" in sft.message
    (said,) = [a.message for a in out.actions if isinstance(a, Event) and a.reason == "Hang"]
    assert "rank 1 (pid 4321)" in said


@pytest.mark.parametrize("beats, named", [
    ({"0": 3, "1": 70}, "stopped: rank 1 (no beat for 70s)"),                          # rank 1 frozen
    ({"0": 3, "1": 4}, "every rank still beats (0, 1): stuck inside a step"),           # a collective that never ends
    ({"0": 3, "1": 4000}, "stopped: rank 1 (no beat this attempt)"),                     # its beat is an earlier attempt's
    ({}, "which rank stopped is not known"),                                             # a trainer that does not beat
], ids=["rank-1-stopped", "all-beating", "earlier-attempt", "no-beats"])
def test_a_hang_on_a_cluster_names_the_rank_whose_beats_stopped(beats, named):
    """Every rank beats (status.stages[].progress.ranks, from the progress endpoint) whatever it does; the one
    SIGSTOPped beats nothing: the restart's message, lastRestart, the Event and the condition name it."""
    from datetime import datetime, timedelta

    at = datetime.fromisoformat(NOW.replace("Z", "+00:00"))
    run = _silent(100, ranks={r: (at - timedelta(seconds=s)).isoformat() for r, s in beats.items()})
    out = reconcile(run, 1, {"sft": child("sft", "Running", attempts=1, group=True, uid="j1")}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.reason, sft.restarts) == ("Pending", "Hang", 1)
    assert named in sft.message and named in sft.last_restart
    (said,) = [a.message for a in out.actions if isinstance(a, Event) and a.reason == "Hang"]
    assert named in said and named in next(c.message for c in out.status.conditions if c.type == "Restarted")
    assert "rank 0 (" not in sft.message  # the rank that still beats is not named stopped


def test_a_rank_quiet_past_the_hang_timeout_is_a_hang_while_rank_0_still_reports():
    """Found in CI (the node's health test): rank 1 was stopped right after its share of step 6; rank 0 finished
    step 6 and blocked between steps, in transformers' gather of the next batch's token count, where its
    heartbeat reports went on: the stage's clock kept moving and no hang was seen for 150 s. A rank whose own
    beats stop for the hang timeout is a hang, however fresh the stage's last report."""
    from datetime import datetime, timedelta

    from alignment_operator.reconcile import DeleteChild, RequeueAfter

    at = datetime.fromisoformat(NOW.replace("Z", "+00:00"))
    beats = lambda quiet: {"0": (at - timedelta(seconds=2)).isoformat(),  # noqa: E731
                           "1": (at - timedelta(seconds=quiet)).isoformat()}
    out = reconcile(_silent(3, ranks=beats(61)), 1, {"sft": child("sft", "Running", attempts=1, group=True, uid="j1")},
                    NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.reason, sft.restarts, sft.restart_reasons) == ("Pending", "Hang", 1, {"Hang": 1})
    assert DeleteChild("sft", "tiny-sft", "Job", "j1") in out.actions
    assert sft.last_restart.startswith("Hang: no progress or heartbeat from rank 1 for 61s (hangTimeoutSeconds 60) "
                                       "at step 42/100, while rank 0 still reported; stopped: rank 1 (no beat for 61s)")
    assert "rank 0 (" not in sft.last_restart and _reasons(out) == ["Hang"]
    # quiet for less than the timeout: looked at again when the rank's silence comes due (before the stage's)
    out = reconcile(_silent(3, ranks=beats(40)), 1, {"sft": child("sft", "Running", attempts=1)}, NOW)
    assert out.status.stages[0].phase == "Running" and RequeueAfter(21) in out.actions and "Hang" not in _reasons(out)
    # a rank that has not beaten yet this attempt (loading) is not quiet; nor is one after the last step
    run = _silent(3, ranks={"0": (at - timedelta(seconds=2)).isoformat(), "1": "2026-11-21T10:00:00+00:00"})
    assert reconcile(run, 1, {"sft": child("sft", "Running")}, NOW).status.stages[0].phase == "Running"
    run = _silent(3, ranks=beats(1000))
    run.status.stages[0].progress.step = 100  # of 100: rank 1 ended its training, rank 0 writes final/
    assert reconcile(run, 1, {"sft": child("sft", "Running")}, NOW).status.stages[0].phase == "Running"
    # a rank quiet 10 s is no hang, however short the stage's own timeout (a beat takes up to ~10 s to reach
    # status); the stage's own clock comes due first
    out = reconcile(_silent(3, hang=5, ranks=beats(10)), 1, {"sft": child("sft", "Running")}, NOW)
    assert out.status.stages[0].phase == "Running" and out.actions == [RequeueAfter(3)]


def test_a_local_stage_with_a_stopped_rank_is_hung_while_rank_0_still_prints_heartbeats():
    """The local twin of the case above: the local clock moves with rank 0's heartbeat lines, and a process of
    the stage stopped for the hang timeout is a hang all the same: named with its RANK, every process killed."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    from types import SimpleNamespace

    from alignment_operator.api import StageProgress, StageStatus
    from alignment_operator.local.runner import HangWatch

    launcher = ("import os, subprocess, sys, time\n"
                "rank1 = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
                "env={**os.environ, 'RANK': '1'})\n"
                "print(rank1.pid, flush=True)\n"
                "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RANK": "0"}, start_new_session=True)
    try:
        rank1 = int(proc.stdout.readline())
        st = StageStatus(name="sft", phase="Running", progress=StageProgress(percent=10, step=5, total_steps=50,
                                                                          last_updated=NOW))
        run = SimpleNamespace(status=SimpleNamespace(stages=[st]), spec=SimpleNamespace(
            stages=[SimpleNamespace(hang_timeout_seconds=2)]))
        live = SimpleNamespace(active=time.monotonic())
        watch = HangWatch(run, 0, live, proc)
        watch.look_every = 0.5
        beating = threading.Event()

        def heartbeats():  # rank 0's lines: the stage's own clock never runs out
            while not beating.wait(0.2):
                live.active = time.monotonic()

        threading.Thread(target=heartbeats, daemon=True).start()
        t0 = time.monotonic()
        os.kill(rank1, signal.SIGSTOP)
        watching = threading.Thread(target=watch.watch, daemon=True)  # returns once it calls the stage hung
        watching.start()
        watching.join(timeout=20)
        beating.set()
        watch.done.set()
        took = time.monotonic() - t0
        assert not watching.is_alive(), "no hang seen in 20 s with rank 1 stopped (hangTimeoutSeconds 2)"
        assert watch.words is not None and watch.words.startswith(
            "Hang: no progress or heartbeat from rank 1 for "), watch.words
        assert f"while rank 0 still reported; stopped: rank 1 (pid {rank1})" in watch.words, watch.words
        assert watch.stopped == [f"rank 1 (pid {rank1})"] and 2 <= took < 10, took
        assert proc.wait(timeout=10) == -signal.SIGKILL  # every process of the stage killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_disrupted_pods_replacement_gets_a_fresh_hang_clock():
    """An evicted pod's replacement loads and resumes before it reports: the silence before is no hang."""
    out = reconcile(_silent(100), 1, {"sft": child("sft", "Running", attempts=2, disruptions=1,
                                                    disruption="pod tiny-sft-0 evicted")}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.restarts, sft.disruptions, sft.progress) == ("Running", 0, 1, None)
    assert "Hang" not in _reasons(out) and "StageDisrupted" in _reasons(out)


def test_after_its_last_step_a_stage_writing_its_final_model_is_no_hang():
    run = _silent(1000)
    run.status.stages[0].progress.step = 100  # of 100: evaluation and final/ are being written
    out = reconcile(run, 1, {"sft": child("sft", "Running")}, NOW)
    assert out.status.stages[0].phase == "Running" and "Hang" not in _reasons(out)
