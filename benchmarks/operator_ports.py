"""The operator's two ports under a flood, on loopback only: before (the ThreadingHTTPServer of
73214b4 and prometheus_client's threading server) and after (listener.py).

    .venv/bin/python benchmarks/operator_ports.py [--idle 2000] [--seconds 30] [--way both|before|after]
                                                  [--sources 1]

Each way serves the progress endpoint (HTTPS) and the metrics port in a child process with the
file limit of a pod's container (RLIMIT_NOFILE 1024), with a fake API server inside it (a
TokenReview takes 5 ms and accepts one token; the run's stage is Running). Against it, all from
127.0.0.1 and 127.0.0.2 (loopback addresses, nothing else is ever connected to):
  1. `--idle` idle TCP connections, half to each port, held for the whole flood (from `--sources`
     addresses 127.0.1.x, round robin; 1: all from 127.0.0.1, one pod; 64: many pods);
  2. for `--seconds`: 24 workers POST bad tokens (half garbage, half well-formed JWTs for the
     stage's audience that the fake API server refuses), each on a new TLS connection, and 4
     workers GET /metrics;
  3. meanwhile, from 127.0.0.2, the stage's pod pushes a report every second with the good token
     and a scrape comes every 2 s; the server process itself opens a file and a loopback TCP
     connection every 0.5 s (the operator's own API calls and watches need both).
Printed per way: good pushes answered 200 (and their worst latency), scrapes answered, the
server's own opens that failed, TokenReviews the flood caused, the server's peak RSS, threads
and descriptors; then the ratios before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import json
import os
import random
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "73214b4"
LOOPBACK, OTHER = "127.0.0.1", "127.0.0.2"   # the flood's address, the stage pod's
FD_LIMIT = 1024


def jwt(aud: str, sig: str) -> str:
    claims = {"aud": [aud], "exp": time.time() + 3600, "kubernetes.io": {"namespace": "ns", "pod": {"name": "p"}}}
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{part({'alg': 'RS256'})}.{part(claims)}.{sig}"


# ---------------------------------------------------------------------------- the server process

def serve(way: str, probe_port: int, stats_path: str) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    import yaml

    from alignment_operator.api import parse_run
    from alignment_operator.progress import audience
    from alignment_operator.identity import LABEL_RUN, LABEL_STAGE, child_name

    doc = yaml.safe_load((ROOT / "examples" / "tiny-run.yaml").read_text())
    doc["metadata"].update(namespace="ns", uid="u1")
    doc["status"] = {"stages": [{"name": "sft", "phase": "Succeeded"}, {"name": "dpo", "phase": "Running"},
                                {"name": "eval", "phase": "Pending"}]}
    job = child_name(parse_run(doc), "dpo")
    aud = audience("ns", job)
    good = jwt(aud, "good")
    stats = {"reviews": 0, "writes": 0, "own_opens": 0, "own_open_failures": 0}
    lock = threading.Lock()

    def review(token, audience_):
        with lock:
            stats["reviews"] += 1
        time.sleep(0.005)
        ok = token == good and audience_ == aud
        return {"authenticated": ok, "username": "system:serviceaccount:ns:default" if ok else None,
                "audiences": [audience_] if ok else [], "error": None if ok else "invalid bearer token",
                "extra": {"authentication.kubernetes.io/pod-name": ["stage-pod"],
                          "authentication.kubernetes.io/pod-uid": ["uid-1"]} if ok else {}}

    def get_run(ns, name):
        return doc if (ns, name) == ("ns", "tiny") else None

    def get_pod(ns, name):
        return {"metadata": {"name": name, "uid": "uid-1", "labels": {LABEL_RUN: "tiny", LABEL_STAGE: "dpo"},
                             "ownerReferences": [{"kind": "Job", "name": job, "controller": True}]}}

    def write(ns, run, index, stage, progress, text, phase="Running"):
        with lock:
            stats["writes"] += 1
        doc["status"]["stages"][index]["progress"] = progress
        return True

    def own_work():  # what the operator's own API calls need: a descriptor for a file and a socket
        while True:
            time.sleep(0.5)
            stats["own_opens"] += 1
            try:
                with open(os.devnull, "rb"), socket.create_connection((LOOPBACK, probe_port), timeout=2):
                    pass
            except OSError:
                stats["own_open_failures"] += 1

    if way == "before":
        source = subprocess.run(["git", "show", f"{BEFORE}:operator/alignment_operator/progress_server.py"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
        path = Path(tempfile.mkdtemp()) / "progress_server_before.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("alignment_operator._progress_server_before", path)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        progress = module.Progress(review=review, get_run=get_run, write=write)
        endpoint, server = module.serve(0, "https://localhost", None, ["localhost"], progress)
        port = server.server_address[1]
        from prometheus_client import start_http_server

        metrics_server, _ = start_http_server(0, addr=LOOPBACK)
        metrics_port = metrics_server.server_address[1]
    else:
        from alignment_operator import metrics, progress_server

        os.environ.pop("ALIGNMENT_PROGRESS_TLS_SECRET", None)
        progress = progress_server.Progress(review=review, get_run=get_run, write=write, get_pod=get_pod)
        endpoint, listener = progress_server.serve(0, "https://localhost", None, ["localhost"], progress,
                                                   host=LOOPBACK)
        port = listener.port
        metrics_port = metrics.serve(0, LOOPBACK)
    threading.Thread(target=own_work, daemon=True).start()

    def done(*_):
        Path(stats_path).write_text(json.dumps(stats))
        os._exit(0)

    signal.signal(signal.SIGTERM, done)
    print(json.dumps({"port": port, "metrics_port": metrics_port, "ca": endpoint.ca_pem, "token": good,
                      "aud": aud, "path": f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/ns/trainjobs/{job}/status"}),
          flush=True)
    signal.pause()


# ---------------------------------------------------------------------------- the client side

def proc_status(pid: int) -> dict[str, int]:
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return {"rss_mib": int(fields["VmRSS"].split()[0]) // 1024, "threads": int(fields["Threads"]),
                "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (OSError, KeyError, ValueError):
        return {"rss_mib": 0, "threads": 0, "fds": 0}


def report(percent: int) -> bytes:
    return json.dumps({"trainerStatus": {"progressPercentage": percent,
                                         "lastUpdatedTime": datetime.now(timezone.utc).isoformat()}}).encode()


async def request(host: str, port: int, source: str, raw: bytes, context: ssl.SSLContext | None,
                  timeout: float = 10.0) -> int:
    """One request on a new connection; the status code, or 0 when none came."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=context, server_hostname="localhost" if context else None,
            local_addr=(source, 0)), timeout)
    except (OSError, asyncio.TimeoutError, ssl.SSLError):
        return 0
    try:
        writer.write(raw)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    except (OSError, asyncio.TimeoutError, ssl.SSLError, ValueError, IndexError):
        return 0
    finally:
        writer.transport.abort()


def post(path: str, token: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def source(i: int, sources: int) -> str:
    return LOOPBACK if sources == 1 else f"127.0.1.{i % sources + 1}"


async def flood(info: dict, pid: int, idle: int, seconds: float, sources: int) -> dict:
    """The flood against the server process `pid`: info names its ports ("port", "metrics_port"),
    the progress "path", the "ca" (PEM), the stage's audience "aud" and, optionally, the stage
    pod's good "token" (without one no push is made here)."""
    context = ssl.create_default_context(cadata=info["ca"])
    port, metrics_port, path = info["port"], info["metrics_port"], info["path"]
    peak = proc_status(pid)
    before = dict(peak)
    stop = asyncio.Event()
    codes: dict[str, dict[int, int]] = {"bad": {}, "scrape_flood": {}}
    good: list[tuple[int, float]] = []
    scrapes: list[int] = []

    async def sample():
        while not stop.is_set():
            now = proc_status(pid)
            for k, v in now.items():
                peak[k] = max(peak[k], v)
            await asyncio.sleep(0.5)

    async def hold(target: int, n: int) -> list:
        held = []
        for i in range(n):
            try:
                held.append(await asyncio.wait_for(asyncio.open_connection(
                    LOOPBACK, target, local_addr=(source(i, sources), 0)), 2))
            except (OSError, asyncio.TimeoutError):
                break
        return held

    async def bad_worker(i: int):
        n = 0
        while not stop.is_set():
            n += 1
            token = f"x{i}-{n}" if n % 2 else jwt(info["aud"], f"forged{i}-{n}")
            code = await request(LOOPBACK, port, source(i, sources), post(path, token, report(1)), context, timeout=3)
            codes["bad"][code] = codes["bad"].get(code, 0) + 1

    async def scrape_worker(i: int):
        while not stop.is_set():
            code = await request(LOOPBACK, metrics_port, source(i, sources), SCRAPE, None, timeout=3)
            codes["scrape_flood"][code] = codes["scrape_flood"].get(code, 0) + 1

    async def stage_pod():
        percent = 0
        while not stop.is_set():
            percent = min(100, percent + 1)
            t0 = time.monotonic()
            code = await request(LOOPBACK, port, OTHER, post(path, info["token"], report(percent)), context)
            good.append((code, time.monotonic() - t0))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))

    async def prometheus():
        while not stop.is_set():
            scrapes.append(await request(LOOPBACK, metrics_port, OTHER, SCRAPE, None))
            await asyncio.sleep(2.0)

    sampler = asyncio.create_task(sample())
    held = await hold(port, idle // 2) + await hold(metrics_port, idle - idle // 2)
    tasks = [asyncio.create_task(bad_worker(i)) for i in range(24)] + [
        asyncio.create_task(scrape_worker(i)) for i in range(4)] + [asyncio.create_task(prometheus())]
    if info.get("token"):  # else a real stage pod pushes (tests/cluster/test_real_node.py::test_tiny_run_sft_dpo_eval_in_real_pods)
        tasks.append(asyncio.create_task(stage_pod()))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait(tasks, timeout=15)
    open_after = sum(1 for r, w in held if not w.transport.is_closing() and not r.at_eof())
    for _, w in held:
        w.transport.abort()
    await sampler
    await asyncio.sleep(3)
    return {"idle_opened": len(held), "idle_still_open_at_end": open_after, "bad": codes["bad"],
            "scrape_flood": codes["scrape_flood"],
            "good_pushes": len(good), "good_200": sum(c == 200 for c, _ in good),
            "good_worst_s": round(max((t for c, t in good if c == 200), default=float("nan")), 3),
            "scrapes": len(scrapes), "scrapes_200": sum(c == 200 for c in scrapes),
            "before": before, "peak": peak, "after_3s": proc_status(pid)}


def run_way(way: str, idle: int, seconds: float, sources: int) -> dict:
    probe = socket.create_server((LOOPBACK, 0))
    probe.listen(1024)
    stop = threading.Event()

    def accept_forever():  # the 'API server' the operator's own work connects to
        probe.settimeout(0.5)
        while not stop.is_set():
            try:
                probe.accept()[0].close()
            except OSError:
                pass

    threading.Thread(target=accept_forever, daemon=True).start()
    stats_path = tempfile.mktemp(suffix=".json")
    server = subprocess.Popen([sys.executable, __file__, "--serve", way, "--probe-port", str(probe.getsockname()[1]),
                               "--stats", stats_path], stdout=subprocess.PIPE, text=True,
                              stderr=open(stats_path + ".log", "w"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        info = json.loads(server.stdout.readline())
        time.sleep(1.0)
        out = asyncio.run(flood(info, server.pid, idle, seconds, sources))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        stop.set()
        probe.close()
    out.update(json.loads(Path(stats_path).read_text()))
    Path(stats_path).unlink()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--idle", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--way", choices=["both", "before", "after"], default="both")
    p.add_argument("--sources", type=int, default=1, choices=range(1, 255), metavar="1-254")
    p.add_argument("--serve", choices=["before", "after"], help=argparse.SUPPRESS)
    p.add_argument("--probe-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.probe_port, args.stats)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the client holds the idle connections
    if hard < args.idle + 500:
        sys.exit(f"the client needs {args.idle + 500} descriptors; its hard limit is {hard}")
    results = {}
    for way in (["before", "after"] if args.way == "both" else [args.way]):
        results[way] = run_way(way, args.idle, args.seconds, args.sources)
        print(way, json.dumps(results[way]), flush=True)
    if len(results) == 2:
        b, a = results["before"], results["after"]
        ratio = lambda x, y: round(x / y, 2) if y else float("inf")  # noqa: E731
        print(f"ratios before/after: peak RSS {ratio(b['peak']['rss_mib'], a['peak']['rss_mib'])}, "
              f"peak threads {ratio(b['peak']['threads'], a['peak']['threads'])}, "
              f"peak descriptors {ratio(b['peak']['fds'], a['peak']['fds'])}, "
              f"TokenReviews {ratio(b['reviews'], a['reviews'])} ({b['reviews']} vs {a['reviews']}, for "
              f"{sum(b['bad'].values())} vs {sum(a['bad'].values())} bad requests sent); good pushes answered "
              f"{b['good_200']}/{b['good_pushes']} before, {a['good_200']}/{a['good_pushes']} after; "
              f"the server's own opens failed {b['own_open_failures']}/{b['own_opens']} before, "
              f"{a['own_open_failures']}/{a['own_opens']} after")


if __name__ == "__main__":
    main()
