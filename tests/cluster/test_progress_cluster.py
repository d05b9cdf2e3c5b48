"""Live progress against the real control plane: the operator as a process serving its HTTPS
progress endpoint, real trainer processes on the host pushing to it with tokens the API server
minted for the stage's audience (what the kubelet projects into the stage's pod), and
TokenReview deciding. `kubectl get ar` shows the percent rise; the numbers match metrics.jsonl;
transformers' own KubeflowCallback, unchanged, reaches the status too; tokens for anything else
and bodies that are not reports change nothing; writes stay under one per stage per 5 s.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from kubernetes import client, watch

from controlplane import free_port
from kubelet import DPO, SFT, apply_tiny, column_of, get_run, jobs, play_kubelet, result_message, stage, wait_for
from operator_process import Operator

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
AUDIENCE = "progress.alignment.dev/{ns}/{name}"


@pytest.fixture
def operator(cluster, crds, namespace, tmp_path):
    port = free_port()
    op = Operator(cluster.kubeconfig, namespace, tmp_path / "operator.log", extra_env={
        "ALIGNMENT_PROGRESS_PORT": str(port), "ALIGNMENT_PROGRESS_URL": f"https://127.0.0.1:{port}"}).start()
    op.progress_port = port
    yield op
    op.stop()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """`alignctl tiny-model`'s model, made in this process (its trainer tests import transformers anyway: a
    process of its own cost 10-20 s of CPU more)."""
    from alignment_trainer.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


def stage_wiring(api, ns: str, job: str, tmp_path: Path) -> tuple[str, Path]:
    """The URL and the CA the operator rendered into the stage's pod (the CA as a file here)."""
    pod = client.BatchV1Api(api).read_namespaced_job(job, ns).spec.template.spec
    env = {e.name: e.value for e in pod.containers[0].env}
    volume = next(v for v in pod.volumes if v.name == "progress")
    assert pod.automount_service_account_token is False
    assert volume.projected.sources[0].service_account_token.audience == AUDIENCE.format(ns=ns, name=job)
    cm = client.CoreV1Api(api).read_namespaced_config_map(f"{job}-recipe", ns)
    ca = tmp_path / f"{job}-ca.crt"
    ca.write_text(cm.data["progress-ca.crt"])
    return env["KUBEFLOW_TRAINER_SERVER_URL"], ca


def token(cluster, ns: str, audience: str) -> str:
    """A token for `audience`, bound to the pod of the stage Job the audience names when there is one
    (what the kubelet projects into it: the endpoint accepts only a token of the stage's own pod)."""
    job = audience.rsplit("/", 1)[1]
    pods = client.CoreV1Api(cluster.api_client()).list_namespaced_pod(
        ns, label_selector=f"batch.kubernetes.io/job-name={job}").items
    bound = ["--bound-object-kind=Pod", f"--bound-object-name={pods[0].metadata.name}",
             f"--bound-object-uid={pods[0].metadata.uid}"] if pods else []
    return cluster.kubectl("create", "token", "default", "-n", ns, f"--audience={audience}",
                           "--duration=10m", *bound).stdout.strip()


def train(tmp_path: Path, method: str, model: Path, url: str, ca: Path, token_text: str, steps: int,
          **env) -> subprocess.Popen:
    """A real trainer process on the host, pushing as a stage pod would."""
    d = tmp_path / method
    d.mkdir()
    data = ROOT / "examples/data" / ("sft.jsonl" if method == "sft" else "prefs.jsonl")
    recipe = {"method": method, "model": {"model_name_or_path": str(model), "torch_dtype": "float32"},
              "datasets": [{"path": str(data)}], "output_dir": str(d / "out"), "stage_name": method,
              "training": {"max_steps": steps, "learning_rate": 5e-4, "per_device_train_batch_size": 8,
                           "max_length": 64, "logging_steps": 2, "save_steps": 1000, "beta": 0.1,
                           "warmup_ratio": 0.0},
              "termination_message_path": str(d / "termination-log")}
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (d / "token").write_text(token_text)
    return subprocess.Popen([sys.executable, "-m", "alignment_trainer", str(d / "recipe.yaml")], env={
        **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        "KUBEFLOW_TRAINER_SERVER_URL": url, "KUBEFLOW_TRAINER_SERVER_CA_CERT": str(ca),
        "KUBEFLOW_TRAINER_SERVER_TOKEN": str(d / "token"), **env},
        stdout=(d / "log.txt").open("w"), stderr=subprocess.STDOUT, cwd=d)


def finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    code = proc.wait(timeout)
    log = Path(proc.args[-1]).parent / "log.txt"
    assert code == 0, log.read_text()[-4000:]


def metrics_rows(tmp_path: Path, method: str) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / method / "out" / "metrics.jsonl").read_text().splitlines()]


def post(url: str, ca: Path, token_text: str | None, data: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", **({"Authorization": f"Bearer {token_text}"} if token_text else {})})
    try:
        with urllib.request.urlopen(request, timeout=10, context=ssl.create_default_context(cafile=str(ca))) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (ConnectionResetError, BrokenPipeError, urllib.error.URLError) as e:  # 413 closes early
        return 0, str(e)


def report(sent: datetime | None = None, percent: int = 50) -> bytes:
    return json.dumps({"trainerStatus": {"progressPercentage": percent, "lastUpdatedTime": (
        sent or datetime.now(timezone.utc)).isoformat(), "metrics": [{"name": "loss", "value": "0.1"}]}}).encode()


def jwt(claims: dict, key) -> str:
    """An ES256 JWT (the test control plane's service-account keys are P-256)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    head = b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    r, s = decode_dss_signature(key.sign(head.encode(), ec.ECDSA(hashes.SHA256())))
    return head + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


class Writes:
    """Every change of one stage's status.progress, as a watch of the run sees it."""

    def __init__(self, api, ns: str, run: str, stage_name: str):
        self.seen: list[tuple[float, dict]] = []
        self._stop = threading.Event()

        def loop():
            w = watch.Watch()
            last = None
            while not self._stop.is_set():
                for ev in w.stream(client.CustomObjectsApi(api).list_namespaced_custom_object, "alignment.dev",
                                   "v1alpha1", ns, "alignmentruns", field_selector=f"metadata.name={run}",
                                   timeout_seconds=5):
                    p = next((s.get("progress") for s in (ev["object"].get("status") or {}).get("stages", [])
                              if s["name"] == stage_name), None)
                    if p and p != last:
                        self.seen.append((time.monotonic(), p))
                        last = p
                    if self._stop.is_set():
                        break

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def stop(self):
        self._stop.set()
        self.thread.join(15)


def test_pushes_reach_the_run_status_and_the_progress_column(cluster, operator, namespace, tiny_model, tmp_path):
    ns, api = namespace, cluster.api_client()
    apply_tiny(cluster, ns)
    wait_for("the sft Job", lambda: SFT in jobs(api, ns))
    wait_for("sft Running", lambda: stage(get_run(api, ns, "tiny"), "sft").get("phase") == "Running")

    # 1. transformers' own KubeflowCallback, unchanged (ALIGNMENT_PROGRESS_CALLBACK=transformers
    #    keeps it in place of ours), on the sft stage.
    url, ca = stage_wiring(api, ns, SFT, tmp_path)
    proc = train(tmp_path, "sft", tiny_model, url, ca, token(cluster, ns, AUDIENCE.format(ns=ns, name=SFT)),
                 steps=30, ALIGNMENT_PROGRESS_CALLBACK="transformers")
    finish(proc)
    sft_rows = metrics_rows(tmp_path, "sft")
    p = wait_for("the stock callback's 100%", timeout=15, fn=lambda: (
        lambda p: p if p and p["percent"] == 100 else None)(stage(get_run(api, ns, "tiny"), "sft").get("progress")))
    assert (p["step"], p["totalSteps"]) == (30, 30)
    assert p["loss"] == pytest.approx([r["loss"] for r in sft_rows if "loss" in r][-1], rel=1e-5)
    # The stock callback's last report carries the trainer's summary row: the run's average tokens/s.
    summary_row = next((r for r in reversed(sft_rows) if "train_tokens_per_second" in r), sft_rows[-1])
    assert p["tokensPerSecond"] == pytest.approx(summary_row.get("train_tokens_per_second"), rel=1e-5), (p, sft_rows[-3:])

    # 2. sft done (as a kubelet would report it): dpo starts; pushes of anything else change nothing.
    play_kubelet(api, ns, SFT, 0, result_message("sft", train_loss=1.0))
    wait_for("the dpo Job", lambda: DPO in jobs(api, ns))
    wait_for("dpo Running", lambda: stage(get_run(api, ns, "tiny"), "dpo").get("phase") == "Running")
    url, ca = stage_wiring(api, ns, DPO, tmp_path)
    before = get_run(api, ns, "tiny")
    sa = client.CoreV1Api(api).read_namespaced_service_account("default", ns)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from cryptography.hazmat.primitives.asymmetric import ec

    sa_key = load_pem_private_key((cluster.workdir / "pki" / "sa.key").read_bytes(), None)
    now = int(time.time())
    claims = {"iss": "https://kubernetes.default.svc.cluster.local", "aud": [AUDIENCE.format(ns=ns, name=DPO)],
              "sub": f"system:serviceaccount:{ns}:default", "iat": now - 3600, "nbf": now - 3600, "exp": now - 1200,
              "jti": str(uuid.uuid4()),
              "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": "default", "uid": sa.metadata.uid}}}
    refused = {
        "another run's token": (token(cluster, ns, AUDIENCE.format(ns=ns, name="other-dpo")), report()),
        "another namespace's token": (token(cluster, "default", AUDIENCE.format(ns="default", name=DPO)),
                                      report()),
        "a forged token": (jwt({**claims, "exp": now + 600}, ec.generate_private_key(ec.SECP256R1())), report()),
        "a token past expiry": (jwt(claims, sa_key), report()),
        "no token": (None, report()),
    }
    good = token(cluster, ns, AUDIENCE.format(ns=ns, name=DPO))
    refused["a 1 MB body"] = (good, b'{"trainerStatus": {"x": "' + b"a" * (1 << 20) + b'"}}')
    refused["garbage"] = (good, b"\x00\xffnot json")
    refused["a percent of 250"] = (good, report(percent=250))
    codes = {what: post(url, ca, tok, data) for what, (tok, data) in refused.items()}
    assert {k: c for k, (c, _) in codes.items()} == {
        "another run's token": 401, "another namespace's token": 401, "a forged token": 401,
        "a token past expiry": 401, "no token": 401, "a 1 MB body": 413, "garbage": 400, "a percent of 250": 400}, codes
    assert "expired" in codes["a token past expiry"][1] or "token refused" in codes["a token past expiry"][1]
    after = get_run(api, ns, "tiny")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert stage(after, "dpo").get("phase") == "Running" and "progress" not in stage(after, "dpo")

    # 3. our callback on dpo: watch the PROGRESS column and every status write while it trains.
    writes = Writes(api, ns, "tiny", "dpo")
    started = time.monotonic()
    proc = train(tmp_path, "dpo", tiny_model, url, ca, good, steps=300)  # ~30 s: several 5 s windows
    column = []
    while proc.poll() is None and time.monotonic() - started < 600:
        text = column_of(cluster.kubectl("get", "ar", "tiny", "-n", ns).stdout, "PROGRESS")
        if text and (not column or column[-1] != text):
            column.append(text)
        time.sleep(1)
    finish(proc)
    trained = time.monotonic() - started
    final = wait_for("dpo's 100%", timeout=15, fn=lambda: (
        lambda p: p if p and p["percent"] == 100 else None)(stage(get_run(api, ns, "tiny"), "dpo").get("progress")))
    time.sleep(1)
    writes.stop()

    percents = [int(t.split()[1].rstrip("%")) for t in column if t.startswith("dpo ") and "%" in t]
    rises = sum(b > a for a, b in zip(percents, percents[1:]))
    assert rises >= 3, column
    assert percents == sorted(percents), column
    assert any("ETA" in t for t in column), column
    rows = metrics_rows(tmp_path, "dpo")
    logged = [r for r in rows if "loss" in r]
    assert (final["step"], final["totalSteps"]) == (300, 300)
    assert final["loss"] == pytest.approx(logged[-1]["loss"], rel=1e-5)
    assert final["rewardMargin"] == pytest.approx(logged[-1]["rewards/margins"], rel=1e-5)
    assert final["rewardAccuracy"] == pytest.approx(logged[-1]["rewards/accuracies"], rel=1e-5)
    assert final["tokensPerSecond"] > 0
    described = cluster.kubectl("describe", "ar", "tiny", "-n", ns).stdout  # the per-stage numbers
    for field in ("Percent:", "Total Steps:", "Eta Seconds:", "Reward Margin:", "Reward Accuracy:", "Tokens Per Second:"):
        assert field in described, (field, described[-3000:])
    # Each write in between matched the trainer's own log at its step.
    by_step = {r["step"]: r for r in logged}
    for _, p in writes.seen:
        if p.get("step") in by_step and p.get("loss") is not None and p["step"] % 2 == 0:
            assert p["loss"] == pytest.approx(by_step[p["step"]]["loss"], rel=1e-5), (p, by_step[p["step"]])

    # 4. At most one write per stage per 5 s (watch arrival jitter allowed), counted two ways.
    gaps = [b[0] - a[0] for a, b in zip(writes.seen, writes.seen[1:])]
    assert len(writes.seen) >= 4 and min(gaps) > 4.5, gaps
    text = operator.metrics()
    total = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("alignment_progress_status_writes_total "))
    assert total <= (trained + 30) / 5 + 2, (total, trained)  # sft's and dpo's writes together

    # 5. A replayed report is refused and changes nothing.
    rv = get_run(api, ns, "tiny")["metadata"]["resourceVersion"]
    sent = datetime.fromisoformat(final["lastUpdated"].replace("Z", "+00:00"))
    code, said = post(url, ca, good, report(sent, percent=10))
    assert code == 409 and "replay" in said
    assert get_run(api, ns, "tiny")["metadata"]["resourceVersion"] == rv
    print(f"\nPROGRESS column while dpo trained ({trained:.0f}s): {column}\n"
          f"status writes seen: {len(writes.seen)}, gaps {[round(g, 1) for g in gaps]}; "
          f"operator counter {total:.0f}; refusals {codes}")
