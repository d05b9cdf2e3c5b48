"""Live progress, operator side, without a cluster: the push contract (Kubeflow Trainer's body),
what it writes into status, throttling, replay and token checks, the pod's wiring, the column."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from alignment_operator.api import AlignmentRunStatus, StageProgress, StageStatus, parse_run
from alignment_operator.progress import (MAX_BODY_BYTES, Refused, Throttle, audience, eta_text, parse_path,
                                         parse_report, stage_progress, status_path, summary)
from alignment_operator.progress_server import POD_NAME, POD_UID, Progress
from alignment_operator.reconcile import ObservedChild, reconcile, stage_hash
from alignment_operator.identity import LABEL_RUN, LABEL_STAGE, child_name
from alignment_operator.render.manifests import RenderContext, build_stage

ROOT = Path(__file__).resolve().parents[2]
DPO = child_name(parse_run(yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())), "dpo")  # its Job
NOW = datetime(2026, 12, 1, 11, 0, tzinfo=timezone.utc)


def body(sent: datetime = NOW, percent=43, eta=7800, **metrics) -> bytes:
    """What transformers' KubeflowCallback._update_status sends (values are str(v))."""
    status = {"lastUpdatedTime": sent.isoformat(), "progressPercentage": percent, "estimatedRemainingSeconds": eta,
              "metrics": [{"name": k.replace("__", "/"), "value": str(v)} for k, v in metrics.items()]}
    return json.dumps({"trainerStatus": {k: v for k, v in status.items() if v is not None}}).encode()


def test_the_stock_callbacks_body_becomes_stage_progress():
    report = parse_report(body(loss=0.61, grad_norm=1.5, learning_rate=5e-7, current_step=43, total_steps=100,
                               current_epoch=0.43, rewards__margins=0.8, rewards__accuracies=0.75,
                               tokens_per_second=1234.5), NOW)
    p = stage_progress(report)
    assert (p.percent, p.step, p.total_steps, p.eta_seconds, p.epoch) == (43, 43, 100, 7800, 0.43)
    assert (p.loss, p.grad_norm, p.reward_margin, p.reward_accuracy, p.tokens_per_second) == (0.61, 1.5, 0.8, 0.75, 1234.5)
    assert p.last_updated == "2026-12-01T11:00:00.000Z"


def test_a_metric_missing_from_a_report_keeps_its_last_value_and_nan_is_dropped():
    first = stage_progress(parse_report(body(loss=0.7, current_step=10, total_steps=100), NOW))
    later = stage_progress(parse_report(body(NOW + timedelta(seconds=6), percent=None, eta=None, loss="nan",
                                             current_step=20, total_steps=100), NOW), first)
    assert (later.step, later.loss, later.percent) == (20, 0.7, 20)
    # KubeflowCallback.on_train_end: 100%, ETA 0, the logged metrics but no current_step.
    end = stage_progress(parse_report(body(NOW + timedelta(seconds=9), percent=100, eta=0, loss=0.5), NOW), later)
    assert (end.step, end.total_steps, end.loss, end.eta_seconds) == (100, 100, 0.5, 0)


@pytest.mark.parametrize("raw, code, words", [
    (b"not json", 400, "not JSON"),
    (b"[]", 400, "trainerStatus"),
    (json.dumps({"trainerStatus": {"progressPercentage": 43}}).encode(), 400, "lastUpdatedTime: required"),
    (body(percent=150), 400, "progressPercentage: 150"),
    (body(percent=True), 400, "progressPercentage"),
    (body(eta=-1), 400, "estimatedRemainingSeconds: -1"),
    (body(NOW + timedelta(hours=1)), 400, "in the future"),
    (json.dumps({"trainerStatus": {"lastUpdatedTime": NOW.isoformat(), "phase": "x"}}).encode(), 400, "unknown"),
    (json.dumps({"trainerStatus": {"lastUpdatedTime": NOW.isoformat(),
                                   "metrics": [{"name": "loss", "value": 1.0}]}}).encode(), 400, "metrics[0]"),
    (json.dumps({"trainerStatus": {"lastUpdatedTime": NOW.isoformat(),
                                   "metrics": [{"name": f"m{i}", "value": "1"} for i in range(65)]}}).encode(),
     400, "at most 64"),
    (b"{" + b" " * MAX_BODY_BYTES + b"}", 413, "at most"),
])
def test_garbage_is_refused_with_what_is_wrong(raw, code, words):
    with pytest.raises(Refused) as e:
        parse_report(raw, NOW)
    assert e.value.code == code and words in str(e.value)


def test_paths_are_kubeflow_trainers_and_nothing_else():
    assert parse_path(status_path("ml", "zephyr-dpo")) == ("ml", "zephyr-dpo")
    assert status_path("ml", "zephyr-dpo") == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs/zephyr-dpo/status"
    for bad in ("/", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ML/trainjobs/x/status",
                "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs/../status"):
        with pytest.raises(Refused) as e:
            parse_path(bad)
        assert e.value.code == 404


def test_column_text():
    st = [StageStatus(name="sft", phase="Succeeded"), StageStatus(name="dpo", phase="Running", progress=StageProgress(
        percent=43, eta_seconds=7800, last_updated="x")), StageStatus(name="eval")]
    assert summary(st, 1) == "dpo 43% ETA 2h10m"
    st[1].progress = None
    assert summary(st, 1) == "1/3"
    assert [eta_text(s) for s in (40, 95, 7800, 90000)] == ["40s", "1m35s", "2h10m", "1d1h"]


def test_throttle_lets_one_write_per_five_seconds_and_refuses_replays():
    t, key, writes = Throttle(), ("ns", DPO), []
    for i in range(100):  # a push every 0.1 s for 10 s
        now, sent = i * 0.1, NOW + timedelta(seconds=i * 0.1)
        t.check_fresh(key, sent, None)
        if t.offer(key, i, sent, now):
            t.wrote(key, now)
            writes.append(now)
    assert writes == [0.0, 5.0] and t.take(key) == 99  # the newest waits for its turn
    with pytest.raises(Refused) as e:
        t.check_fresh(key, NOW + timedelta(seconds=5), None)
    assert e.value.code == 409 and "replay" in str(e.value)
    with pytest.raises(Refused):  # after a restart the stored time still refuses it
        Throttle().check_fresh(key, NOW, "2026-12-01T11:00:00.000Z")


# ---------------------------------------------------------------------------- the endpoint's decisions

def run_body(phase="Running", progress=None):
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"].update(namespace="ns", uid="u1")
    doc["status"] = {"stages": [{"name": "sft", "phase": "Succeeded"},
                                {"name": "dpo", "phase": phase, **({"progress": progress} if progress else {})},
                                {"name": "eval", "phase": "Pending"}]}
    return doc


class Fake:
    def __init__(self, **run):
        self.run, self.writes, self.reviews, self.clock = run_body(**run), [], [], 100.0

    def review(self, token, aud):
        self.reviews.append((token, aud))
        ok = token == jwt(aud)
        return {"authenticated": ok, "username": "system:serviceaccount:ns:default" if ok else None,
                "audiences": [aud] if ok else [], "error": None if ok else "invalid bearer token",
                "extra": {POD_NAME: ["stage-pod"], POD_UID: ["pod-uid"]} if ok else {}}

    def get_pod(self, ns, name):  # the stage's pod, made by its Job (the path's last name)
        job = PATH.split("/")[-2]
        return {"metadata": {"name": name, "uid": "pod-uid", "labels": {LABEL_RUN: "tiny", LABEL_STAGE: "dpo"},
                             "ownerReferences": [{"kind": "Job", "name": job, "controller": True}]}}

    def get_run(self, ns, name):
        return self.run if (ns, name) == ("ns", "tiny") else None

    def write(self, ns, run, index, stage, progress, text, phase="Running"):
        assert self.run["status"]["stages"][index]["phase"] == phase  # what the patch's test op checks
        self.writes.append((self.clock, index, stage, progress, text))
        self.run["status"]["stages"][index]["progress"] = progress
        return True


def endpoint(fake):
    return Progress(review=fake.review, get_run=fake.get_run, write=fake.write, get_pod=fake.get_pod,
                    clock=lambda: fake.clock)


PATH = status_path("ns", DPO)


def jwt(aud: str, ns: str = "ns") -> str:
    """The shape of a pod's projected token (the fake review decides; the endpoint reads the claims
    only to refuse early)."""
    claims = {"aud": [aud], "exp": 4102444800, "kubernetes.io": {"namespace": ns, "pod": {"name": "stage-pod"}}}
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{part({'alg': 'RS256'})}.{part(claims)}.signature"


TOKEN = f"Bearer {jwt(audience('ns', PATH.split('/')[-2]))}"


def test_a_push_writes_the_stage_and_the_column():
    fake = Fake()
    said = endpoint(fake).handle(PATH, TOKEN, body(loss=0.5, current_step=43, total_steps=100))
    assert said == {"accepted": True, "written": True}
    (_, index, stage, progress, text), = fake.writes
    assert (index, stage, progress["percent"], progress["step"], text) == (1, "dpo", 43, 43, "dpo 43% ETA 2h10m")
    assert fake.reviews == [(TOKEN[len("Bearer "):], audience("ns", PATH.split("/")[-2]))]


@pytest.mark.parametrize("auth, code", [
    (None, 401), ("Basic abc", 401), ("Bearer forged", 401),
    (f"Bearer {jwt(audience('ns', 'other-dpo'))}", 401),   # another run's token
    (f"Bearer {jwt(audience('ns2', DPO), 'ns2')}", 401),   # the same run name in another namespace
])
def test_tokens_for_anything_else_are_refused_and_nothing_is_written(auth, code):
    fake = Fake()
    with pytest.raises(Refused) as e:
        endpoint(fake).handle(PATH, auth, body())
    assert e.value.code == code and fake.writes == []


def test_a_token_of_another_namespaces_service_account_is_forbidden():
    fake = Fake()
    fake.review = lambda token, aud: {"authenticated": True, "username": "system:serviceaccount:other:default",
                                      "audiences": [aud], "error": None}
    with pytest.raises(Refused) as e:
        endpoint(fake).handle(PATH, TOKEN, body())
    assert e.value.code == 403 and fake.writes == []


def test_pushes_to_a_stage_that_is_not_running_or_unknown_change_nothing():
    fake = Fake(phase="Succeeded")
    with pytest.raises(Refused) as e:
        endpoint(fake).handle(PATH, TOKEN, body())
    assert e.value.code == 409 and fake.writes == []
    path = status_path("ns", "tiny-nope")
    with pytest.raises(Refused) as e:
        endpoint(Fake()).handle(path, f"Bearer {jwt(audience('ns', 'tiny-nope'))}", body())
    assert e.value.code == 404


def test_a_replayed_body_is_refused():
    fake = Fake()
    ep = endpoint(fake)
    ep.handle(PATH, TOKEN, body())
    fake.clock += 10
    with pytest.raises(Refused) as e:
        ep.handle(PATH, TOKEN, body())
    assert e.value.code == 409 and len(fake.writes) == 1


def test_a_burst_of_pushes_makes_one_write_and_the_newest_follows_later():
    fake = Fake()
    ep = endpoint(fake)
    for i in range(20):
        ep.handle(PATH, TOKEN, body(NOW + timedelta(seconds=i * 0.1), percent=i))
        fake.clock += 0.1
    assert len(fake.writes) == 1 and ep.throttle.slots[("ns", DPO)].pending.percent == 19
    fake.clock = 200.0
    ep._flush(("ns", DPO), "tiny", "dpo")
    assert [w[3]["percent"] for w in fake.writes] == [0, 19]


def test_the_last_report_held_back_by_the_throttle_lands_after_the_stage_succeeded():
    """Found on the real node: the trainer's final 100% came within 5 s of the previous write, the
    pod exited and the stage was Succeeded before the held-back report's turn; it was dropped and the
    stage's progress stayed at 96%."""
    fake = Fake()
    ep = endpoint(fake)
    ep.handle(PATH, TOKEN, body(NOW, percent=96))
    fake.clock += 1
    ep.handle(PATH, TOKEN, body(NOW + timedelta(seconds=1), percent=100))
    assert [w[3]["percent"] for w in fake.writes] == [96]
    fake.run["status"]["stages"][1]["phase"] = "Succeeded"
    fake.clock += 5
    ep._flush(("ns", DPO), "tiny", "dpo")
    assert [w[3]["percent"] for w in fake.writes] == [96, 100]
    # A held-back report older than the end (96%, the final 100% refused after it): it lands as done.
    fake = Fake()
    ep = endpoint(fake)
    ep.handle(PATH, TOKEN, body(NOW, percent=90))
    fake.clock += 1
    ep.handle(PATH, TOKEN, body(NOW + timedelta(seconds=1), percent=96, eta=30))
    fake.run["status"]["stages"][1]["phase"] = "Succeeded"
    fake.clock += 5
    ep._flush(("ns", DPO), "tiny", "dpo")
    assert [(w[3]["percent"], w[3].get("etaSeconds")) for w in fake.writes] == [(90, 7800), (100, 0)]
    # ... but a push arriving after the stage ended is still refused.
    with pytest.raises(Refused) as e:
        ep.handle(PATH, TOKEN, body(NOW + timedelta(seconds=9), percent=100))
    assert e.value.code == 409 and len(fake.writes) == 2


# ---------------------------------------------------------------------------- pods and reconcile

def tiny():
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"].update(namespace="ns", uid="u1")
    return parse_run(doc)


def test_stage_pods_get_a_projected_token_for_their_stage_the_ca_and_the_url():
    ctx = RenderContext(progress_url="https://op.sys.svc:8443", progress_ca="-----BEGIN CERTIFICATE-----\n")
    cm, job = build_stage(tiny(), 1, ctx, "h")
    pod = job["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert pod["automountServiceAccountToken"] is False
    assert env["KUBEFLOW_TRAINER_SERVER_URL"] == (
        "https://op.sys.svc:8443/apis/trainer.kubeflow.org/v1alpha1/namespaces/ns/trainjobs/" + DPO + "/status")
    assert env["KUBEFLOW_TRAINER_SERVER_TOKEN"] == "/var/run/alignment/progress/token"
    assert env["KUBEFLOW_TRAINER_SERVER_CA_CERT"] == "/var/run/alignment/progress/ca.crt"
    volume = next(v for v in pod["volumes"] if v["name"] == "progress")
    token, ca = volume["projected"]["sources"]
    assert token == {"serviceAccountToken": {"audience": f"progress.alignment.dev/ns/{DPO}",
                                             "expirationSeconds": 3600, "path": "token"}}
    assert ca["configMap"]["name"] == cm["metadata"]["name"] and cm["data"]["progress-ca.crt"] == ctx.progress_ca
    # Without an endpoint nothing of it is rendered.
    _, plain = build_stage(tiny(), 1, RenderContext(), "h")
    assert "KUBEFLOW" not in json.dumps(plain)


def test_reconcile_keeps_a_stages_progress_and_shows_it_in_the_column():
    run = tiny()
    p = StageProgress(percent=43, step=43, total_steps=100, eta_seconds=7800, loss=0.5, last_updated="t")
    run.status = AlignmentRunStatus(phase="Running", stages=[
        StageStatus(name="sft", phase="Succeeded"),
        StageStatus(name="dpo", phase="Running", job_name=DPO, spec_hash=stage_hash(run, 1), progress=p),
        StageStatus(name="eval")])
    out = reconcile(run, 1, {"dpo": ObservedChild("dpo", DPO, "Running", 1)}, "2026-12-01T11:00:00Z")
    assert out.status.stages[1].progress == p and out.status.progress_summary == "dpo 43% ETA 2h10m"
    done = reconcile(run, 1, {"dpo": ObservedChild("dpo", DPO, "Succeeded", 1, result={"checkpoint": "/x",
                                                                                         "global_step": 100})},
                     "2026-12-01T11:00:00Z")
    # Succeeded: every step done, whatever the last report that landed said (found on the real node in
    # a CI run: sft Succeeded at 90%, its final push refused as it came after the stage's end).
    assert done.status.progress_summary == "2/3"
    assert done.status.stages[1].progress == p.model_copy(update={
        "percent": 100, "step": 100, "eta_seconds": 0, "work_at_risk_seconds": 0.0})


def test_the_self_signed_certificate_serves_a_services_long_name(tmp_path):
    """A CN holds 64 characters; <release>-alignment-operator-progress.<namespace>.svc.cluster.local is longer."""
    import ssl
    import socket
    import threading

    from alignment_operator.progress_server import self_signed

    host = "a-release-alignment-operator-progress.alignment-system-of-team-x.svc.cluster.local"
    cert, key, ca = self_signed(tmp_path, [host])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cadata=ca)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=lambda: server.wrap_socket(listener.accept()[0], server_side=True).close(),
                         daemon=True).start()
        with socket.create_connection(listener.getsockname()) as raw:
            with client.wrap_socket(raw, server_hostname=host) as tls:  # verifies chain and name
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
