"""The real node that every `node` test shares, and the helpers those tests use.

One control plane and one node per pytest session (scripts/test runs the node tests in a process
of their own): starting them costs about a minute on 2 cores, and no test needs a node of its own
- each gets a fresh namespace (`restricted_ns`). The engines' module installs JobSet, the
training operator and Kueue on it, so conftest.py runs that module last.
The fixtures are re-exported by conftest.py; import the helpers from here.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from alignment_operator.identity import LABEL_RUN
from controlplane import REPO, ControlPlane, StartupError, binaries_dir, free_port, missing_binaries, wait_for
import kubelet
from kubelet import DPO, get_run
from node import Node, host_ip, image_ref, missing_requirements
from operator_process import Operator

CRDS = [REPO / "crds/alignmentrun.yaml"]
# Session fixtures that stop after the last test that uses them, not at the session's end (conftest.py's
# pytest_runtest_teardown): fixture name -> its stop, idempotent (the fixture's own teardown calls it too).
STOP_AFTER_LAST_USER: dict = {}
NODE_LOCK = Path(os.environ.get("TMPDIR", "/tmp")) / "alignment-real-node.lock"


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """A control plane with a real node; stopped, and the host cleaned, after the session."""
    if os.environ.get("ALIGNMENT_SKIP_NODE") == "1":
        pytest.skip("ALIGNMENT_SKIP_NODE=1")
    bin_dir = binaries_dir()
    missing = missing_binaries(bin_dir) + missing_requirements(bin_dir)
    if missing:
        pytest.fail("the real node cannot start; missing: " + "; ".join(missing)
                    + " (or set ALIGNMENT_SKIP_NODE=1 to skip these tests)", pytrace=False)
    # One real node per machine: two would share the CNI bridge, the pod subnet, port 53 of the
    # node's IP and containerd's store. A second pytest session (a developer's beside CI's) waits.
    lock = open(NODE_LOCK, "w")
    if not _try_lock(lock):
        print(f"\nwaiting for the real node of another pytest session ({NODE_LOCK})")
        fcntl.flock(lock, fcntl.LOCK_EX)
    workdir = tmp_path_factory.mktemp("real-node")
    started = time.monotonic()
    plane = node = None
    failure = None
    try:
        plane = ControlPlane.start(bin_dir, workdir / "plane", node_ip=host_ip())
        for crd in CRDS:
            plane.kubectl("apply", "--server-side", "-f", str(crd))
        plane.wait_established("alignmentruns.alignment.dev")
        node = Node.start(plane, workdir / "node")
    except StartupError as exc:
        failure = str(exc)
    if failure:
        if plane:
            plane.stop()
        lock.close()
        pytest.fail(failure, pytrace=False)
    print(f"\nreal node ready in {time.monotonic() - started:.1f}s (logs: {workdir})")
    done = []

    def stop():
        if not done:
            done.append(True)
            node.stop()
            plane.stop()
            lock.close()  # releases the flock

    STOP_AFTER_LAST_USER["real"] = stop  # conftest.py: once the last node test is done
    try:
        yield SimpleNamespace(plane=plane, node=node, workdir=workdir)
    finally:
        stop()


def _try_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@pytest.fixture
def restricted_ns(real, request):
    """A namespace that enforces the `restricted` Pod Security level, as production ones do."""
    name = f"rn-{request.node.name[5:25].replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}".lower()
    real.plane.kubectl("create", "namespace", name)
    real.plane.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted",
                       "pod-security.kubernetes.io/enforce-version=latest")
    wait_for(f"the default ServiceAccount in {name}", timeout=30,
             fn=lambda: real.plane.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0)
    yield name
    real.plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def prepare_volume(real, ns: str, run: str) -> Path:
    """The run's volume with the tiny model and examples/data at the paths tiny-run.yaml names
    (relative to the trainer's working directory, /workspace)."""
    volume = real.node.workspace(ns, run)
    shutil.copytree(tiny_model(real), volume / "runs/tiny-model")
    shutil.copytree(REPO / "examples/data", volume / "examples/data")
    for path in [volume, *volume.rglob("*")]:
        os.chown(path, 1000, 1000)
    return volume


def tiny_model(real) -> Path:
    """The tiny model as `alignctl tiny-model` builds it, built once per session (a process that imports
    transformers and trains a tokenizer: 10-20 s of CPU, which each node test paid before) and copied."""
    built = real.workdir / "tiny-model"
    if not (built / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "alignment_operator.cli", "tiny-model", str(built)],
                       check=True, capture_output=True)
    return built


def start_operator(real, ns: str, tmp_path: Path, progress: bool = False) -> Operator:
    """The operator as a process beside the node; with progress, its progress endpoint too, on the
    host's address, so the pods push their live progress to it (status.stages[].progress)."""
    env = {"ALIGNMENT_TRAINER_IMAGE": image_ref("trainer")}
    if progress:
        port, ip = free_port(), host_ip()
        env |= {"ALIGNMENT_PROGRESS_PORT": str(port), "ALIGNMENT_PROGRESS_URL": f"https://{ip}:{port}",
                "ALIGNMENT_PROGRESS_HOSTNAMES": ip}
    return Operator(real.plane.kubeconfig, ns, tmp_path / "operator.log", extra_env=env).start()


def wait_phase(real, ns: str, run: str, phases: set[str], timeout: float) -> dict:
    """kubelet.wait_phase, every 0.5 s (one GET; a 2 s poll lost a second per wait on average, ~25
    waits in the node tests); on a timeout the assertion shows the run's status and the pods."""
    api = real.plane.api_client()
    try:
        return kubelet.wait_phase(api, ns, phases, run, timeout=timeout, interval=0.5)
    except AssertionError:
        status = get_run(api, ns, run).get("status")
        pods = real.plane.kubectl("get", "pods", "-n", ns, "-o", "wide", check=False).stdout
        raise AssertionError(f"run {run} did not reach {phases} in {timeout:.0f}s; status: "
                             f"{json.dumps(status, indent=1)}\npods:\n{pods}") from None


def running_pod(real, ns: str, job: str, timeout: float = 300) -> str:
    """The name of job's pod once its trainer container runs (polled through the API client: a kubectl
    process every half second cost more CPU than the wait, beside pods that train on the same 2 cores)."""
    from kubernetes import client

    core = client.CoreV1Api(real.plane.api_client())

    def find():
        for pod in core.list_namespaced_pod(ns, label_selector=f"batch.kubernetes.io/job-name={job}").items:
            if pod.status.phase == "Running" and not pod.metadata.deletion_timestamp:
                return pod.metadata.name
        return None
    return wait_for(f"a running pod of {job}", fn=find, timeout=timeout, interval=0.5)


def complete_checkpoints(out: Path) -> list[int]:
    """The steps of the stage output `out`'s complete checkpoints (trainer_state.json is written
    last), newest first."""
    return sorted((int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                   if (p / "trainer_state.json").is_file()), reverse=True)


def wait_checkpoint(real, ns: str, run: str, out: Path, step: int | None = None, timeout: float = 600) -> list[int]:
    """Waits for a complete checkpoint in `out` (checkpoint-`step`, or any); returns the complete
    ones, newest first. A run that ends first fails the wait at once, with its status, its pods and
    the tail of their logs (a wait for a checkpoint that cannot come would hide that for `timeout`)."""
    api, checked = real.plane.api_client(), [0.0]

    def ready():
        have = complete_checkpoints(out)
        if have and (step is None or step in have):
            return have
        if time.monotonic() - checked[0] > 2:
            checked[0] = time.monotonic()
            status = get_run(api, ns, run).get("status") or {}
            if status.get("phase") in ("Failed", "Succeeded"):
                kubectl = lambda *a: real.plane.kubectl(*a, "-n", ns, check=False).stdout
                raise AssertionError(
                    f"run {run} ended {status['phase']} before {what}; status: {json.dumps(status, indent=1)}\n"
                    f"pods:\n{kubectl('get', 'pods', '-o', 'wide')}\nlogs:\n"
                    f"{kubectl('logs', '-l', f'{LABEL_RUN}={run}', '--prefix', '--tail=40', '--all-containers')}")
        return None

    what = f"checkpoint-{step}" if step is not None else "its first complete checkpoint"
    return wait_for(f"{run}'s {what} in {out}", timeout=timeout, interval=0.2, fn=ready)


# The node's stage pods train with one intra-op thread each: ONE_THREAD in spec.trainer.env replaces
# the operator's own OMP_NUM_THREADS (their CPU limit over their processes). On this 2-core machine
# the pods share the cores with the other two pytest processes, and on a slow hour with other work:
# two OpenMP threads then meet at a barrier on every op of the tiny model while one of them waits
# descheduled, and the pod's CFS quota is spent spinning. One tiny SFT on the host took 15.7 s with
# two threads and 17.9 s with one when quiet, 54 s against 28 s beside two busy loops (a stage pod:
# 12-15x its quiet time with two).
ONE_THREAD = [{"name": "OMP_NUM_THREADS", "value": "1"}, {"name": "MKL_NUM_THREADS", "value": "1"}]


def one_thread(doc: dict) -> dict:
    """The run `doc` with ONE_THREAD after its trainer's own env."""
    trainer = doc["spec"].setdefault("trainer", {})
    trainer["env"] = [*trainer.get("env", []), *ONE_THREAD]
    return doc


def tiny_run(name: str = "tiny") -> dict:
    """examples/tiny-run.yaml named `name`, its pods on one thread each (ONE_THREAD)."""
    doc = one_thread(yaml.safe_load((REPO / "examples/tiny-run.yaml").read_text()))
    doc["metadata"]["name"] = name
    return doc


def one_stage_run(name: str, stage: str | dict) -> dict:
    """examples/tiny-run.yaml named `name` with one stage: its stage called `stage` (its sft, dpo or
    eval, as the example has it: data paths relative to /workspace, the tiny model as the model), or
    the stage given; one thread a pod (ONE_THREAD)."""
    doc = tiny_run(name)
    doc["spec"]["stages"] = [stage if isinstance(stage, dict) else
                             next(s for s in doc["spec"]["stages"] if s["name"] == stage)]
    return doc


def two_rank_run(name: str, epochs: int, save_steps: int | None = None) -> dict:
    """examples/tiny-run.yaml's SFT alone, as two pods (a core each of this 2-core node) of ZeRO-3
    over gloo: `nodes: 2, gpusPerNode: 0`."""
    doc = one_stage_run(name, "sft")
    sft = doc["spec"]["stages"][0]
    sft["training"]["epochs"] = epochs
    if save_steps:
        sft["training"]["saveSteps"] = save_steps
    sft["resources"] = {"nodes": 2, "gpusPerNode": 0, "processesPerNode": 1, "cpu": 1, "memory": "3Gi",
                        "sharedMemory": "256Mi"}
    sft["distributed"] = "deepspeed-zero3"
    return doc


def assert_resumed(rank0_log: str, killed_after: int, stage: dict) -> int:
    """Rank 0's log after a rank was killed past checkpoint-`killed_after`: the new attempt ran
    two ranks, resumed from a checkpoint no newer than that, and trained on from there to the
    stage's last step. Returns the checkpoint step it resumed from."""
    said = events(rank0_log)
    start = next(e for e in said if e["event"] == "start")
    resumed = int(start["resume_from"].rsplit("-", 1)[1]) if start.get("resume_from") else None
    assert start["world_size"] == 2 and resumed is not None and resumed <= killed_after, (start, killed_after)
    steps = [e["step"] for e in said if e["event"] == "progress"]
    assert steps and steps[0] > resumed and steps[-1] == stage["metrics"]["global_step"], (steps, stage)
    return resumed


def events(text: str) -> list[dict]:
    """The trainer's JSON event lines in a log."""
    out = []
    for line in text.splitlines():
        start = line.find('{"event"')
        if start >= 0:
            try:
                out.append(json.loads(line[start:]))
            except json.JSONDecodeError:
                pass
    return out


# ---- live progress: the operator as a pod runs it, and a flood of its two ports

PROBE = """
import os, ssl, urllib.request, urllib.error
url = os.environ["KUBEFLOW_TRAINER_SERVER_URL"]
token = open(os.environ["KUBEFLOW_TRAINER_SERVER_TOKEN"]).read().strip()
ctx = ssl.create_default_context(cafile=os.environ["KUBEFLOW_TRAINER_SERVER_CA_CERT"])
req = urllib.request.Request(url, data=b'{"trainerStatus": {"lastUpdatedTime": "2000-01-01T00:00:00Z"}}',
                             method="POST", headers={"Authorization": "Bearer " + token})
try:
    print(urllib.request.urlopen(req, timeout=10, context=ctx).status)
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode()[:300])
except Exception as e:
    print(type(e).__name__, e)
"""


def progress_operator(real, ns: str, tmp_path) -> Operator:
    """The operator with its progress endpoint on the node's IP (all addresses: loopback too), and
    the open-file limit of a pod's container (1024)."""
    port, ip = free_port(), host_ip()
    op = Operator(real.plane.kubeconfig, ns, tmp_path / "operator.log", nofile=1024, extra_env={
        "ALIGNMENT_TRAINER_IMAGE": image_ref("trainer"), "ALIGNMENT_PROGRESS_PORT": str(port),
        "ALIGNMENT_PROGRESS_URL": f"https://{ip}:{port}", "ALIGNMENT_PROGRESS_HOSTNAMES": ip}).start()
    op.progress_port = port
    return op


IDLE, FLOOD_SECONDS = 2000, 30


class Flood(threading.Thread):
    """benchmarks/operator_ports.py's flood against the operator's two ports, on loopback only
    (127.0.0.1 and 127.0.0.2): IDLE idle connections held, 24 workers posting bad tokens (garbage
    and forged JWTs of the stage's audience), 4 scraping /metrics, a scrape every 2 s from
    127.0.0.2, for FLOOD_SECONDS; the stage's real pod makes the good pushes."""

    def __init__(self, operator: Operator, ca: str, path: str, aud: str):
        super().__init__(daemon=True)
        spec = importlib.util.spec_from_file_location("operator_ports", REPO / "benchmarks/operator_ports.py")
        self.bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.bench)
        self.info = {"port": operator.progress_port, "metrics_port": operator.metrics_port, "path": path,
                     "ca": ca, "aud": aud}
        self.pid, self.result, self.error, self.started = operator.proc.pid, None, None, time.monotonic()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this process holds the idle connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, IDLE + 1000)), hard))

    def run(self):
        try:
            self.result = asyncio.run(self.bench.flood(self.info, self.pid, IDLE, FLOOD_SECONDS, sources=1))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def start_flood(plane, ns: str, operator: Operator) -> Flood:
    """The flood, aimed at the running dpo stage's progress URL with its CA, started."""
    from urllib.parse import urlparse

    from kubernetes import client
    api = plane.api_client()
    pod = client.BatchV1Api(api).read_namespaced_job(DPO, ns).spec.template.spec
    url = next(e.value for e in pod.containers[0].env if e.name == "KUBEFLOW_TRAINER_SERVER_URL")
    ca = client.CoreV1Api(api).read_namespaced_config_map(f"{DPO}-recipe", ns).data["progress-ca.crt"]
    flood = Flood(operator, ca, urlparse(url).path, f"progress.alignment.dev/{ns}/{DPO}")
    flood.start()
    return flood


def second_run() -> dict:
    return tiny_run("second")
