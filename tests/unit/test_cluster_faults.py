"""The cluster shell under API faults, with kube.py's calls stubbed: every error a reconcile meets
leaves the run with a next step (a requeue with backoff) and says what it waits for; status is
made writable before it is written; nothing of a deleted or finished run stays in memory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import urllib3
from kubernetes.client.rest import ApiException

from alignment_operator import controller, kube
from alignment_operator.api import RETRY_ANNOTATION, AlignmentRunStatus
from alignment_operator.cache import Cache
from alignment_operator.identity import LABEL_RUN, LABEL_STAGE
from alignment_operator.render.manifests import RenderContext
from alignment_operator.workqueue import Backoff, WorkQueue

from test_reconcile import NOW, make_run

KEY = ("ns", "tiny")
WEBHOOK = ('Internal error occurred: failed calling webhook "jobs.policy.example": failed to call webhook: '
           'the server responded with status 500')


class Cluster:
    """What the stubbed kube.py holds and was asked to do."""

    def __init__(self, body: dict):
        self.body = body
        self.rv = int(body["metadata"]["resourceVersion"])
        self.writes: list[dict] = []
        self.events: list[tuple[str, str, str]] = []
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.lists = 0
        self.objects: list[dict] = []  # what list_children answers
        self.fail_create: Exception | None = None
        self.fail_status: Exception | None = None

    def replace_status(self, body, status):
        if self.fail_status is not None:
            raise self.fail_status
        json.dumps(status, allow_nan=False)  # what the API server would parse
        self.writes.append(status)
        self.rv = max(self.rv, int(body["metadata"]["resourceVersion"])) + 1
        self.body = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.rv)}, "status": status}
        return self.body

    def ensure_object(self, obj):
        if self.fail_create is not None and obj["kind"] == "Job":
            raise self.fail_create
        self.created.append(f"{obj['kind']} {obj['metadata']['name']}")
        meta = {**obj["metadata"], "uid": f"uid-{len(self.created)}", "resourceVersion": "1",
                "creationTimestamp": NOW}
        return {**obj, "metadata": meta}


@pytest.fixture
def cluster(monkeypatch):
    run = make_run()
    body = {"apiVersion": "alignment.dev/v1alpha1", "kind": "AlignmentRun", "spec": run.spec.wire(),
            "metadata": {"name": "tiny", "namespace": "ns", "uid": "run-uid", "generation": 1,
                         "resourceVersion": "10", "annotations": {}}}
    c = Cluster(body)
    monkeypatch.setattr(controller, "cache", Cache())
    monkeypatch.setattr(controller, "queue", WorkQueue(Backoff(base=1, cap=300, jitter=0.0)))
    monkeypatch.setattr(controller, "_listed", {})
    monkeypatch.setattr(controller, "_context", RenderContext())
    monkeypatch.setattr(kube, "now", lambda: NOW)
    monkeypatch.setattr(kube, "replace_status", c.replace_status)
    monkeypatch.setattr(kube, "ensure_object", c.ensure_object)
    monkeypatch.setattr(kube, "emit_event", lambda b, *a: c.events.append(a))
    monkeypatch.setattr(kube, "get_run", lambda ns, name: c.body)

    def list_children(ns, name):
        c.lists += 1
        return list(c.objects), []
    monkeypatch.setattr(kube, "list_children", list_children)
    monkeypatch.setattr(kube, "delete_child", lambda ns, name, kind, uid=None: c.deleted.append(name))
    monkeypatch.setattr(kube, "failed_create_events", lambda ns, uids: [])
    controller.cache.put_run(body)
    return c


def api_error(code: int, message: str, headers: dict | None = None) -> ApiException:
    e = ApiException(status=code, reason={500: "Internal Server Error", 429: "Too Many Requests",
                                          422: "Unprocessable Entity"}.get(code, ""))
    e.body = json.dumps({"kind": "Status", "code": code, "message": message}).encode()
    e.headers = headers or {}
    return e


def reconciling(status: dict) -> dict:
    return next(c for c in status["conditions"] if c["type"] == "Reconciling")


def delayed(seconds: float | None = None) -> int:
    return controller.queue.sizes()["delayed"]


def test_a_webhook_answering_500_requeues_with_backoff_and_says_what_the_run_waits_for(cluster):
    cluster.fail_create = api_error(500, WEBHOOK)
    controller.process(KEY)  # never raises
    assert cluster.created and not any(c.startswith("Job") for c in cluster.created), "the Job create was tried"
    first = reconciling(cluster.writes[-1])
    assert (first["status"], first["reason"]) == ("True", "ApiServerError")
    assert first["message"].startswith("waiting: creating Job ") and WEBHOOK in first["message"]
    assert first["message"].endswith("trying again in 1s (try 1)")
    assert cluster.writes[-1]["phase"] == "Pending", "a new run shows a phase while it waits"
    assert [e[:2] for e in cluster.events] == [("Warning", "ApiServerError")]
    assert controller.queue.sizes()["delayed"] == 1 and controller.queue.failures(KEY) == 1

    controller.process(KEY)  # still failing: the backoff doubles, no second Event
    assert reconciling(cluster.writes[-1])["message"].endswith("trying again in 2s (try 2)")
    assert len(cluster.events) == 1

    cluster.fail_create = None  # the webhook recovered
    controller.process(KEY)
    assert any(c.startswith("Job") for c in cluster.created)
    status = cluster.writes[-1]
    assert status["stages"][0]["phase"] == "Running" and reconciling(status)["reason"] == "StageRunning"
    assert controller.queue.failures(KEY) == 0, "a success forgets the backoff"


def test_429_waits_as_long_as_retry_after_says(cluster):
    cluster.fail_create = api_error(429, "too many requests", {"Retry-After": "30"})
    controller.process(KEY)
    said = reconciling(cluster.writes[-1])
    assert said["reason"] == "Throttled" and "trying again in 30s" in said["message"]


@pytest.mark.parametrize("error, reason", [
    (urllib3.exceptions.MaxRetryError(None, "/apis/batch/v1/namespaces/ns/jobs",
                                      ConnectionRefusedError(111, "Connection refused")), "ApiServerUnreachable"),
    (urllib3.exceptions.ReadTimeoutError(None, "/apis", "Read timed out. (read timeout=60)"), "ApiServerTimeout"),
    (api_error(504, "the webhook timed out"), "ApiServerTimeout"),
    (api_error(403, 'jobs.batch is forbidden: User "system:serviceaccount:x:op" cannot patch'), "ApiRequestRefused"),
    (KeyError("spec"), "InternalError"),
])
def test_every_error_leaves_a_requeue_and_a_reason(cluster, error, reason):
    cluster.fail_create = error
    controller.process(KEY)
    assert reconciling(cluster.writes[-1])["reason"] == reason
    assert controller.queue.sizes()["delayed"] == 1


def test_a_status_that_keeps_conflicting_is_requeued(cluster, monkeypatch):
    tries = []

    def conflict(body, status):
        tries.append(1)
        raise kube.Conflict("changed")
    monkeypatch.setattr(kube, "replace_status", conflict)
    controller.process(KEY)
    assert len(tries) >= controller.STATUS_TRIES and controller.queue.sizes()["delayed"] == 1
    assert [e[1] for e in cluster.events if e[0] == "Warning"] == ["Conflict"]


def test_a_status_write_refused_with_422_is_reported_on_the_run(cluster):
    cluster.fail_status = kube.StatusRefused(422, 'AlignmentRun.alignment.dev "tiny" is invalid: status.x: Invalid')
    controller.process(KEY)
    assert cluster.events[-1][:2] == ("Warning", "StatusRefused") and "status.x: Invalid" in cluster.events[-1][2]
    assert controller.queue.sizes()["delayed"] == 1


def test_kube_turns_a_422_on_status_into_status_refused(monkeypatch):
    class Api:
        def replace_namespaced_custom_object_status(self, *a):
            raise api_error(422, 'AlignmentRun.alignment.dev "tiny" is invalid: status.retryRequest: Too long')
    monkeypatch.setattr(kube, "_api", lambda cls: Api())
    body = {"apiVersion": "a/v1", "kind": "AlignmentRun", "spec": {},
            "metadata": {"name": "tiny", "namespace": "ns", "resourceVersion": "1"}}
    with pytest.raises(kube.StatusRefused) as caught:
        kube.replace_status(body, {})
    assert caught.value.code == 422 and caught.value.message.endswith("status.retryRequest: Too long")


def test_a_nan_in_an_eval_result_is_left_out_and_said(cluster):
    done = {"name": "x", "phase": "Succeeded", "checkpoint": "/w/x/final", "metrics": {}}
    status = AlignmentRunStatus.model_validate({
        "phase": "Running", "observedGeneration": 1,
        "stages": [{**done, "name": "sft"}, {**done, "name": "dpo"}, {"name": "eval", "phase": "Running",
                                                                    "jobName": "tiny-eval", "attempts": 1}]})
    status.stages[2].phase = "Succeeded"
    status.stages[2].metrics = {"preference_accuracy": 0.75, "eval_loss": math.nan, "win_rate": math.inf}
    cluster.body["status"] = status.wire()
    from alignment_operator.api.status import writable
    wire, notes = writable(status)
    assert wire["stages"][2]["metrics"] == {"preference_accuracy": 0.75}
    assert [(p, n.split(" ")[0]) for p, n in notes] == [
        (("stages", 2, "metrics", "eval_loss"), "nan"), (("stages", 2, "metrics", "win_rate"), "inf")]

    # Through the controller: the eval stage's Job finished with such a result.
    cluster.body["status"] = {**status.wire(), "stages": status.wire()["stages"][:2] + [
        {"name": "eval", "phase": "Running", "jobName": "tiny-eval", "attempts": 1}]}
    controller.cache.put_run({**cluster.body, "metadata": {**cluster.body["metadata"], "resourceVersion": "11"}})
    from alignment_operator import reconcile as rec
    from alignment_operator.reconcile import ObservedChild
    finished = {"eval": ObservedChild("eval", "tiny-eval", "Succeeded", 1, finished=NOW, result={
        "checkpoint": None, "preference_accuracy": 0.75, "eval_loss": math.nan})}
    real = rec.reconcile
    controller_reconcile = lambda run, gen, children, now: real(run, gen, {**children, **finished}, now)  # noqa: E731
    import alignment_operator.controller as ctl
    ctl_reconcile, ctl.reconcile = ctl.reconcile, controller_reconcile
    try:
        controller.process(KEY)
    finally:
        ctl.reconcile = ctl_reconcile
    written = cluster.writes[-1]
    ev = written["stages"][2]
    assert ev["phase"] == "Succeeded" and ev["metrics"] == {"preference_accuracy": 0.75}
    assert "eval_loss" in ev["message"] and "nan" in ev["message"]
    assert "eval_loss" not in written["evaluation"] and written["evaluation"]["preference_accuracy"] == 0.75
    assert any(e[1] == "StatusAdjusted" and "eval_loss" in e[2] for e in cluster.events)


def test_strings_longer_than_the_schema_allows_are_cut_keeping_their_end():
    from alignment_operator.api.status import writable
    status = AlignmentRunStatus()
    status.progress_summary = "x" * 100 + "the end" + "y" * 100  # as reconcile assigns it: unchecked
    wire, notes = writable(status)
    assert len(wire["progressSummary"]) == 128 and wire["progressSummary"].endswith("y" * 50)
    assert notes == [(("progressSummary",), "207 characters cut to 128")]


def test_a_retry_annotation_too_long_for_status_is_refused_not_looped(cluster):
    failed = {"phase": "Failed", "observedGeneration": 1, "stages": [
        {"name": "sft", "phase": "Failed", "jobName": "tiny-sft", "attempts": 3, "message": "exit 1"},
        {"name": "dpo"}, {"name": "eval"}]}
    value = "r" * 300
    cluster.body = {**cluster.body, "status": failed, "metadata": {
        **cluster.body["metadata"], "resourceVersion": "12", "annotations": {RETRY_ANNOTATION: value}}}
    controller.cache.put_run(cluster.body)
    cluster.objects = [{"kind": "Job", "metadata": {
        "name": "tiny-sft", "namespace": "ns", "uid": "j1", "resourceVersion": "5", "creationTimestamp": NOW,
        "labels": {LABEL_RUN: "tiny", LABEL_STAGE: "sft"}},
        "spec": {}, "status": {"failed": 3, "conditions": [{"type": "Failed", "status": "True"}]}}]
    controller.process(KEY)
    assert cluster.deleted == [] and not cluster.created, "nothing retried"
    status = cluster.writes[-1]
    refused = next(c for c in status["conditions"] if c["type"] == "RetryRefused")
    assert refused["status"] == "True" and "300 characters" in refused["message"] and "at most 253" in refused["message"]
    assert "retryRequest" not in status and status["stages"][0]["phase"] == "Failed"
    assert [e[1] for e in cluster.events] == ["RetryRefused"]
    controller.process(KEY)  # again: the same verdict, nothing written, no second Event
    assert cluster.writes[0] == cluster.writes[-1]
    assert len(cluster.writes) == 1 and len(cluster.events) == 1


def test_kube_events_keep_the_end_of_a_long_message():
    message = "stage sft failed: Error (exit code 1): " + "noise " * 400 + "ValueError: column 'messages' missing"
    kept = kube.event_message(message)
    assert len(kept) == kube.EVENT_LIMIT
    assert kept.startswith("stage sft failed") and kept.endswith("ValueError: column 'messages' missing")


def test_waiting_messages_never_carry_a_token():
    e = urllib3.exceptions.ProtocolError("Connection aborted", "Authorization: Bearer eyJhbGciOi.secret")
    said = kube.waiting_on(e)
    assert "eyJhbGciOi" not in said.message and "Bearer ***" in said.message


def test_a_deleted_run_leaves_nothing_in_memory(cluster):
    controller.process(KEY)  # creates its first stage: children in the cache, a resync queued
    assert controller.cache.sizes()["children"] == 1 and controller.queue.sizes()["delayed"] == 1
    controller.forget(*KEY)
    assert controller.cache.sizes() == {"runs": 0, "children": 0, "pods": 0, "finished": 0}
    assert controller.queue.sizes() == {"ready": 0, "processing": 0, "delayed": 0, "heap": 1, "failures": 0}
    assert controller._listed == {}


def test_a_finished_run_keeps_no_children_and_ignores_their_events(cluster):
    succeeded = {"phase": "Succeeded", "observedGeneration": 1, "completionTime": NOW, "stages": [
        {"name": s, "phase": "Succeeded", "jobName": f"tiny-{s}", "attempts": 1} for s in ("sft", "dpo", "eval")]}
    cluster.body = {**cluster.body, "status": succeeded,
                    "metadata": {**cluster.body["metadata"], "resourceVersion": "13"}}
    controller.cache.put_run(cluster.body)
    job = {"kind": "Job", "metadata": {"name": "tiny-sft", "namespace": "ns", "uid": "j1", "resourceVersion": "5",
                                       "labels": {LABEL_RUN: "tiny", LABEL_STAGE: "sft"}}, "spec": {}, "status": {}}
    assert controller.cache.put(job) == KEY
    controller.process(KEY)
    assert controller.cache.sizes()["children"] == 0 and controller.cache.finished(*KEY)
    assert controller.cache.put({**job, "metadata": {**job["metadata"], "resourceVersion": "6"}}) is None
    assert controller.queue.sizes()["delayed"] == 0, "no resync of a finished run"


def test_an_active_run_is_listed_again_after_the_resync_period(cluster, monkeypatch):
    controller.process(KEY)  # creates sft's Job; the cache has it
    assert cluster.lists == 0, "a fresh run needs no list: the watch feeds the cache"
    cluster.objects = []     # ... but the Job was deleted while the watch was away
    clock = [1e6]
    monkeypatch.setattr(controller.time, "monotonic", lambda: clock[0])
    controller._listed[KEY] = clock[0]
    controller.process(KEY)
    assert cluster.lists == 0
    clock[0] += controller.RESYNC_SECONDS
    controller.process(KEY)
    assert cluster.lists == 1 and controller.cache.sizes()["children"] == 1 - 1 + 1, \
        "the list replaced the cache's view, and the stage's Job was created again"
    assert sum(c.startswith("Job") for c in cluster.created) == 2


# ---------------------------------------------------------------------------------- disruptions

def _disrupted_run(limit: int):
    from test_reconcile import sft_running
    run = make_run()
    run = make_run(status=sft_running(run))
    run.spec.stages[0].max_disruptions = limit
    return run


def test_each_disruption_of_a_one_pod_stage_is_counted_and_traced_once():
    from alignment_operator.reconcile import ObservedChild, reconcile
    run = _disrupted_run(limit=2)
    said = "pod tiny-sft-x: PreemptionByScheduler: preempted by a higher-priority pod"
    out = reconcile(run, 1, {"sft": ObservedChild("sft", "tiny-sft", "Running", 2, disruptions=1,
                                                  disruption=said)}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.disruptions) == ("Running", 1)
    traced = [a for a in out.actions if getattr(a, "reason", None) == "StageDisrupted"]
    assert len(traced) == 1 and said in traced[0].message and "disruption 1 of at most 2" in traced[0].message
    again = reconcile(make_run(status=out.status.wire()), 1, {"sft": ObservedChild(
        "sft", "tiny-sft", "Running", 2, disruptions=1, disruption=said)}, NOW)
    assert not [a for a in again.actions if getattr(a, "reason", None) == "StageDisrupted"], "traced once"


def test_one_disruption_more_than_max_disruptions_fails_the_stage_and_stops_its_job():
    from alignment_operator.reconcile import DeleteChild, ObservedChild, reconcile
    run = _disrupted_run(limit=2)
    out = reconcile(run, 1, {"sft": ObservedChild("sft", "tiny-sft", "Running", 4, disruptions=3,
                                                  disruption="pod p: EvictionByEvictionAPI: evicted")}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.reason, sft.disruptions, out.status.phase) == ("Failed", "TooManyDisruptions", 3, "Failed")
    assert "more than maxDisruptions (2)" in sft.message and sft.message.endswith("evicted")
    assert DeleteChild("sft", "tiny-sft", "Job") in out.actions


def test_a_disrupted_group_restarts_uncounted_until_max_disruptions():
    from alignment_operator.reconcile import ObservedChild, reconcile
    run = _disrupted_run(limit=1)
    group = ObservedChild("sft", "tiny-sft", "Failed", 1, group=True, failure="disruption", message="rank 1 evicted")
    out = reconcile(run, 1, {"sft": group}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.disruptions, sft.restarts) == ("Pending", 1, 0)
    assert "disruption 1 of at most 1, not counted" in sft.message
    later = make_run(status=out.status.wire())
    later.spec.stages[0].max_disruptions = 1
    later.status.stages[0].phase = "Running"
    out = reconcile(later, 1, {"sft": group}, NOW)
    assert (out.status.stages[0].phase, out.status.stages[0].reason) == ("Failed", "TooManyDisruptions")


def test_observe_counts_a_jobs_disrupted_pods():
    from alignment_operator import observe

    def pod(name, disrupted):
        conds = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                  "message": "preempted"}] if disrupted else []
        return {"metadata": {"name": name}, "status": {"phase": "Failed" if disrupted else "Running",
                                                        "conditions": conds}}
    assert observe.disrupted([pod("a", True), pod("b", False), pod("c", True)]) == (
        2, "pod c: PreemptionByScheduler: preempted")
    assert observe.disrupted([pod("b", False)]) == (0, None)


def test_handlers_only_enqueue_news_and_a_deleted_run_is_forgotten(cluster):
    from alignment_operator import handlers
    controller.process(KEY)
    written = cluster.body  # the operator's own write: the watch echoes it
    assert controller.queue.get(timeout=0) is None
    handlers.on_run(namespace="ns", name="tiny", type="MODIFIED", event={"object": written})
    assert controller.queue.get(timeout=0) is None, "the echo of our own status write is no news"
    edited = {**written, "metadata": {**written["metadata"], "resourceVersion": str(cluster.rv + 1)}}
    handlers.on_run(namespace="ns", name="tiny", type="MODIFIED", event={"object": edited})
    assert controller.queue.get(timeout=0) == KEY
    controller.queue.done(KEY)
    job = controller.cache.children(*KEY)[0][0]
    handlers.on_job(type="MODIFIED", event={"object": job})
    assert controller.queue.get(timeout=0) is None, "the Job as we created it: no news"
    handlers.on_job(type="MODIFIED", event={"object": {**job, "metadata": {**job["metadata"], "resourceVersion": "2"}}})
    assert controller.queue.get(timeout=0) == KEY
    controller.queue.done(KEY)
    handlers.on_run(namespace="ns", name="tiny", type="DELETED", event={"object": edited})
    assert controller.cache.sizes() == {"runs": 0, "children": 0, "pods": 0, "finished": 0}
    assert controller.queue.sizes()["delayed"] == 0 and controller.queue.failures(KEY) == 0


def test_every_request_has_a_timeout_unless_it_names_one(monkeypatch):
    from kubernetes import client
    api = client.ApiClient(client.Configuration())
    seen = []
    monkeypatch.setattr(api.rest_client, "request",
                        lambda method, url, *a, _request_timeout=None, **k: seen.append(_request_timeout))
    kube._with_timeout(api)
    api.rest_client.GET("https://127.0.0.1:1/api")
    api.rest_client.GET("https://127.0.0.1:1/api", _request_timeout=5)
    assert seen == [kube.REQUEST_TIMEOUT, 5]


def test_the_cache_keeps_a_run_without_what_nothing_reads():
    from alignment_operator.cache import LAST_APPLIED
    cache = Cache()
    spec = {"stages": [{"name": "sft"}]}
    body = {"spec": spec, "metadata": {
        "name": "tiny", "namespace": "ns", "resourceVersion": "3", "managedFields": [{"manager": "kubectl"}],
        "annotations": {LAST_APPLIED: '{"spec": ' + "x" * 4000 + "}", RETRY_ANNOTATION: "1"}}}
    assert cache.put_run(body)
    kept = cache.run("ns", "tiny")["metadata"]
    assert kept["annotations"] == {RETRY_ANNOTATION: "1"} and "managedFields" not in kept
    assert body["metadata"]["annotations"][LAST_APPLIED], "the watch's own dict is not changed"


def test_the_fault_hook_is_inert_unless_named_and_refuses_what_it_does_not_know():
    """ALIGNMENT_FAULT (tests/cluster/test_api_faults.py kills the operator with it) names one write;
    unset it does nothing, a typo fails the start instead of a test that silently kills nothing,
    and the chart never sets it."""
    assert kube._fault("") == "" and kube._fault("after:create:Job") == "create:Job"
    assert kube._fault("after:write:status") == "write:status"
    for bad in ("create:Job", "after:create:Pod", "after:write:spec"):
        with pytest.raises(ValueError, match="after:<point>"):
            kube._fault(bad)
    kube._after("create:Job")  # unset in this process: still alive
    chart = Path(__file__).resolve().parents[2] / "charts" / "alignment-operator"
    assert not [p for p in chart.rglob("*") if p.is_file() and kube.FAULT_ENV in p.read_text(errors="replace")]


def test_a_jobsets_disruptions_are_counted_traced_and_capped_as_a_jobs_are():
    """JobSet restarts every rank after a disruption without counting it (RestartJobSetAndIgnoreMaxRestarts):
    its restarts that do not count towards maxRestarts are the stage's disruptions."""
    from alignment_operator import observe
    from alignment_operator.reconcile import DeleteChild, reconcile

    def jobset(restarts, counted, pods=()):
        return observe.jobset({"metadata": {"name": "tiny-sft", "uid": "j1", "labels": {LABEL_STAGE: "sft"}},
                               "status": {"restarts": restarts, "restartsCountTowardsMax": counted,
                                          "replicatedJobsStatus": [{"name": "ranks", "active": 2}]}}, list(pods))
    evicted = {"metadata": {"name": "tiny-sft-ranks-0-1"}, "status": {"phase": "Failed", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI", "message": "evicted"}]}}
    assert (jobset(1, 1).disruptions, jobset(0, 0).disruptions) == (0, 0)  # a counted restart is a failure
    out = reconcile(_disrupted_run(limit=2), 1, {"sft": jobset(2, 1, [evicted])}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.disruptions) == ("Running", 1)
    traced, = [a for a in out.actions if getattr(a, "reason", None) == "StageDisrupted"]
    assert "JobSet tiny-sft restarted every rank (pod tiny-sft-ranks-0-1: EvictionByEvictionAPI: evicted)" \
        in traced.message and "disruption 1 of at most 2" in traced.message
    out = reconcile(_disrupted_run(limit=2), 1, {"sft": jobset(4, 1)}, NOW)
    sft = out.status.stages[0]
    assert (sft.phase, sft.reason, sft.disruptions) == ("Failed", "TooManyDisruptions", 3)
    assert DeleteChild("sft", "tiny-sft", "JobSet", "j1") in out.actions


def test_a_replica_kopf_peering_paused_reconciles_nothing_until_resumed(monkeypatch):
    """kopf stops a paused replica's watch streams, not the controller's requeues and resyncs: its
    workers read kopf's peering toggle (handlers.py wraps kopf's peering handler, where kopf's
    orchestration looks it up) and keep their keys until it is off."""
    import asyncio
    import threading
    import time

    from kopf._cogs.aiokits.aiotoggles import Toggle
    from kopf._core.engines import peering as kopf_peering

    from alignment_operator import handlers

    assert kopf_peering.process_peering_event is handlers._peering_event
    seen = []

    async def kopf_handler(**kwargs):
        seen.append(kwargs)
    monkeypatch.setattr(handlers, "_kopf_peering_event", kopf_handler)
    monkeypatch.setattr(handlers, "_toggles", set())
    monkeypatch.setattr(controller, "_pauses", [])
    toggle = Toggle(True)  # kopf's: on while a replica of higher priority lives
    for _ in range(2):
        asyncio.run(handlers._peering_event(raw_event={}, conflicts_found=toggle))
    assert len(seen) == 2 and seen[0]["conflicts_found"] is toggle and len(controller._pauses) == 1

    done = []
    monkeypatch.setattr(controller, "queue", WorkQueue())
    monkeypatch.setattr(controller, "process", lambda key: done.append(key))
    monkeypatch.setattr(controller, "PAUSED_POLL", 0.1)
    worker = threading.Thread(target=controller._work, daemon=True)
    worker.start()
    controller.queue.add(KEY)  # a resync come due
    time.sleep(0.5)
    assert done == [] and controller.queue.sizes()["delayed"] == 1, "paused: kept, not reconciled"
    asyncio.run(toggle.turn_to(False))  # the other replica is gone: kopf resumes this one
    deadline = time.monotonic() + 5
    while not done and time.monotonic() < deadline:
        time.sleep(0.05)
    controller.queue.shut_down()
    worker.join(5)
    assert done == [KEY]


# ---------------------------------------------------------------------------------- stale copies

def _hang_run_bodies(cluster, monkeypatch, reported_s_ago: float) -> tuple[dict, list[str]]:
    """The cache's copy of the run: sft Running, its last report 100 s old (hangTimeoutSeconds 60: hung). The API
    server's copy (rv one newer) has the report the progress endpoint patched in since, `reported_s_ago` old.
    Returns the server's body and the names of the runs GET read."""
    from datetime import datetime, timedelta

    from alignment_operator.reconcile import ObservedChild

    def progress(ago: float) -> dict:
        t = datetime.fromisoformat(NOW.replace("Z", "+00:00")) - timedelta(seconds=ago)
        return {"step": 5, "totalSteps": 100, "percent": 5, "lastUpdated": t.strftime("%Y-%m-%dT%H:%M:%S.000Z")}

    spec = {**cluster.body["spec"]}
    spec["stages"] = [{**spec["stages"][0], "hangTimeoutSeconds": 60}, *spec["stages"][1:]]
    stages = [{"name": "sft", "phase": "Running", "jobName": "tiny-sft-1", "attempts": 1,
               "startTime": "2026-11-21T11:50:00Z", "progress": progress(100)},
              {"name": "dpo", "phase": "Pending"}, {"name": "eval", "phase": "Pending"}]
    cached = {**cluster.body, "spec": spec, "status": {"phase": "Running", "stages": stages},
              "metadata": {**cluster.body["metadata"], "resourceVersion": "20"}}
    controller.cache.put_run(cached)
    server = {**cached, "status": {"phase": "Running", "stages": [{**stages[0], "progress": progress(reported_s_ago)},
                                                                  *stages[1:]]},
              "metadata": {**cached["metadata"], "resourceVersion": "21"}}
    cluster.body, cluster.rv, reads = server, 21, []
    monkeypatch.setattr(kube, "get_run", lambda ns, name: reads.append(name) or cluster.body)
    monkeypatch.setattr(controller, "_children", lambda body, status: {"sft": ObservedChild(
        "sft", "tiny-sft-1", "Running", attempts=1, uid="job-uid", created="2026-11-21T11:50:00Z")})
    return server, reads


def test_a_hang_seen_on_a_stale_copy_of_the_run_deletes_nothing(cluster, monkeypatch):
    """The cache's copy says no report for 100 s (hangTimeoutSeconds 60); the API server has the report the
    progress endpoint wrote 2 s ago (its watch event not in yet). The delete is decided on the server's copy:
    no Job deleted, no restart counted."""
    _, reads = _hang_run_bodies(cluster, monkeypatch, reported_s_ago=2)
    controller.process(KEY)
    assert reads == ["tiny", "tiny"], "read afresh before the delete, and decided again on that copy"
    assert cluster.deleted == [], cluster.deleted
    assert all(not s["stages"][0].get("restarts") for s in cluster.writes), cluster.writes
    assert controller.queue.sizes()["delayed"] == 1, "looked at again when the hang timeout would end"


def test_a_hang_the_api_servers_copy_confirms_is_restarted(cluster, monkeypatch):
    """The same, the server's copy as silent (its report 100 s old too, a newer rv for another field): the
    restart goes ahead (the check above is no check that cannot fail)."""
    _, reads = _hang_run_bodies(cluster, monkeypatch, reported_s_ago=100)
    controller.process(KEY)
    assert reads == ["tiny", "tiny"] and cluster.deleted == ["tiny-sft-1"], (reads, cluster.deleted)
    sft = cluster.writes[-1]["stages"][0]
    assert sft["restarts"] == 1 and sft["lastRestart"].startswith("Hang: no progress or heartbeat for 100s"), sft


def test_a_run_deleted_while_it_is_reconciled_is_forgotten_not_an_error(cluster, monkeypatch):
    """Its status write answers 404 (the run, or its namespace, was deleted mid-reconcile): no error is
    counted, nothing is requeued, nothing of it stays in memory. A 404 while the run is still there
    (a child gone) is an error, waited on as any other."""
    from alignment_operator import metrics

    errors = lambda: metrics.RECONCILE_ERRORS._value.get()  # noqa: E731
    cluster.fail_status = api_error(404, 'alignmentruns.alignment.dev "tiny" not found')
    before = errors()
    controller.process(KEY)  # the run is still there: waited on
    assert errors() == before + 1 and controller.queue.sizes()["delayed"] == 1
    assert cluster.created, "the reconcile ran up to its status write"

    monkeypatch.setattr(kube, "get_run", lambda ns, name: None)  # now deleted
    controller.process(KEY)
    assert errors() == before + 1, "a run deleted under its reconcile is no reconcile error"
    assert controller.queue.sizes()["delayed"] == 0 and controller.queue.failures(KEY) == 0
    assert controller.cache.sizes() == {"runs": 0, "children": 0, "pods": 0, "finished": 0}
