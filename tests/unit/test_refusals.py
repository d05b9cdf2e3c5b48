"""A child the API server refuses to create: bounded tries with backoff, counted in status, then
the stage and the run fail with the server's words; a spec change or a retry request tries again."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta

import pytest
from kubernetes.client.rest import ApiException

from alignment_operator import controller, kube
from alignment_operator.api import RETRY_ANNOTATION, AlignmentRunStatus, StageStatus
from alignment_operator.reconcile import (
    CREATE_TRIES, CreateStage, Event, ObservedChild, Refusal, RequeueAfter, reconcile, stage_hash,
)
from alignment_operator.render.manifests import RenderContext

from test_reconcile import NOW, SFT_RESULT, make_run

SERVER = ('jobs.batch "tiny-dpo" is forbidden: ValidatingAdmissionPolicy \'gpu-budget\' with binding '
          '\'gpu-budget\' denied request: dpo Jobs need a reviewed GPU budget in this namespace')
REFUSAL = Refusal(kind="Job", name="tiny-dpo", code=422, reason="Invalid", message=SERVER)


def at(seconds: float) -> str:
    t = datetime.fromisoformat(NOW.replace("Z", "+00:00")) + timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def sft_done(run) -> dict:
    """SFT succeeded (its checkpoint and metrics in status); DPO not started yet."""
    return AlignmentRunStatus(phase="Running", observed_generation=1, stages=[
        StageStatus(name="sft", phase="Succeeded", job_name="tiny-sft", attempts=1, spec_hash=stage_hash(run, 0),
                    checkpoint=SFT_RESULT["checkpoint"], metrics={"train_loss": 1.25}, completion_time=NOW),
        StageStatus(name="dpo"), StageStatus(name="eval")]).wire()


SFT = {"sft": ObservedChild("sft", "tiny-sft", "Succeeded", 1, result=SFT_RESULT, finished=NOW)}


def refused(refusal: Refusal = REFUSAL) -> dict[str, ObservedChild]:
    """What the cluster shell observes when its create of the dpo Job was refused."""
    return {**SFT, "dpo": ObservedChild("dpo", refusal.name, "Refused", kind=refusal.kind, refusal=refusal)}


def warnings(out) -> list[Event]:
    return [a for a in out.actions if isinstance(a, Event) and a.type == "Warning"]


def creates(out) -> list[int]:
    return [a.index for a in out.actions if isinstance(a, CreateStage)]


def requeues(out) -> list[float]:
    return [a.seconds for a in out.actions if isinstance(a, RequeueAfter)]


def tries(status: dict, *, gen: int = 1, annotations: dict | None = None, run=None) -> tuple[dict, list]:
    """The shell's passes until the stage stops trying: each create it is told to make is refused.
    A fresh run object is parsed from the stored status each pass, as a restarted operator would."""
    seen, t = [], 0.0
    for _ in range(20):
        current = make_run(status=status)
        current.metadata.annotations.update(annotations or {})
        out = reconcile(current, gen, SFT, at(t))
        if creates(out) == [1]:
            out = reconcile(current, gen, refused(), at(t))  # the server said no
            seen.append(("refused", t, out))
        elif requeues(out):
            t += requeues(out)[0]
            seen.append(("waited", t, out))
        else:
            return out.status.wire(), seen
        status = out.status.wire()
    raise AssertionError("never stopped trying")


def test_a_first_refusal_waits_and_says_why_without_failing_or_announcing():
    run = make_run()
    first = reconcile(make_run(status=sft_done(run)), 1, SFT, NOW)
    assert creates(first) == [1], "the shell was told to create the dpo stage"
    out = reconcile(make_run(status=sft_done(run)), 1, refused(), NOW)
    dpo = out.status.stages[1]
    assert (dpo.phase, dpo.create_refusals, dpo.last_refusal_time) == ("Pending", 1, NOW)
    assert dpo.message == (f"the API server refused to create Job tiny-dpo (422 Invalid): {SERVER}; "
                           f"trying again in 5s (try 1 of {CREATE_TRIES})")
    assert out.status.phase != "Failed" and creates(out) == [] and requeues(out) == [5.0]
    assert not any(isinstance(a, Event) for a in out.actions), "no StageStarted for a Job that does not exist"
    assert dpo.attempts == 0, "no pod started"
    reconciling = next(c for c in out.status.conditions if c.type == "Reconciling")
    assert reconciling.status == "True" and reconciling.message == f"stage dpo is pending: {dpo.message}"


def test_the_next_try_waits_for_the_backoff_read_from_status():
    run = make_run()
    stored = reconcile(make_run(status=sft_done(run)), 1, refused(), NOW).status.wire()
    # Every event in between (the status write's own, a restarted operator's first pass) waits.
    early = reconcile(make_run(status=stored), 1, SFT, at(2))
    assert creates(early) == [] and requeues(early) == [3.0] and early.status.wire() == stored
    due = reconcile(make_run(status=stored), 1, SFT, at(5))
    assert creates(due) == [1]


def test_bounded_tries_then_the_run_fails_with_the_servers_message_once():
    run = make_run()
    final, seen = tries(sft_done(run))
    refusals = [(t, out) for what, t, out in seen if what == "refused"]
    assert [t for t, _ in refusals] == [0, 5, 15], "three tries, 5 s then 10 s apart"
    assert [o.status.stages[1].create_refusals for _, o in refusals] == [1, 2, 3]

    status = AlignmentRunStatus.model_validate(final)
    dpo = status.stages[1]
    assert status.phase == "Failed" and dpo.phase == "Failed" and dpo.completion_time == at(15)
    assert dpo.message == f"the API server refused to create Job tiny-dpo (422 Invalid) 3 times: {SERVER}"
    conds = {c.type: c for c in status.conditions}
    assert (conds["Failed"].status, conds["Failed"].reason) == ("True", "ChildRefused")
    assert conds["Failed"].message == f"stage dpo: {dpo.message}"
    assert (conds["Stalled"].status, conds["Stalled"].reason) == ("True", "ChildRefused")

    sent = [w for _, o in refusals for w in warnings(o)]
    assert [w.reason for w in sent] == ["ChildRefused", "RunFailed"]
    assert [w for w in sent if SERVER in w.message] == [sent[0]], "one Warning Event carries the message"
    # Nothing written before is lost: SFT's checkpoint, metrics and the run's model.
    assert status.stages[0].checkpoint == SFT_RESULT["checkpoint"] and status.stages[0].metrics == {"train_loss": 1.25}
    assert status.model == SFT_RESULT["checkpoint"] and status.progress == "1/3"
    # The verdict is final: later events create nothing, send nothing, write nothing.
    again = reconcile(make_run(status=final), 1, SFT, at(600))
    assert again.actions == [] and again.status.wire() == final


def test_a_retry_request_or_a_spec_change_tries_again_from_zero():
    run = make_run()
    final, _ = tries(sft_done(run))
    # Neither the same generation nor an absent annotation changes anything (proven above);
    # a retry request does: the stage is created at once, and refused again it counts from 1.
    retried = make_run(status=final)
    retried.metadata.annotations[RETRY_ANNOTATION] = "quota-raised"
    out = reconcile(retried, 1, SFT, at(700))
    assert creates(out) == [1] and out.status.stages[1].create_refusals == 0
    assert [a.reason for a in out.actions if isinstance(a, Event)][0] == "StageRetried"
    again = reconcile(retried, 1, refused(), at(700))
    assert again.status.stages[1].create_refusals == 1 and again.status.phase != "Failed"

    # A new generation (the user edited the run) as well.
    edited = reconcile(make_run(status=final), 2, SFT, at(700))
    assert creates(edited) == [1] and edited.status.stages[1].phase == "Running"
    assert edited.status.stages[1].create_refusals == 0 and edited.status.observed_generation == 2
    assert {c.type: c.status for c in edited.status.conditions}["Failed"] == "False"


def test_a_successful_create_starts_the_count_again():
    run = make_run()
    once = reconcile(make_run(status=sft_done(run)), 1, refused(), NOW).status.wire()
    created = reconcile(make_run(status=once), 1, SFT, at(5))
    assert creates(created) == [1] and "StageStarted" in [a.reason for a in created.actions if isinstance(a, Event)]
    running = reconcile(make_run(status=created.status.wire()), 1,
                        {**SFT, "dpo": ObservedChild("dpo", "tiny-dpo", "Running", 1)}, at(6))
    dpo = running.status.stages[1]
    assert (dpo.phase, dpo.create_refusals, dpo.last_refusal_time, dpo.message) == ("Running", 0, None, None)
    assert dpo.attempts == 1


def test_a_vanished_job_whose_recreate_is_refused_keeps_its_attempts():
    run = make_run()
    status = AlignmentRunStatus.model_validate(sft_done(run))
    status.stages[1] = StageStatus(name="dpo", phase="Running", job_name="tiny-dpo", attempts=2,
                                   spec_hash=stage_hash(run, 1), start_time=NOW)
    out = reconcile(make_run(status=status.wire()), 1, refused(), at(60))
    dpo = out.status.stages[1]
    assert (dpo.phase, dpo.create_refusals, dpo.attempts, dpo.previous_attempts) == ("Pending", 1, 2, 2)
    assert dpo.spec_hash == stage_hash(run, 1), "it ran: later edits are still refused"
    later = reconcile(make_run(status=out.status.wire()), 1, SFT, at(65))
    assert creates(later) == [1] and later.status.stages[1].attempts == 3


def test_a_long_server_message_is_clipped_to_one_line():
    fields = "; ".join(f"spec.template.spec.containers[0].env[{i}].name: Invalid value: \"X{i}\"" for i in range(200))
    long = Refusal("Job", "tiny-dpo", 422, "Invalid", f'Job.batch "tiny-dpo" is invalid:\n[{fields}]')
    run = make_run()
    status = sft_done(run)
    for t in (0, 5, 15):
        out = reconcile(make_run(status=status), 1, refused(long), at(t))
        status = out.status.wire()
    dpo = out.status.stages[1]
    assert len(long.message) > 10_000 and "\n" not in dpo.message
    assert dpo.message.startswith('the API server refused to create Job tiny-dpo (422 Invalid) 3 times: '
                                  'Job.batch "tiny-dpo" is invalid: [spec.template')
    assert dpo.message.endswith("…") and len(dpo.message) < 900
    assert all(len(w.message) <= 1024 for w in warnings(out))


# ---- the cluster shell: kube.py's verdict on an answer, the controller's one pass -------------------

JOB = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "tiny-dpo", "namespace": "ns"}}


def answer(status: int, body: dict | str) -> ApiException:
    e = ApiException(status=status, reason="server said so")
    e.body = (json.dumps(body) if isinstance(body, dict) else body).encode()  # _preload_content=False: bytes
    return e


def server_says(monkeypatch, error: ApiException) -> None:
    class Api:  # every create the client has gets the same answer
        def __getattr__(self, name):
            def create(*_, **__):
                raise error
            return create
    monkeypatch.setattr(kube, "_api", lambda cls: Api())


@pytest.mark.parametrize("code, reason", [(422, "Invalid"), (403, "Forbidden"), (400, "BadRequest")])
def test_kube_turns_a_refusal_into_child_refused_with_the_servers_words(monkeypatch, code, reason):
    server_says(monkeypatch, answer(code, {"kind": "Status", "code": code, "reason": reason, "message": SERVER}))
    with pytest.raises(kube.ChildRefused) as caught:
        kube.ensure_object(JOB)
    assert caught.value.refusal == Refusal("Job", "tiny-dpo", code, reason, SERVER)


@pytest.mark.parametrize("code", [429, 500, 503, 404, 401])
def test_throttling_server_errors_and_a_gone_namespace_stay_transient(monkeypatch, code):
    server_says(monkeypatch, answer(code, "try later"))
    with pytest.raises(ApiException) as caught:
        kube.ensure_object(JOB)
    assert not isinstance(caught.value, kube.ChildRefused) and caught.value.status == code
    assert caught.value.body == "try later", "the body is text, not b'...'"


def test_a_refusal_that_is_no_status_keeps_the_body_as_its_message(monkeypatch):
    server_says(monkeypatch, answer(413, "request entity too large"))
    with pytest.raises(kube.ChildRefused) as caught:
        kube.ensure_object(JOB)
    assert (caught.value.refusal.code, caught.value.refusal.message) == (413, "request entity too large")


def test_the_controller_records_a_refused_create_logs_one_line_and_waits(monkeypatch, caplog):
    run = make_run()
    body = {"apiVersion": "alignment.dev/v1alpha1", "kind": "AlignmentRun", "spec": run.spec.wire(),
            "metadata": {"name": "tiny", "namespace": "ns", "generation": 1, "resourceVersion": "7"},
            "status": sft_done(run)}
    writes, events, created = [], [], []
    monkeypatch.setattr(controller, "cache", controller.Cache())
    controller.cache.put_run(body)
    monkeypatch.setattr(controller, "_children", lambda *a: SFT)
    monkeypatch.setattr(controller, "_context", RenderContext())
    monkeypatch.setattr(kube, "now", lambda: NOW)
    monkeypatch.setattr(kube, "replace_status", lambda b, status: writes.append(status) or {**b, "status": status})
    monkeypatch.setattr(kube, "emit_event", lambda b, *a: events.append(a))

    def ensure(obj):
        created.append(obj["kind"])
        if obj["kind"] == "Job":
            raise kube.ChildRefused(Refusal("Job", obj["metadata"]["name"], 422, "Invalid", SERVER))
        return obj
    monkeypatch.setattr(kube, "ensure_object", ensure)

    with caplog.at_level(logging.INFO, logger="alignment_operator"):
        after = controller.reconcile_run("ns", "tiny")  # no exception: the refusal is an observation
    assert created[-1] == "Job", "the create really was attempted"
    assert len(writes) == 1 and writes[0]["stages"][1]["createRefusals"] == 1
    assert writes[0]["stages"][0]["checkpoint"] == SFT_RESULT["checkpoint"]
    assert events == [] and after == 5.0, "the queue looks again after the backoff"
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and lines[0].exc_info is None
    assert lines[0].getMessage().startswith("ns/tiny stage dpo: the API server refused to create Job tiny-dpo")
    assert SERVER in lines[0].getMessage()
