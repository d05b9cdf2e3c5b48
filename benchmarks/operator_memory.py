"""What the operator keeps in memory per run, at 10k runs, without a cluster.

    .venv/bin/python benchmarks/operator_memory.py [--runs 10000]

Fills the controller's cache (cache.Cache) and work queue (workqueue.WorkQueue) the way the watches
and the reconciles do, with objects shaped as the API server serves them (the tiny run as applied,
with the status reconcile writes; its rendered Job with a status; a pod of it with its spec and a
terminated container's 1 KiB message), and measures the bytes they keep allocated (tracemalloc):
  1. every run active: run + Job + pod each (what a re-list of 10k running runs holds);
  2. every run finished: run only (finished runs' children are dropped);
  3. for comparison, the same Jobs and pods kept whole (no observe.slim): the ratio is what slim saves.
The chart's memory limit is 512 Mi (charts/alignment-operator/values.yaml).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tracemalloc
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def objects(i: int) -> tuple[dict, dict, dict]:
    """(run, Job, pod) of run number i, as a watch delivers them."""
    from alignment_operator.api import parse_run
    from alignment_operator.reconcile import reconcile, stage_hash
    from alignment_operator.render.manifests import RenderContext, build_stage

    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    name, uid = f"run-{i}", f"00000000-0000-0000-0000-{i:012d}"
    doc["metadata"].update(name=name, namespace="bench", uid=uid, generation=1, resourceVersion=str(10 * i + 1),
                           creationTimestamp="2026-12-06T06:00:00Z")
    run = parse_run(doc)
    doc["status"] = reconcile(run, 1, {}, "2026-12-06T06:00:01Z").status.wire()
    job = copy.deepcopy(build_stage(run, 0, RenderContext(), stage_hash(run, 0))[-1])
    job["metadata"].update(uid=f"{uid[:-3]}j01", resourceVersion=str(10 * i + 2),
                           creationTimestamp="2026-12-06T06:00:01Z")
    job["status"] = {"active": 1, "ready": 1, "startTime": "2026-12-06T06:00:02Z", "uncountedTerminatedPods": {}}
    template = job["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {**template["metadata"], "name": f"{job['metadata']['name']}-x7k2p", "namespace": "bench",
                        "uid": f"{uid[:-3]}p01", "resourceVersion": str(10 * i + 3),
                        "labels": {**template["metadata"].get("labels", {}),
                                   "batch.kubernetes.io/job-name": job["metadata"]["name"]},
                        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                                             "uid": job["metadata"]["uid"], "controller": True}]},
           "spec": template["spec"],
           "status": {"phase": "Running", "conditions": [{"type": t, "status": "True"} for t in
                                                         ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
                      "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0,
                                             "state": {"terminated": {"exitCode": 0, "message": "x" * 1024,
                                                                      "finishedAt": "2026-12-06T07:00:00Z"}}}]}}
    return doc, job, pod


def measure(fill) -> float:
    """Bytes `fill()` leaves allocated (what it returns is kept alive while measured)."""
    gc.collect()
    tracemalloc.start()
    kept = fill()
    gc.collect()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10_000)
    args = ap.parse_args(argv)
    from alignment_operator.cache import Cache
    from alignment_operator.workqueue import WorkQueue

    base = objects(0)
    samples = []  # distinct dicts per run, as json parsing of each watch event makes them
    for i in range(args.runs):
        run, job, pod = copy.deepcopy(base)
        for o, kind in ((run, "r"), (job, "j"), (pod, "p")):
            o["metadata"]["uid"] = f"{kind}-{i}"
        run["metadata"]["name"] = job["metadata"]["labels"]["alignment.dev/run"] = pod["metadata"]["labels"][
            "alignment.dev/run"] = f"run-{i}"
        samples.append((run, job, pod))

    def active():
        cache, queue = Cache(), WorkQueue()
        for i, (run, job, pod) in enumerate(samples):
            cache.put_run(run)
            cache.put(job)
            cache.put(pod)
            queue.add_after(("bench", f"run-{i}"), 300)
        return cache, queue

    def finished():
        cache = Cache()
        for run, job, pod in samples:
            cache.put_run(run)
            cache.put(job)
            cache.put(pod)
            cache.finish("bench", run["metadata"]["name"])
        return cache

    def whole():
        return [(job, pod) for _, job, pod in copy.deepcopy(samples)]

    # The run bodies are the watch's dicts, kept by the cache as received: counted once (run_bytes).
    n = args.runs
    run_bytes = measure(lambda: copy.deepcopy([s[0] for s in samples]))
    act = measure(active) + run_bytes
    fin = measure(finished) + run_bytes
    full = measure(whole) + run_bytes
    print(f"{n} runs, all active (run + slim Job + slim pod, a resync queued each): "
          f"{act / 2**20:7.1f} MiB  {act / n / 1024:5.1f} KiB/run")
    print(f"{n} runs, all finished (run only: children dropped):                   "
          f"{fin / 2**20:7.1f} MiB  {fin / n / 1024:5.1f} KiB/run   finished/active {fin / act:4.2f}x")
    print(f"{n} runs, Jobs and pods kept whole (no observe.slim, for comparison):   "
          f"{full / 2**20:7.1f} MiB  {full / n / 1024:5.1f} KiB/run   active/whole {act / full:4.2f}x")
    print("allocations (tracemalloc) by the cache and queue only; add the idle operator's RSS "
          "(benchmarks/operator_scale.py) for the process; the chart's limit is 512 Mi")
    return 0


if __name__ == "__main__":
    sys.exit(main())
