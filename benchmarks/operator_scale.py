"""Operator latency and scale against the real control plane (tools/k8s/build.sh builds it).

    .venv/bin/python benchmarks/operator_scale.py [--runs 30] [--burst 100] [--no-floor] [--timeout 600]

Measures, with one operator process watching one namespace:
  1. apply -> first Job: time from `create AlignmentRun` to its SFT Job existing (median, p95);
  2. stage done -> next Job: time from the SFT pod's completion to the DPO Job (median, p95);
  3. a burst of runs applied at once, reconciled to their first Jobs: wall time;
  4. the floor: a bare client (no operator) creating what the burst needs, at the same
     concurrency: each run, its PVC, its recipe ConfigMap, its first Job, one status write;
and the operator's peak RSS over all of it. Prints the burst's operator/floor ratio.
Targets (issue 20): both latencies < 300 ms median, 1000 runs < 60 s and within 1.5x of the
floor, RSS < 250 MB.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import yaml
from kubernetes import client, watch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

from controlplane import ControlPlane, binaries_dir, wait_for  # noqa: E402
from kubelet import child, play_kubelet  # noqa: E402
from operator_process import Operator  # noqa: E402


class JobClock:
    """Watches Jobs in a namespace and records when each name first appears."""

    def __init__(self, api: client.ApiClient, namespace: str):
        self.seen: dict[str, float] = {}
        self.cond = threading.Condition()
        self._thread = threading.Thread(target=self._watch, args=(api, namespace), daemon=True)
        self._thread.start()

    def _watch(self, api, namespace):
        try:
            for ev in watch.Watch().stream(client.BatchV1Api(api).list_namespaced_job, namespace, timeout_seconds=0):
                with self.cond:
                    self.seen.setdefault(ev["object"].metadata.name, time.monotonic())
                    self.cond.notify_all()
        except Exception:  # noqa: BLE001 - the control plane stopping ends the watch
            pass

    def wait(self, names: set[str], timeout: float = 120) -> float:
        """Monotonic time when the last of `names` appeared."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not names <= self.seen.keys():
                if not self.cond.wait(deadline - time.monotonic()):
                    raise TimeoutError(f"missing Jobs: {sorted(names - self.seen.keys())[:5]}")
            return max(self.seen[n] for n in names)


def floor(api: client.ApiClient, ns: str, n: int, threads: int) -> float:
    """Seconds a bare client takes to create what n runs need up to their first Job (no operator)."""
    from alignment_operator.api import parse_run
    from alignment_operator.reconcile import reconcile, stage_hash
    from alignment_operator.render.manifests import RenderContext, build_pvc, build_stage

    custom, core, batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api)
    create = {"PersistentVolumeClaim": core.create_namespaced_persistent_volume_claim,
              "ConfigMap": core.create_namespaced_config_map, "Job": batch.create_namespaced_job}
    ctx = RenderContext()

    def one(i: int) -> None:
        body = custom.create_namespaced_custom_object("alignment.dev", "v1alpha1", ns, "alignmentruns",
                                                      run_doc(f"floor-{i}"))
        run = parse_run(body)
        for obj in [build_pvc(run), *build_stage(run, 0, ctx, stage_hash(run, 0))]:
            create[obj["kind"]](ns, obj)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body["status"] = reconcile(run, body["metadata"]["generation"], {}, now).status.wire()
        custom.replace_namespaced_custom_object_status("alignment.dev", "v1alpha1", ns, "alignmentruns",
                                                       body["metadata"]["name"], body)

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return time.monotonic() - t0


def run_doc(name: str) -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"]["name"] = name
    return doc


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30, help="runs timed one by one for the latencies")
    ap.add_argument("--burst", type=int, default=100, help="runs applied at once")
    ap.add_argument("--floor-threads", type=int, default=8, help="the bare client's concurrency")
    ap.add_argument("--no-floor", action="store_true", help="only the burst and the RSS (e.g. --burst 10000)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds the burst may take")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="alignment-bench-"))
    done = False
    plane = ControlPlane.start(binaries_dir(), work)
    op = None
    try:
        plane.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "alignmentrun.yaml"))
        wait_for("the CRD Established", lambda: plane.kubectl(  # kubectl wait races a CRD with no conditions yet
            "wait", "--for=condition=Established", "crd/alignmentruns.alignment.dev", check=False).returncode == 0)
        ns = "bench"
        plane.kubectl("create", "namespace", ns)
        plane.kubectl("create", "namespace", "floor")
        api = plane.api_client()
        custom = client.CustomObjectsApi(api)
        op = Operator(plane.kubeconfig, ns, work / "operator.log").start()
        clock = JobClock(api, ns)

        first, nxt = [], []
        for i in range(args.runs):
            name = f"lat-{i}"
            t0 = time.monotonic()
            custom.create_namespaced_custom_object("alignment.dev", "v1alpha1", ns, "alignmentruns", run_doc(name))
            first.append(clock.wait({child(name, "sft")}) - t0)
            play_kubelet(api, ns, child(name, "sft"), 0, '{"checkpoint": "/w/sft/final", "train_loss": 1.0}')
            t1 = time.monotonic()
            nxt.append(clock.wait({child(name, "dpo")}) - t1)

        # The runs are created by the same client as the floor's, at the same concurrency.
        docs = [run_doc(f"burst-{i}") for i in range(args.burst)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.floor_threads) as pool:
            list(pool.map(lambda d: custom.create_namespaced_custom_object(
                "alignment.dev", "v1alpha1", ns, "alignmentruns", d), docs))
        burst = clock.wait({child(f"burst-{i}", "sft") for i in range(args.burst)}, timeout=args.timeout) - t0
        rss = op.peak_rss_mb
        if args.no_floor:
            print(f"{args.burst} runs at once -> first Jobs   {burst:6.1f} s   (no floor measured)")
            print(f"operator peak RSS         {rss:7.0f} MB   at {args.burst} runs (target < 250 MB at 1000)")
            done = True
            return 0
        # Last, so that its Jobs' pods do not queue in front of the latency runs' pods (the Job
        # controller creates pods at its own rate); both it and the burst share that background.
        floor_s = floor(api, "floor", args.burst, args.floor_threads)

        print(f"apply -> first Job        median {statistics.median(first) * 1000:7.0f} ms   "
              f"p95 {p95(first) * 1000:7.0f} ms   (n={len(first)}, target < 1000 ms median)")
        print(f"stage done -> next Job    median {statistics.median(nxt) * 1000:7.0f} ms   "
              f"p95 {p95(nxt) * 1000:7.0f} ms   (n={len(nxt)}, target < 1000 ms median)")
        print(f"{args.burst} runs at once -> first Jobs   {burst:6.1f} s   floor (bare client, "
              f"{args.floor_threads} threads) {floor_s:6.1f} s   operator/floor {burst / floor_s:4.2f}x   "
              f"(target < 60 s at 1000 runs and < 1.5x)")
        print(f"operator peak RSS         {rss:7.0f} MB   (target < 250 MB)")
        done = True
        return 0
    finally:
        if op is not None:
            op.stop()
        plane.stop()
        if done:  # etcd's data and the logs stay for a run that failed
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} (etcd data, operator.log)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
