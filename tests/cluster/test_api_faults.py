"""The operator under API faults, against the real control plane (the kubelet is played as in
test_operator.py): an admission webhook that answers 500 for a minute, the API server killed for
30 s mid-stage, the operator itself killed (SIGKILL) right after each kind of write it makes, and
status the API server could not take (a NaN in an eval result, a retry annotation longer than
status.retryRequest may be). Each ends with the run where it should be and saying what happened;
none needs another event to get there.
"""

from __future__ import annotations

import json
import re
import signal
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from kubernetes import client

from alignment_operator.progress_server import self_signed
from kubelet import DPO, EVAL, ROOT, SFT, child, get_run, play_kubelet, result_message, wait_for
from operator_process import Operator

pytestmark = pytest.mark.cluster
WEBHOOK = "jobs.faults.alignment.dev"
DOWN = "the policy service is restarting"


def apply_run(cluster, ns: str, **stage_fields) -> None:
    """examples/tiny-run.yaml into `ns`, with {stage: {field: value}} changed."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    for stage in doc["spec"]["stages"]:
        stage.update(stage_fields.get(stage["name"], {}))
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))


def stage_jobs(api, ns: str) -> dict[str, list[client.V1Job]]:
    """The run's Jobs by stage label (their names carry a hash)."""
    out: dict[str, list] = {}
    for j in client.BatchV1Api(api).list_namespaced_job(ns, label_selector="alignment.dev/run=tiny").items:
        out.setdefault(j.metadata.labels["alignment.dev/stage"], []).append(j)
    return out


def job_of(api, ns: str, stage: str, timeout: float = 60) -> client.V1Job:
    return wait_for(f"the {stage} Job", lambda: (stage_jobs(api, ns).get(stage) or [None])[0], timeout=timeout)


def status(api, ns: str) -> dict:
    return get_run(api, ns, "tiny").get("status") or {}


def condition(s: dict, kind: str) -> dict:
    return next((c for c in s.get("conditions") or [] if c["type"] == kind), {})


def run_events(api, ns: str) -> list:
    return client.CoreV1Api(api).list_namespaced_event(ns, field_selector="involvedObject.kind=AlignmentRun").items


# ---------------------------------------------------------------------------------- a failing webhook

class Webhook:
    """A validating admission webhook in the test process (HTTPS on 127.0.0.1): HTTP 500 while
    `failing`, else it allows everything. Counts the Job creates it saw."""

    def __init__(self, tmp_path):
        cert, key, self.ca = self_signed(tmp_path, ["127.0.0.1"])
        self.failing, self.calls, self.failed = True, 0, 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.calls += 1
                if hook.failing:
                    hook.failed += 1
                    body, code = DOWN.encode(), 500
                else:
                    body, code = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                             "response": {"uid": review["request"]["uid"], "allowed": True}}).encode(), 200
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if code == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def webhook(cluster, namespace, tmp_path):
    hook = Webhook(tmp_path)
    import base64
    name = f"faults-{namespace}"
    config = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
              "metadata": {"name": name},
              "webhooks": [{"name": WEBHOOK, "admissionReviewVersions": ["v1"], "sideEffects": "None",
                            "failurePolicy": "Fail", "timeoutSeconds": 5,
                            "clientConfig": {"url": f"https://127.0.0.1:{hook.port}/validate",
                                             "caBundle": base64.b64encode(hook.ca.encode()).decode()},
                            "rules": [{"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE"],
                                       "resources": ["jobs"]}],
                            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}]}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(config))
    yield hook
    cluster.kubectl("delete", "validatingwebhookconfiguration", name, "--ignore-not-found")
    hook.stop()


# A minute of this test is the webhook failing, with nothing to compute: scripts/test runs it (marker
# waits) in a process of its own beside the others, with the API server's 30 s outage below.
@pytest.mark.waits
def test_a_webhook_answering_500_for_a_minute_delays_the_job_and_the_run_says_why(
        cluster, operator, namespace, webhook):
    ns, api = namespace, cluster.api_client()
    started = time.monotonic()
    apply_run(cluster, ns)
    said = wait_for("a Reconciling message naming the webhook's error", lambda: (
        (c := condition(status(api, ns), "Reconciling")).get("reason") == "ApiServerError" and c), timeout=30)
    assert said["status"] == "True" and WEBHOOK in said["message"] and said["message"].startswith(
        "waiting: creating Job tiny-sft"), said
    assert status(api, ns)["phase"] == "Pending", "PHASE is not empty while it waits"
    assert webhook.failed >= 1 and "tiny" not in str(stage_jobs(api, ns))
    warned = [e for e in run_events(api, ns) if e.reason == "ApiServerError"]
    assert len(warned) == 1 and WEBHOOK in warned[0].message

    time.sleep(max(0.0, 60 - (time.monotonic() - started)))
    tries_while_down = webhook.failed
    assert tries_while_down >= 4, "it kept trying, with backoff"
    assert tries_while_down <= 16, f"{tries_while_down} tries in a minute: not backing off"
    still = condition(status(api, ns), "Reconciling")
    assert WEBHOOK in still["message"] and not stage_jobs(api, ns)
    webhook.failing = False
    recovered = time.monotonic()
    job = job_of(api, ns, "sft", timeout=40)
    took = time.monotonic() - recovered
    assert took <= 30, f"the Job came {took:.1f}s after the webhook recovered"
    s = wait_for("sft Running", lambda: ((s := status(api, ns)).get("stages") or [{}])[0].get("phase") == "Running"
                  and s)
    assert condition(s, "Reconciling")["reason"] == "StageRunning" and s["stages"][0]["jobName"] == job.metadata.name
    log = operator.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    print(f"\n500s for {recovered - started:.0f}s, {tries_while_down} tries; Job {took:.1f}s after recovery; "
          f"it said: {said['message']}")


# ---------------------------------------------------------------------------------- the API server down

@pytest.fixture
def resyncing_operator(cluster, crds, namespace, tmp_path):
    """An operator that looks at each active run every 5 s (a resync meets the outage for sure)."""
    op = Operator(cluster.kubeconfig, namespace, tmp_path / "operator.log",
                  extra_env={"ALIGNMENT_RESYNC_SECONDS": "5"}).start()
    yield op
    op.stop()


@pytest.mark.waits  # 30 s of outage and its resyncs: 85 s of wall time, 26 s of CPU (at 2aa1420)
def test_the_api_server_down_for_30s_mid_stage_creates_nothing_twice(cluster, resyncing_operator, namespace):
    ns, api = namespace, cluster.api_client()
    apply_run(cluster, ns)
    sft = job_of(api, ns, "sft")
    # The sft pod finishes, and the API server dies while the operator acts on it (dpo's ConfigMap,
    # Job, status write: whichever it had reached); its resyncs meet the outage.
    play_kubelet(api, ns, sft.metadata.name, 0, result_message("sft", train_loss=2.5))
    cluster.restart_apiserver(downtime=30)
    back = time.monotonic()
    api = cluster.api_client()
    dpo = job_of(api, ns, "dpo", timeout=90)
    log = resyncing_operator.log.read_text()
    met = [line for line in log.splitlines() if ": waiting: " in line and "no answer from the API server" in line]
    assert met, log[-3000:]
    print(f"\n{len(met)} reconciles met the outage, e.g. {met[0][:300]}; dpo's Job {time.monotonic() - back:.1f}s "
          "after the API server was back")
    play_kubelet(api, ns, dpo.metadata.name, 0, result_message("dpo", train_loss=0.6))
    ev = job_of(api, ns, "eval")
    play_kubelet(api, ns, ev.metadata.name, 0, result_message("eval", preference_accuracy=0.75))
    s = wait_for("Succeeded", lambda: (s := status(api, ns)).get("phase") == "Succeeded" and s, timeout=60)
    jobs = stage_jobs(api, ns)
    assert {k: len(v) for k, v in jobs.items()} == {"sft": 1, "dpo": 1, "eval": 1}, "one Job per stage attempt"
    assert jobs["sft"][0].metadata.uid == sft.metadata.uid
    assert [(x["name"], x["phase"], x["attempts"]) for x in s["stages"]] == [
        ("sft", "Succeeded", 1), ("dpo", "Succeeded", 1), ("eval", "Succeeded", 1)]
    assert s["progress"] == "3/3" and s["model"] == "/workspace/x/tiny/dpo/final"
    assert s["evaluation"]["preference_accuracy"] == 0.75
    assert condition(s, "Ready")["status"] == "True"


# ---------------------------------------------------------------------------------- the operator killed

def killed_after(cluster, ns: str, log, point: str) -> float:
    """A fresh operator process with ALIGNMENT_FAULT=after:<point>: it kills itself with SIGKILL
    right after its first such write. Returns how long it lived."""
    started = time.monotonic()
    op = Operator(cluster.kubeconfig, ns, log, extra_env={"ALIGNMENT_FAULT": f"after:{point}"}).start(live=False)
    try:
        code = op.proc.wait(90)
    except subprocess.TimeoutExpired:
        op.stop()
        raise AssertionError(f"no {point} within 90 s:\n{log.read_text()[-3000:]}") from None
    assert code == -signal.SIGKILL, f"exit {code}, not killed after {point}:\n{log.read_text()[-3000:]}"
    return time.monotonic() - started


def made(api, ns: str) -> dict[str, list[str]]:
    """What exists of the run's: its volume claim, recipe ConfigMaps and Jobs, by name."""
    core, selector = client.CoreV1Api(api), "alignment.dev/run=tiny"
    return {"PersistentVolumeClaim": sorted(p.metadata.name for p in core.list_namespaced_persistent_volume_claim(ns).items),
            "ConfigMap": sorted(c.metadata.name for c in core.list_namespaced_config_map(ns, label_selector=selector).items),
            "Job": sorted(j.metadata.name for j in client.BatchV1Api(api).list_namespaced_job(ns).items)}


def stage_phases(api, ns: str) -> list[tuple[str, str, str | None, int]]:
    return [(x["name"], x.get("phase"), x.get("jobName"), x.get("attempts", 0)) for x in status(api, ns).get("stages") or []]


def test_the_operator_killed_right_after_each_write_creates_nothing_twice(cluster, crds, namespace, tmp_path):
    """SIGKILL right after the volume claim's create, the recipe ConfigMap's, the Job's and the status
    write (sft's, then dpo's Job and status after sft finished), each followed by a fresh process."""
    ns, api, log = namespace, cluster.api_client(), tmp_path / "operator.log"
    started = time.monotonic()
    apply_run(cluster, ns)
    pvc, recipes = ["tiny-workspace"], sorted(child("tiny", s, "-recipe") for s in ("sft", "dpo", "eval"))
    sft_cm, dpo_cm = child("tiny", "sft", "-recipe"), child("tiny", "dpo", "-recipe")
    lived = {"create:PersistentVolumeClaim": killed_after(cluster, ns, log, "create:PersistentVolumeClaim")}
    assert made(api, ns) == {"PersistentVolumeClaim": pvc, "ConfigMap": [], "Job": []}
    lived["create:ConfigMap"] = killed_after(cluster, ns, log, "create:ConfigMap")
    assert made(api, ns) == {"PersistentVolumeClaim": pvc, "ConfigMap": [sft_cm], "Job": []}
    lived["create:Job"] = killed_after(cluster, ns, log, "create:Job")
    assert made(api, ns) == {"PersistentVolumeClaim": pvc, "ConfigMap": [sft_cm], "Job": [SFT]}
    assert ("sft", "Running", SFT, 1) not in stage_phases(api, ns), "killed before its status write"
    sft_uid = job_of(api, ns, "sft").metadata.uid
    lived["write:status"] = killed_after(cluster, ns, log, "write:status")
    assert stage_phases(api, ns)[0] == ("sft", "Running", SFT, 1)
    assert made(api, ns) == {"PersistentVolumeClaim": pvc, "ConfigMap": [sft_cm], "Job": [SFT]}

    # sft finishes while no operator runs; the next one dies right after creating dpo's Job (sft's
    # success not yet written), the one after that right after writing it.
    play_kubelet(api, ns, SFT, 0, result_message("sft", train_loss=2.5))
    lived["create:Job (dpo)"] = killed_after(cluster, ns, log, "create:Job")
    assert made(api, ns) == {"PersistentVolumeClaim": pvc, "ConfigMap": sorted([sft_cm, dpo_cm]), "Job": sorted([SFT, DPO])}
    assert stage_phases(api, ns)[0] == ("sft", "Running", SFT, 1), "killed before its status write"
    lived["write:status (dpo)"] = killed_after(cluster, ns, log, "write:status")
    assert stage_phases(api, ns)[:2] == [("sft", "Succeeded", SFT, 1), ("dpo", "Running", DPO, 1)]

    op = Operator(cluster.kubeconfig, ns, log).start()
    try:
        play_kubelet(api, ns, DPO, 0, result_message("dpo", train_loss=0.6))
        ev = job_of(api, ns, "eval")
        play_kubelet(api, ns, ev.metadata.name, 0, result_message("eval", preference_accuracy=0.75))
        s = wait_for("Succeeded", lambda: (s := status(api, ns)).get("phase") == "Succeeded" and s, timeout=60)
    finally:
        op.stop()
    assert made(api, ns) == {"PersistentVolumeClaim": pvc, "ConfigMap": recipes, "Job": sorted([SFT, DPO, EVAL])}
    assert job_of(api, ns, "sft").metadata.uid == sft_uid, "one Job per stage attempt: sft's never recreated"
    assert [(x["name"], x["phase"], x["attempts"]) for x in s["stages"]] == [
        ("sft", "Succeeded", 1), ("dpo", "Succeeded", 1), ("eval", "Succeeded", 1)]
    assert s["model"] == "/workspace/x/tiny/dpo/final" and condition(s, "Ready")["status"] == "True"
    assert log.read_text().count("killing this process (SIGKILL)") == len(lived)
    print(f"\nkilled after: " + ", ".join(f"{p} ({t:.1f}s)" for p, t in lived.items()) +
          f"; Succeeded {time.monotonic() - started:.0f}s after the apply")


# ---------------------------------------------------------------------------------- two replicas, one acts

def reconciles(op: Operator) -> float:
    """How many reconciles the operator process has made (its metrics)."""
    found = re.search(r"^alignment_reconcile_duration_seconds_count (\S+)$", op.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


def test_a_replica_paused_by_peering_reconciles_nothing_until_the_other_is_gone(cluster, crds, namespace, tmp_path):
    """Two replicas sharing a kopf peering object: the one of lower priority pauses while the other
    lives, its resyncs (every second here) included, and acts again once the other is gone."""
    ns, api = namespace, cluster.api_client()
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "charts/alignment-operator/crds/kopf-peering.yaml"))
    cluster.wait_established("kopfpeerings.kopf.dev")
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "alignment"}}))

    def replica(priority: int) -> Operator:
        return Operator(cluster.kubeconfig, ns, tmp_path / f"operator-{priority}.log", extra_env={
            "ALIGNMENT_PEERING": "alignment", "ALIGNMENT_PEERING_PRIORITY": str(priority),
            "ALIGNMENT_RESYNC_SECONDS": "1"}).start()

    low = replica(1)
    try:
        apply_run(cluster, ns)
        job_of(api, ns, "sft")
        wait_for("the replica's resyncs", lambda: reconciles(low) >= 3, timeout=30)
        high = replica(100)
        try:
            wait_for("the replica paused", lambda: "Pausing operations in favour of" in low.log.read_text(), timeout=60)
            time.sleep(1.5)  # a reconcile under way when kopf paused it ends
            paused = reconciles(low)
            time.sleep(6)  # six resyncs come due
            assert reconciles(low) == paused, "a paused replica reconciled"
            assert reconciles(high) >= 1, "the replica of higher priority acts"
        finally:
            high.stop()
        wait_for("the replica resumed", lambda: reconciles(low) > paused, timeout=60)
    finally:
        low.stop()
    assert [j.metadata.name for j in stage_jobs(api, ns)["sft"]] == [SFT]


# ---------------------------------------------------------------------------------- status it could not write

def test_a_nan_result_and_a_too_long_retry_annotation_leave_status_writable(cluster, operator, namespace):
    ns, api = namespace, cluster.api_client()
    apply_run(cluster, ns, dpo={"backoffLimit": 0})
    sft = job_of(api, ns, "sft")
    play_kubelet(api, ns, sft.metadata.name, 0, result_message("sft", train_loss=2.5))
    dpo = job_of(api, ns, "dpo")
    play_kubelet(api, ns, dpo.metadata.name, 1, "Traceback ...\nRuntimeError: CUDA error: an illegal memory access")
    wait_for("Failed", lambda: status(api, ns).get("phase") == "Failed", timeout=60)

    # A retry value status.retryRequest cannot hold (maxLength 253): refused, said, never acted on.
    cluster.kubectl("annotate", "alignmentrun", "tiny", "-n", ns, f"alignment.dev/retry={'r' * 300}")
    refused = wait_for("RetryRefused", lambda: (c := condition(status(api, ns), "RetryRefused")) and c, timeout=30)
    assert refused["status"] == "True" and "300 characters" in refused["message"] and "253" in refused["message"]
    time.sleep(8)  # the old loop deleted and recreated the Job within seconds
    assert [j.metadata.uid for j in stage_jobs(api, ns)["dpo"]] == [dpo.metadata.uid], "nothing deleted or made"
    assert [e.reason for e in run_events(api, ns)].count("RetryRefused") == 1
    s = status(api, ns)
    assert s["phase"] == "Failed" and "retryRequest" not in s

    # A value it can hold: retried (status was writable throughout).
    cluster.kubectl("annotate", "--overwrite", "alignmentrun", "tiny", "-n", ns, "alignment.dev/retry=short")
    dpo2 = wait_for("a new dpo Job", lambda: next((j for j in stage_jobs(api, ns).get("dpo", [])
                                                   if j.metadata.uid != dpo.metadata.uid), None), timeout=60)
    assert status(api, ns)["retryRequest"] == "short" and not condition(status(api, ns), "RetryRefused")
    play_kubelet(api, ns, dpo2.metadata.name, 0, result_message("dpo", train_loss=0.6))

    # The eval stage reports a NaN (and an Infinity): JSON cannot carry them; status can still be written.
    ev = job_of(api, ns, "eval")
    play_kubelet(api, ns, ev.metadata.name, 0, result_message("eval", preference_accuracy=0.75,
                                                               eval_loss=float("nan"), win_rate=float("inf")))
    s = wait_for("Succeeded", lambda: (s := status(api, ns)).get("phase") == "Succeeded" and s, timeout=60)
    evaluated = s["stages"][2]
    assert evaluated["metrics"].get("preference_accuracy") == 0.75
    assert "eval_loss" not in evaluated["metrics"] and "win_rate" not in evaluated["metrics"]
    assert "eval_loss" in evaluated["message"] and "nan" in evaluated["message"]
    assert "eval_loss" not in s["evaluation"] and s["evaluation"]["preference_accuracy"] == 0.75
    adjusted = [e for e in run_events(api, ns) if e.reason == "StatusAdjusted"]
    assert len(adjusted) == 1 and "eval_loss" in adjusted[0].message
    assert "Traceback" not in operator.log.read_text()

