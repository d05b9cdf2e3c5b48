"""The HTTPS endpoint stage pods push live progress to (the contract is in progress.py).

    ALIGNMENT_PROGRESS_PORT       port to serve on (default 8443; 0: no endpoint, no progress wiring)
    ALIGNMENT_PROGRESS_URL        how stage pods reach it, e.g. https://alignment-operator.alignment-system.svc:8443
    ALIGNMENT_PROGRESS_TLS_DIR    tls.crt + tls.key (+ ca.crt) from the chart's Secret; unset: a self-signed
                                  CA and certificate made at start-up for ALIGNMENT_PROGRESS_HOSTNAMES

Every push is authenticated with a TokenReview for the stage's own audience (kube.review_token:
the API server checks signature, expiry, audience and the bound pod), its namespace must be the
path's, and the body is checked before anything is written. Status writes go through kube.py,
at most one per stage every progress.MIN_WRITE_INTERVAL_S.
"""

from __future__ import annotations

import atexit
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from . import kube, metrics
from .api import AlignmentRunStatus, RunInvalid, StageProgress, parse_run
from .progress import (MAX_BODY_BYTES, Refused, Throttle, audience, parse_path, parse_report, stage_progress,
                       summary)
from .render.manifests import child_name

log = logging.getLogger("alignment_operator.progress")
DRAIN_LIMIT = 4 << 20  # an oversized body up to this is read and dropped before the 413; a larger one is cut off
TOKEN_CACHE_S = 60.0  # a token the API server accepted is trusted this long (never past its expiry)


@dataclass(frozen=True)
class Endpoint:
    url: str      # base URL stage pods use
    ca_pem: str   # the CA they verify it with


class Progress:
    """Decides what a push does; I/O through the functions it is given (kube.py's by default)."""

    def __init__(self, review: Callable = None, get_run: Callable = None, write: Callable = None,
                 clock: Callable[[], float] = time.monotonic):
        self.review = review or kube.review_token
        self.get_run = get_run or kube.get_run
        self.write = write or kube.patch_stage_progress
        self.clock = clock
        self.throttle = Throttle()
        self._tokens: dict[str, float] = {}      # sha256(token + audience) -> trusted until (monotonic)
        self._names: dict[tuple[str, str], tuple[str, str]] = {}  # (ns, job name) -> (run, stage)
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._timers: dict[tuple[str, str], threading.Timer] = {}
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ one push

    def handle(self, path: str, authorization: str | None, body: bytes) -> dict[str, Any]:
        """A push, start to end; Refused says the HTTP status and why."""
        ns, name = parse_path(path)
        self.authenticate(authorization, ns, name)
        now = datetime.now(timezone.utc)
        report = parse_report(body, now)
        run, stage = self.resolve(ns, name)
        key = (ns, name)
        with self._lock(key):
            st = self._stage(ns, run, stage)
            if st.phase != "Running":
                raise Refused(409, f"stage {stage} of {ns}/{run} is {st.phase}, not Running: nothing to report")
            self.throttle.check_fresh(key, report.sent, st.progress.last_updated if st.progress else None)
            slot = self.throttle.slots.get(key)
            previous = slot.pending if slot and slot.pending is not None else st.progress
            progress = stage_progress(report, previous)
            if self.throttle.offer(key, progress, report.sent, self.clock()):
                written = self._write(key, run, stage, progress)
            else:
                written = False
                self._schedule(key, run, stage)
        return {"accepted": True, "written": written}

    def authenticate(self, authorization: str | None, ns: str, name: str) -> None:
        if not authorization or not authorization.startswith("Bearer ") or len(authorization) > 8192:
            raise Refused(401, "no bearer token (Authorization: Bearer <the pod's projected token>)")
        token = authorization[len("Bearer "):].strip()
        aud = audience(ns, name)
        digest = hashlib.sha256(f"{aud}\0{token}".encode()).hexdigest()
        with self._guard:
            if self._tokens.get(digest, 0) > self.clock():
                return
        said = self.review(token, aud)
        if not said["authenticated"] or aud not in said["audiences"]:
            raise Refused(401, f"token refused for audience {aud}: {said.get('error') or 'not authenticated'}")
        user = said.get("username") or ""
        if not user.startswith(f"system:serviceaccount:{ns}:"):
            raise Refused(403, f"token of {user or 'an unknown user'} may not report for namespace {ns}")
        with self._guard:
            self._tokens[digest] = self.clock() + min(TOKEN_CACHE_S, _expires_in(token))

    def resolve(self, ns: str, name: str) -> tuple[str, str]:
        """(run, stage) whose stage Job is `name`: the run is a prefix of the name up to a '-'."""
        if (ns, name) in self._names:
            return self._names[(ns, name)]
        cuts = [i for i, c in enumerate(name) if c == "-"]
        for i in reversed(cuts):
            body = self.get_run(ns, name[:i])
            if body is None:
                continue
            try:
                run = parse_run(body, f"{ns}/{name[:i]}")
            except RunInvalid:
                continue
            for spec in run.spec.stages:
                if child_name(run, spec.name) == name:
                    self._names[(ns, name)] = (run.metadata.name, spec.name)
                    return run.metadata.name, spec.name
        raise Refused(404, f"no AlignmentRun in {ns} has a stage whose Job is {name}")

    # ------------------------------------------------------------------ writing

    def _stage(self, ns: str, run: str, stage: str):
        body = self.get_run(ns, run)
        status = AlignmentRunStatus.model_validate((body or {}).get("status") or {})
        st = next((s for s in status.stages if s.name == stage), None)
        if st is None:
            raise Refused(409, f"stage {stage} of {ns}/{run} has not started")
        return st

    def _write(self, key: tuple[str, str], run: str, stage: str, progress: StageProgress,
               phases: tuple[str, ...] = ("Running",)) -> bool:
        ns = key[0]
        body = self.get_run(ns, run)
        status = AlignmentRunStatus.model_validate((body or {}).get("status") or {})
        index = next((i for i, s in enumerate(status.stages) if s.name == stage), None)
        if index is None or status.stages[index].phase not in phases:
            return False
        phase = status.stages[index].phase
        status.stages[index].progress = progress
        done = sum(s.phase == "Succeeded" for s in status.stages)
        ok = self.write(ns, run, index, stage, progress.wire(), summary(status.stages, done), phase=phase)
        self.throttle.wrote(key, self.clock())
        if ok:
            metrics.PROGRESS_WRITES.inc()
        return ok

    def _schedule(self, key: tuple[str, str], run: str, stage: str) -> None:
        with self._guard:
            if key in self._timers and self._timers[key].is_alive():
                return
            timer = threading.Timer(max(0.0, self.throttle.due(key) - self.clock()), self._flush, (key, run, stage))
            timer.daemon = True
            self._timers[key] = timer
            timer.start()

    def _flush(self, key: tuple[str, str], run: str, stage: str) -> None:
        try:
            with self._lock(key):
                progress = self.throttle.take(key)
                if progress is not None:
                    # Accepted while the stage ran, held back by the throttle: still its latest word
                    # when the stage has succeeded meanwhile (a trainer's final 100% arrives a moment
                    # before its pod exits, and the reconciler marks the stage within a second).
                    self._write(key, run, stage, progress, phases=("Running", "Succeeded"))
        except Exception:  # noqa: BLE001 - a timer thread has nobody to raise to
            log.exception("writing the pending progress of %s/%s failed", *key)

    def _lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


def _expires_in(token: str) -> float:
    """Seconds until the token's `exp` (read unverified: the API server has just verified it)."""
    import base64

    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return max(0.0, float(claims["exp"]) - time.time())
    except (IndexError, ValueError, KeyError, TypeError):
        return 0.0


# ---------------------------------------------------------------------------- HTTPS

def _handler(progress: Progress):
    class Handler(BaseHTTPRequestHandler):
        server_version = "alignment-operator-progress"

        def do_POST(self):  # noqa: N802 - http.server's name
            try:
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    raise Refused(411, "Content-Length required")
                if int(length) > MAX_BODY_BYTES:
                    parse_path(self.path)
                    if int(length) <= DRAIN_LIMIT:  # read and dropped, so the client gets to read the 413
                        left = int(length)
                        while left > 0 and (chunk := self.rfile.read(min(65536, left))):
                            left -= len(chunk)
                    raise Refused(413, f"body is {length} bytes; at most {MAX_BODY_BYTES}")
                # The token is checked before the body is read.
                ns, name = parse_path(self.path)
                progress.authenticate(self.headers.get("Authorization"), ns, name)
                body = self.rfile.read(int(length))
                self._reply(200, progress.handle(self.path, self.headers.get("Authorization"), body))
            except Refused as e:
                metrics.PROGRESS_REFUSED.labels(str(e.code)).inc()
                log.info("progress push to %s refused (%d): %s", self.path[:200], e.code, e)
                self.close_connection = e.code in (411, 413)
                self._reply(e.code, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - the trainer gets a 500, the operator goes on
                log.exception("progress push to %s failed", self.path[:200])
                self._reply(500, {"error": f"{type(e).__name__}: {e}"[:500]})

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):  # requests are logged by outcome above
            log.debug(fmt, *args)

    return Handler


def tls_files(tls_dir: str | None, hostnames: list[str]) -> tuple[Path, Path, str]:
    """(certificate, key, CA PEM): the chart's Secret, or a CA and certificate made now."""
    if tls_dir:
        d = Path(tls_dir)
        cert, key = d / "tls.crt", d / "tls.key"
        for f in (cert, key):
            if not f.is_file():
                raise SystemExit(f"ALIGNMENT_PROGRESS_TLS_DIR={tls_dir}: {f.name} is missing "
                                 "(a kubernetes.io/tls Secret has tls.crt and tls.key)")
        ca = d / "ca.crt"
        return cert, key, (ca if ca.is_file() else cert).read_text()
    directory = Path(tempfile.mkdtemp(prefix="alignment-progress-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)  # the key lives no longer than we do
    return self_signed(directory, hostnames)


def self_signed(directory: Path, hostnames: list[str]) -> tuple[Path, Path, str]:
    """A CA and a server certificate for `hostnames` (DNS names or IPs), valid a year."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(timezone.utc)

    def build(subject, issuer, public, signer, ca: bool, sans=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
             .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
             .not_valid_after(now + timedelta(days=365))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        else:
            b = (b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alignment-operator progress CA")])
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    sans = []
    for h in dict.fromkeys([*hostnames, "localhost", "127.0.0.1"]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    # The names are in the SANs (what clients check); a CN holds at most 64 characters, less than a Service's FQDN.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alignment-operator progress endpoint")])
    cert = build(name, ca_name, key.public_key(), ca_key, False, sans)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(pem(cert) + pem(ca))
    (directory / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    os.chmod(directory / "tls.key", 0o600)
    return directory / "tls.crt", directory / "tls.key", pem(ca).decode()


def serve(port: int, url: str, tls_dir: str | None = None, hostnames: list[str] = (),
          progress: Progress | None = None) -> tuple[Endpoint, ThreadingHTTPServer]:
    """Start the endpoint in a daemon thread; what stage pods need to reach it."""
    cert, key, ca_pem = tls_files(tls_dir, list(hostnames))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("0.0.0.0", port), _handler(progress or Progress()))
    server.daemon_threads = True
    # The handshake runs in the request's thread, not in accept(): a slow client blocks no other.
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, name="progress-endpoint", daemon=True).start()
    log.info("progress endpoint on :%d, stage pods reach it at %s", server.server_address[1], url)
    return Endpoint(url=url.rstrip("/"), ca_pem=ca_pem), server
