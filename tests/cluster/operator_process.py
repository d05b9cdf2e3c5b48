"""`alignctl operator` as a child process, for the cluster tests and benchmarks/operator_scale.py."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from controlplane import free_port


class Operator:
    """`alignctl operator` as a child process, watching one namespace."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, extra_env: dict | None = None,
                 nofile: int | None = None):
        """nofile: the process's open-file limit (a pod's container often has 1024), else this one's."""
        self.kubeconfig, self.namespace, self.log = kubeconfig, namespace, log
        self.proc: subprocess.Popen | None = None
        self.extra_env, self.nofile = extra_env or {}, nofile

    def start(self, live: bool = True) -> "Operator":
        """The process started; with `live`, once its /healthz answers (one that kills itself early,
        ALIGNMENT_FAULT, may never get there). Its two ports are picked here and bound there, so
        another process may take one in between: the start is tried again, with new ports, when
        the operator says its address was in use."""
        for _ in range(3):
            if self._start(live):
                return self
        raise AssertionError(f"operator could not bind its ports 3 times:\n{self.log.read_text()[-3000:]}")

    def _start(self, live: bool) -> bool:
        port, self.metrics_port = free_port(), free_port()
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "ALIGNMENT_TRAINER_IMAGE": "trainer:test",
               "ALIGNMENT_METRICS_PORT": str(self.metrics_port), **self.extra_env}
        logged = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alignment_operator.cli", "operator", "--namespaces", self.namespace,
             "--liveness", f"http://127.0.0.1:{port}/healthz"],
            env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile)))
            if self.nofile else None)
        if not live:
            return True
        # Generous: a quiet start takes ~2 s, but on a 2-core machine running both test halves and
        # the node's pods a CI run once found no answer within 60 s.
        start, deadline = time.monotonic(), time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                return True
            except OSError:
                if self.proc.poll() is not None:
                    with self.log.open() as f:
                        f.seek(logged)
                        if "address already in use" in f.read().lower():
                            return False
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    state = (f"exited with {self.proc.returncode}" if self.proc.poll() is not None
                             else f"no answer from /healthz in {time.monotonic() - start:.0f} s")
                    raise AssertionError(f"operator did not become live ({state}):\n{self.log.read_text()[-3000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self) -> str:
        """The Prometheus exposition text the operator serves."""
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()

    @property
    def peak_rss_mb(self) -> float:
        """The process's high-water resident set (VmHWM), in MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc status")
