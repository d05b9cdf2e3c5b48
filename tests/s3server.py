"""A real S3-compatible server for the tests: Versity's S3 gateway (versitygw), built from its Go
module by tools/k8s/build.sh like the control plane, serving a directory (posix backend) on
loopback with SigV4 authentication of one access key.

    with S3Server(tmp_path / "s3") as s3:   # s3.endpoint, s3.access_key, s3.secret_key, s3.env()
        s3.make_bucket("models")
        s3.upload_dir(model_dir, "s3://models/tiny")

Not a mock: the trainer's boto3 client talks HTTP to it, signatures are checked, a wrong key is
refused (403), objects are files under its root. stop() kills it (a stopped server: connection
refused); start() again serves the same objects.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "cluster"))
from controlplane import BUILD_COMMAND, binaries_dir  # noqa: E402


def binary() -> Path | None:
    path = binaries_dir() / "versitygw"
    return path if os.access(path, os.X_OK) else None


def skip_reason() -> str:
    return f"no versitygw in {binaries_dir()}: run {BUILD_COMMAND}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, root: Path, port: int | None = None, host: str = "127.0.0.1"):
        """`host`: the address it listens on (the node's IP, for pods on the test node to reach it)."""
        self.root = Path(root)
        self.data = self.root / "data"
        self.host = host
        self.port = port or free_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.access_key = "alignment-test-" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(20)
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "versitygw.log"
        self.started_seconds: float | None = None

    def env(self, **override) -> dict[str, str]:
        """What a stage's process gets from a Secret: the key pair (and, for tests, the endpoint)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "us-east-1", **override}

    def start(self) -> "S3Server":
        exe = binary()
        if exe is None:
            raise RuntimeError(skip_reason())
        self.data.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        # --sidecar keeps object metadata (ETag, user metadata) in files beside the objects instead
        # of extended attributes, which tmpfs and overlay filesystems may refuse.
        sidecar = self.root / "meta"
        sidecar.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [str(exe), "--access", self.access_key, "--secret", self.secret_key, "--port", f"{self.host}:{self.port}",
             "--quiet", "--health", "/health", "posix", "--sidecar", str(sidecar), str(self.data)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"versitygw exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    self.started_seconds = time.monotonic() - t0
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"versitygw did not listen on {self.port} in 30 s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload_dir(self, folder: Path, uri: str) -> None:
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        s3 = self.client()
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}")

    def upload_file(self, path: Path, uri: str) -> None:
        bucket, _, key = uri[len("s3://"):].partition("/")
        self.client().upload_file(str(path), bucket, key)
