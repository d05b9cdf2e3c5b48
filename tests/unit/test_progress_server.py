"""The operator's two ports against clients that misbehave, on loopback only: connection caps,
timeouts, rate limits and generic error bodies (listener.py); the progress endpoint's token
checks (a pod of the stage's own child, garbage refused without a TokenReview, refusals
remembered), clamped timestamps, bounded state; the installation's CA in one Secret and a
certificate reloaded when its files change."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from alignment_operator import metrics
from alignment_operator.api import parse_run
from alignment_operator.listener import Limits, Listener, Loop, RateLimiter
from alignment_operator.progress import Refused, audience, rfc3339_ms, status_path
from alignment_operator.progress_server import (POD_NAME, POD_UID, CertWatcher, Progress, installation_tls,
                                                needs_renewal, self_signed, serve, sign)
from alignment_operator.identity import LABEL_RUN, LABEL_STAGE, child_name

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"   # loopback only: nothing here reaches another address


@pytest.fixture(scope="module")
def loop():
    return Loop()


def jwt(aud: str, ns: str = "ns", exp: float = 4102444800, pod: bool = True) -> str:
    claims = {"aud": [aud], "exp": exp, "kubernetes.io": {"namespace": ns, **({"pod": {"name": "p"}} if pod else {})}}
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{part({'alg': 'RS256'})}.{part(claims)}.sig"


class Cluster:
    """A run `tiny` in namespace ns whose dpo stage runs; its Job's pod `stage-pod`; another pod
    `other-pod` in the same namespace (e.g. a notebook) that can mint tokens for any audience."""

    def __init__(self, phase: str = "Running"):
        doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
        doc["metadata"].update(namespace="ns", uid="u1")
        doc["status"] = {"stages": [{"name": "sft", "phase": "Succeeded"}, {"name": "dpo", "phase": phase},
                                    {"name": "eval", "phase": "Pending"}]}
        self.run, self.writes, self.reviews = doc, [], []
        self.job = child_name(parse_run(doc), "dpo")
        self.aud = audience("ns", self.job)
        self.pods = {
            "stage-pod": {"metadata": {"name": "stage-pod", "uid": "uid-1", "labels": {LABEL_RUN: "tiny", LABEL_STAGE: "dpo"},
                                       "ownerReferences": [{"kind": "Job", "name": self.job, "controller": True}]}},
            "other-pod": {"metadata": {"name": "other-pod", "uid": "uid-2", "labels": {"app": "notebook"}}},
            "sft-pod": {"metadata": {"name": "sft-pod", "uid": "uid-3", "labels": {LABEL_RUN: "tiny", LABEL_STAGE: "sft"},
                                     "ownerReferences": [{"kind": "Job", "name": child_name(parse_run(doc), "sft"),
                                                          "controller": True}]}},
        }
        self.minted: dict[str, str] = {}   # token -> the pod it is bound to (what the API server knows)
        self.clock = 100.0

    def mint(self, pod: str | None, aud: str | None = None) -> str:
        token = f"{jwt(aud or self.aud)}{len(self.minted)}"  # each token its own signature
        self.minted[token] = pod
        return token

    def review(self, token, aud):
        self.reviews.append(aud)
        if token not in self.minted:
            return {"authenticated": False, "username": None, "audiences": [], "error": "invalid bearer token",
                    "extra": {}}
        pod = self.minted[token]
        extra = {POD_NAME: [pod], POD_UID: [self.pods[pod]["metadata"]["uid"]]} if pod else {}
        return {"authenticated": True, "username": "system:serviceaccount:ns:default", "audiences": [aud],
                "error": None, "extra": extra}

    def get_run(self, ns, name):
        return self.run if (ns, name) == ("ns", "tiny") else None

    def get_pod(self, ns, name):
        return self.pods.get(name) if ns == "ns" else None

    def write(self, ns, run, index, stage, progress, text, phase="Running"):
        self.writes.append((stage, progress))
        self.run["status"]["stages"][index]["progress"] = progress
        return True

    def progress(self, **kw) -> Progress:
        return Progress(review=self.review, get_run=self.get_run, write=self.write, get_pod=self.get_pod,
                        clock=lambda: self.clock, later=lambda *a: None, **kw)


def report(sent: datetime, percent: int = 40) -> bytes:
    return json.dumps({"trainerStatus": {"progressPercentage": percent, "lastUpdatedTime": sent.isoformat()}}).encode()


# ---------------------------------------------------------------------------- who may push

def test_a_token_of_the_stages_own_pod_writes_progress():
    c = Cluster()
    said = c.progress().handle(status_path("ns", c.job), f"Bearer {c.mint('stage-pod')}",
                               report(datetime.now(timezone.utc)))
    assert said == {"accepted": True, "written": True} and [w[0] for w in c.writes] == ["dpo"]


@pytest.mark.parametrize("pod", ["other-pod", "sft-pod", None], ids=["another-pod", "another-stages-pod", "unbound"])
def test_a_token_for_the_stages_audience_from_any_other_pod_is_refused_naming_nothing(pod, caplog):
    """Any pod of the namespace may mint a token for the stage's audience: the review passes, the
    pod check refuses it, and the answer names neither the pod nor anything of the operator."""
    caplog.set_level(logging.INFO, logger="alignment_operator.progress")
    c = Cluster()
    ep = c.progress()
    token = f"Bearer {c.mint(pod)}"
    with pytest.raises(Refused) as e:
        ep.handle(status_path("ns", c.job), token, report(datetime.now(timezone.utc)))
    assert e.value.code == 401 and str(e.value) == f"token refused for audience {c.aud}"
    assert c.reviews == [c.aud] and c.writes == []
    assert any(str(pod) in r.getMessage() or "not bound" in r.getMessage() for r in caplog.records)  # the log says why
    with pytest.raises(Refused):  # refused again from memory: no second review
        ep.handle(status_path("ns", c.job), token, report(datetime.now(timezone.utc)))
    assert c.reviews == [c.aud]


@pytest.mark.parametrize("token", [
    "x", "a.b.c", jwt("progress.alignment.dev/ns/other"), jwt("AUD", exp=1000), jwt("AUD", ns="ns2"),
    jwt("AUD", pod=False)], ids=["not-jwt", "not-json", "other-audience", "expired", "other-namespace", "no-pod"])
def test_tokens_that_cannot_be_the_stages_cost_no_token_review(token):
    c = Cluster()
    token = token.replace("AUD", c.aud)
    with pytest.raises(Refused) as e:
        c.progress().authenticate(f"Bearer {token}", "ns", c.job)
    assert e.value.code == 401 and c.reviews == []


def test_a_report_dated_ahead_of_the_servers_clock_is_read_as_now():
    """A push dated 290 s ahead was accepted as such and locked the stage's real pushes out for
    290 s (each was 'not newer'); now it counts as sent at the server's time."""
    c = Cluster()
    ep, token = c.progress(), f"Bearer {c.mint('stage-pod')}"
    before = datetime.now(timezone.utc)
    ep.handle(status_path("ns", c.job), token, report(before + timedelta(seconds=290), 10))
    stored = datetime.fromisoformat(c.writes[-1][1]["lastUpdated"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= stored <= datetime.now(timezone.utc)
    time.sleep(0.01)
    c.clock += 10
    said = ep.handle(status_path("ns", c.job), token, report(datetime.now(timezone.utc), 20))
    assert said["written"] and c.writes[-1][1]["percent"] == 20


def beat(sent: datetime, rank: int) -> bytes:
    """A trainer process's alive beat (alignment_trainer.live.ProgressPush.beat_body)."""
    return json.dumps({"trainerStatus": {"metrics": [{"name": "rank", "value": str(rank)}],
                                         "lastUpdatedTime": sent.isoformat()}}).encode()


def test_each_ranks_beat_reaches_status_without_moving_the_hang_clock():
    """Every rank beats (issue 31): before the first report a beat is only remembered (no progress, no hang clock
    yet), the next report carries it; later beats reach progress.ranks throttled, lastUpdated stays the report's."""
    c = Cluster()
    ep, token, path = c.progress(), f"Bearer {c.mint('stage-pod')}", status_path("ns", c.job)
    t0 = datetime.now(timezone.utc) - timedelta(seconds=60)
    assert ep.handle(path, token, beat(t0, 1)) == {"accepted": True, "written": False} and c.writes == []
    ep.handle(path, token, report(t0 + timedelta(seconds=1)))
    (_, first), = c.writes
    assert first["ranks"] == {"1": t0.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"} and first["percent"] == 40
    c.clock += 10
    said = ep.handle(path, token, beat(t0 + timedelta(seconds=20), 0))
    c.clock += 1
    ep.handle(path, token, beat(t0 + timedelta(seconds=21), 1))  # within the interval: held for the next write
    ep.handle(path, token, beat(t0 + timedelta(seconds=2), 1))   # older than the one held: changes nothing
    c.clock += 10
    ep._flush(("ns", c.job), "tiny", "dpo")
    assert said == {"accepted": True, "written": True} and len(c.writes) == 3
    last = c.writes[-1][1]
    assert sorted(last["ranks"]) == ["0", "1"] and last["ranks"]["1"].startswith(
        (t0 + timedelta(seconds=21)).strftime("%Y-%m-%dT%H:%M:%S"))
    assert last["lastUpdated"] == first["lastUpdated"] and last["percent"] == 40  # the hang clock did not move


def test_a_late_report_of_an_earlier_attempts_pod_is_refused():
    """Found in CI: a stage restarted (a Job of the same name again); the first attempt's pod, starved of CPU, sent
    its last report (step 6 of 6, 100 %) after the second attempt had started, and it was written as the second
    attempt's progress. A report dated before the current attempt's start is an earlier attempt's: 409, status
    untouched; the attempt's own report goes on being written."""
    c = Cluster()
    ep, token, path = c.progress(), f"Bearer {c.mint('stage-pod')}", status_path("ns", c.job)
    started = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=30)
    c.run["status"]["stages"][1]["startTime"] = started.strftime("%Y-%m-%dT%H:%M:%SZ")
    with pytest.raises(Refused) as e:
        ep.handle(path, token, report(started - timedelta(seconds=18), percent=100))
    assert e.value.code == 409 and "older than stage dpo's current attempt" in str(e.value), e.value
    assert c.writes == [] and "progress" not in c.run["status"]["stages"][1]
    said = ep.handle(path, token, report(started + timedelta(seconds=20), percent=10))
    assert said == {"accepted": True, "written": True} and c.writes[-1][1]["percent"] == 10


def test_a_flush_that_comes_due_after_a_report_was_written_waits_its_own_interval():
    """Found in CI: a beat held back scheduled a flush for the end of the interval; the trainer's report came
    at that moment and was written; the flush ran 50 ms later with a newer beat and wrote again (two writes
    0.05 s apart). A flush looks at the throttle again: it waits a whole interval after the last write."""
    c = Cluster()
    timers = []
    ep = Progress(review=c.review, get_run=c.get_run, write=c.write, get_pod=c.get_pod, clock=lambda: c.clock,
                  later=lambda delay, fn, *args: timers.append((c.clock + delay, fn, args)))
    token, path = f"Bearer {c.mint('stage-pod')}", status_path("ns", c.job)
    t0 = datetime.now(timezone.utc) - timedelta(seconds=60)
    ep.handle(path, token, report(t0, percent=10))
    c.clock += 4.9
    ep.handle(path, token, beat(t0 + timedelta(seconds=4.9), 0))   # held: a flush at the interval's end
    (due, fn, args), = timers
    assert due == pytest.approx(105.0) and len(c.writes) == 1
    c.clock += 0.1
    ep.handle(path, token, report(t0 + timedelta(seconds=5), percent=20))  # due: written at once
    c.clock += 0.05
    ep.handle(path, token, beat(t0 + timedelta(seconds=5.05), 0))
    timers.pop()[1](*args)  # the first flush's timer fires now
    assert [w[1]["percent"] for w in c.writes] == [10, 20]  # no second write 0.05 s after the report's
    (due, fn, args), = timers
    assert due == pytest.approx(110.0)
    c.clock = due
    timers.pop()[1](*args)
    assert len(c.writes) == 3 and c.writes[-1][1]["ranks"]["0"] == rfc3339_ms(t0 + timedelta(seconds=5.05))


def test_what_the_endpoint_remembers_is_bounded_and_goes_with_the_stage():
    c = Cluster()
    ep = c.progress()
    path, token = status_path("ns", c.job), f"Bearer {c.mint('stage-pod')}"
    ep.handle(path, token, report(datetime.now(timezone.utc)))
    assert ep.sizes() == {"tokens": 1, "refused": 0, "names": 1, "slots": 1, "pending": 0}
    ep.forget_run("ns", "tiny")
    assert ep.sizes() == {"tokens": 0, "refused": 0, "names": 0, "slots": 0, "pending": 0}
    # a stage that ended: its next push is refused and its state dropped
    ep.handle(path, token, report(datetime.now(timezone.utc)))
    c.run["status"]["stages"][1]["phase"] = "Succeeded"
    with pytest.raises(Refused) as e:
        ep.handle(path, token, report(datetime.now(timezone.utc)))
    assert e.value.code == 409 and ep.sizes()["slots"] == 0 and ep.sizes()["names"] == 0
    # ten thousand refused tokens: remembered up to the bound
    for i in range(10_000):
        ep._refuse(f"digest-{i}")
    assert ep.sizes()["refused"] == 4096


def test_rate_limiter_allows_the_burst_then_the_rate():
    t = [0.0]
    r = RateLimiter(rate=2.0, burst=3.0, size=2, clock=lambda: t[0])
    assert [r.allow("a") for _ in range(4)] == [True, True, True, False]
    t[0] = 0.5
    assert r.allow("a") and not r.allow("a")
    r.allow("b"), r.allow("c")
    assert len(r) == 2  # at most `size` clients remembered


# ---------------------------------------------------------------------------- the listener, on loopback

def start(loop, handle, **limits) -> Listener:
    listener = Listener("test", handle, 0, HOST, limits=Limits(**limits))
    loop.call(listener.start())
    return listener


def get(port: int, source: str = HOST, path: str = "/") -> tuple[int, bytes]:
    """A GET from `source` (another loopback address stands for another client)."""
    with socket.create_connection((HOST, port), timeout=5, source_address=(source, 0)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def ok(request):
    return web.json_response({"ok": True})


def test_one_client_cannot_hold_more_than_its_share_of_connections(loop):
    listener = start(loop, ok, per_client=4, max_connections=64, idle_s=30, lifetime_s=30)
    idle = [socket.create_connection((HOST, listener.port)) for _ in range(20)]
    try:
        deadline = time.monotonic() + 5
        while listener.turned_away < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.turned_away == 16 and listener.open == 4
        assert get(listener.port, "127.0.0.2")[0] == 200  # another client is served meanwhile
    finally:
        for s in idle:
            s.close()
        loop.call(listener.stop())


def test_a_connection_that_sends_nothing_is_closed(loop):
    listener = start(loop, ok, idle_s=0.5, handshake_s=0.5, lifetime_s=30)
    try:
        with socket.create_connection((HOST, listener.port), timeout=5) as s:
            t0 = time.monotonic()
            assert s.recv(10) == b""  # closed by the server
            assert time.monotonic() - t0 < 3
        deadline = time.monotonic() + 2
        while listener.open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.open == 0
    finally:
        loop.call(listener.stop())


def test_a_client_over_its_rate_gets_429_and_an_error_names_nothing(loop):
    async def fails(request):
        raise RuntimeError("RBAC: system:serviceaccount:alignment-system:alignment-operator cannot get secrets")

    listener = start(loop, fails, rate=1.0, burst=3.0)
    try:
        codes = [get(listener.port) for _ in range(5)]
        assert [c for c, _ in codes] == [500, 500, 500, 429, 429]
        assert json.loads(codes[0][1]) == {"error": "internal error"}
        assert get(listener.port, "127.0.0.3")[0] == 500  # another client has its own rate
    finally:
        loop.call(listener.stop())


def test_metrics_are_served_within_limits(loop):
    listener = metrics.listener(0, HOST)
    loop.call(listener.start())
    try:
        code, body = get(listener.port, path="/metrics")
        assert code == 200 and b"alignment_progress_refused_total" in body
        assert get(listener.port, path="/other")[0] == 404
    finally:
        loop.call(listener.stop())


# ---------------------------------------------------------------------------- the endpoint over HTTPS

def push(port: int, ca: str, path: str, token: str | None, data: bytes) -> tuple[int, dict]:
    context = ssl.create_default_context(cadata=ca)
    request = urllib.request.Request(f"https://localhost:{port}{path}", data=data, method="POST", headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_endpoint_over_https_accepts_its_stage_and_refuses_floods_without_reviews(loop, monkeypatch):
    monkeypatch.delenv("ALIGNMENT_PROGRESS_TLS_SECRET", raising=False)
    c = Cluster()
    ep = c.progress()
    endpoint, listener = serve(0, "https://localhost", None, ["localhost"], ep, host=HOST, loop=loop)
    try:
        path, now = status_path("ns", c.job), datetime.now(timezone.utc)
        assert push(listener.port, endpoint.ca_pem, path, c.mint("stage-pod"), report(now)) == (
            200, {"accepted": True, "written": True})
        refused = [push(listener.port, endpoint.ca_pem, path, f"x{i}", report(now)) for i in range(10)]
        assert {r[0] for r in refused} == {401} and len(c.reviews) == 1  # garbage: no TokenReview
        big = push(listener.port, endpoint.ca_pem, path, "x", b"{" + b" " * (1 << 20) + b"}")
        assert big == (413, {"error": f"body is {(1 << 20) + 2} bytes; at most 65536"})  # read, not a reset
        ep.get_run = lambda ns, name: (_ for _ in ()).throw(RuntimeError("apiserver says: forbidden for sa x"))
        later = now + timedelta(seconds=1)
        assert push(listener.port, endpoint.ca_pem, path, c.mint("stage-pod"), report(later)) == (
            500, {"error": "internal error"})
    finally:
        loop.call(listener.stop())


# ---------------------------------------------------------------------------- certificates

class Store:
    """A Secret as kube.SecretStore sees it; `taken` plays another replica that created it first."""

    namespace, name = "alignment-system", "alignment-operator-progress-tls"

    def __init__(self, taken: dict | None = None):
        self.data, self.taken, self.writes = None, taken, 0

    def read(self):
        return self.data

    def create(self, data):
        if self.taken is not None:
            self.data = self.taken
            return None
        self.data, self.writes = dict(data), self.writes + 1
        return data

    def replace(self, data):
        self.data, self.writes = dict(data), self.writes + 1
        return data


def test_one_ca_per_installation_outlives_restarts_and_is_shared_by_replicas(tmp_path):
    store = Store()
    _, _, ca1 = installation_tls(tmp_path / "a", ["op.sys.svc"], store)
    _, _, ca2 = installation_tls(tmp_path / "b", ["op.sys.svc"], store)   # a restart, or a second replica
    assert ca1 == ca2 and store.writes == 1
    cert, _, _ = installation_tls(tmp_path / "b", ["op.sys.svc"], store)  # the hourly refresh: nothing new
    before = cert.stat().st_mtime_ns
    installation_tls(tmp_path / "b", ["op.sys.svc"], store)
    assert cert.stat().st_mtime_ns == before  # the files are not rewritten, so nothing is reloaded
    # Another replica created the Secret a moment before us: its CA is the one served.
    racing = Store(taken=store.data)
    _, _, ca3 = installation_tls(tmp_path / "c", ["op.sys.svc"], racing)
    assert ca3 == ca1
    # A certificate near its end is signed anew by the same CA; the stage pods' CA stays.
    chain, key = sign(store.data["ca.crt"], store.data["ca.key"], ["op.sys.svc"], days=10)
    store.data = {**store.data, "tls.crt": chain, "tls.key": key}
    assert needs_renewal(chain, ["op.sys.svc"]).startswith("expires")
    cert, _, ca4 = installation_tls(tmp_path / "d", ["op.sys.svc"], store)
    assert ca4 == ca1 and needs_renewal(cert.read_bytes(), ["op.sys.svc"]) is None and store.writes == 2
    assert needs_renewal(cert.read_bytes(), ["renamed.sys.svc"]) == "lacks ['renamed.sys.svc']"


def served_serial(port: int, ca: str) -> int:
    from cryptography import x509

    context = ssl.create_default_context(cadata=ca)
    with socket.create_connection((HOST, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_a_certificate_renewed_on_disk_is_served_without_a_restart(loop, tmp_path):
    cert, key, ca = self_signed(tmp_path / "tls", ["localhost"])
    (tmp_path / "tls" / "ca.crt").write_text(ca)
    _, listener = serve(0, "https://localhost", str(tmp_path / "tls"), [], Cluster().progress(), host=HOST, loop=loop)
    try:
        context = listener.ssl_context
        watcher = CertWatcher(context, cert, key)
        first = served_serial(listener.port, ca)
        assert watcher.check() is False   # nothing changed yet
        # A renewal written in place (a Secret volume's update, cert-manager's new certificate)
        new_cert, new_key, new_ca = self_signed(tmp_path / "renewed", ["localhost"])
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        assert watcher.check() is True and watcher.reloads == 1
        second = served_serial(listener.port, new_ca)
        assert second != first
    finally:
        loop.call(listener.stop())


def test_a_limit_comes_from_the_environment_and_a_bad_one_is_named(monkeypatch):
    monkeypatch.setenv("ALIGNMENT_PROGRESS_MAX_CONNECTIONS", "100")
    assert Limits.from_env("ALIGNMENT_PROGRESS", per_client=4) == Limits(max_connections=100, per_client=4)
    monkeypatch.setenv("ALIGNMENT_PROGRESS_RATE", "fast")
    with pytest.raises(SystemExit, match="ALIGNMENT_PROGRESS_RATE='fast': expected a float"):
        Limits.from_env("ALIGNMENT_PROGRESS")
