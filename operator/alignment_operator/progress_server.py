"""The HTTPS endpoint stage pods push live progress to (the contract is in progress.py).

    ALIGNMENT_PROGRESS_PORT        port to serve on (default 8443; 0: no endpoint, no progress wiring)
    ALIGNMENT_PROGRESS_URL         how stage pods reach it, e.g. https://alignment-operator.alignment-system.svc:8443
    ALIGNMENT_PROGRESS_TLS_DIR     tls.crt + tls.key (+ ca.crt) from the user's Secret (cert-manager's, say);
                                   a renewed certificate there is loaded without a restart
    ALIGNMENT_PROGRESS_TLS_SECRET  <namespace>/<name>: the installation's CA and certificate, kept in this
                                   Secret (made by the first operator that finds none), so that every replica
                                   and every restart serves the CA the running stage pods trust
    neither                        a CA and certificate made at start-up (a local `alignctl operator`)
    ALIGNMENT_PROGRESS_<LIMIT>     the listener's limits (listener.Limits: MAX_CONNECTIONS, PER_CLIENT, ...)

Every push is authenticated with a TokenReview for the stage's own audience (kube.review_token:
the API server checks signature, expiry, audience and the bound pod); the token must be bound to
a pod of the stage's own child (the review's pod name and uid, checked against that pod), its
namespace must be the path's, and the body is checked before anything is written. Before any
review, a token that cannot be the stage's (not a service-account JWT for this audience and
namespace, expired, or refused in the last REFUSED_CACHE_S) is refused without one, and reviews
are rate-limited per client. Status writes go through kube.py, at most one per stage every
progress.MIN_WRITE_INTERVAL_S. What a refusal says names nothing of the operator; the log has why.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
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
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from . import kube, metrics
from .api import AlignmentRunStatus, RunInvalid, StageProgress, parse_run
from .bounded import Recent
from .listener import Limits, Listener, Loop, Pool, RateLimiter, client_of, reply, shared_loop
from .progress import (API_PATH, MAX_BODY_BYTES, Refused, Throttle, audience, beat_rank, completed, newest_beats,
                       only_a_beat, parse_path, parse_report, rfc3339_ms, stage_progress, summary)
from .identity import LABEL_RUN, LABEL_STAGE, child_name

log = logging.getLogger("alignment_operator.progress")
TOKEN_CACHE_S = 60.0     # a token the API server accepted is trusted this long (never past its expiry)
REFUSED_CACHE_S = 30.0   # a token refused is refused again without a review for this long
TOKENS = 4096            # tokens remembered (accepted and refused, each)
STAGES = 4096            # stages remembered (names, throttle slots)
STATE_TTL_S = 900.0      # a stage nobody pushed for this long is forgotten
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
REVIEW_RATE = dict(rate=5.0, burst=20.0)  # TokenReviews a second one client address may cause


@dataclass(frozen=True)
class Endpoint:
    url: str      # base URL stage pods use
    ca_pem: str   # the CA they verify it with


def _refused(aud: str, why: str, *args: Any, level: int = logging.INFO) -> Refused:
    """401 for the client, naming only its own audience; the reason goes to the log (refusals
    without a review at debug level: a flood of them would be a flood of lines)."""
    log.log(level, "progress token for %s refused: " + why, aud, *args)
    return Refused(401, f"token refused for audience {aud}")


def _claims(token: str) -> dict[str, Any] | None:
    """A JWT's payload, read unverified (only ever to refuse early; the API server decides acceptance)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


class Progress:
    """Decides what a push does; I/O through the functions it is given (kube.py's by default).

    Thread-safe: the listener calls it from its pool's threads. Everything it keeps is bounded
    (Recent) and a stage's state goes when the stage ends, its run is deleted (forget_run) or
    nobody pushed for STATE_TTL_S.
    """

    def __init__(self, review: Callable = None, get_run: Callable = None, write: Callable = None,
                 get_pod: Callable = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, later: Callable = None):
        self.review = review or kube.review_token
        self.get_run = get_run or kube.get_run
        self.get_pod = get_pod or kube.get_pod
        self.write = write or kube.patch_stage_progress
        self.clock, self.wall = clock, wall
        self.later = later or _timer
        self.throttle = Throttle()
        self._tokens: Recent = Recent(TOKENS)    # digest -> (trusted until, (ns, job name))
        self._refused: Recent = Recent(TOKENS)   # digest -> refused until
        self._names: Recent = Recent(STAGES)     # (ns, job name) -> (run, stage)
        self._seen: Recent = Recent(STAGES)      # (ns, job name) -> last push (monotonic)
        self._pending: set[tuple[str, str]] = set()  # stages with a flush scheduled
        self._beats: Recent = Recent(STAGES)     # (ns, job name) -> {rank: its last beat (RFC 3339)}
        self._stripes = [threading.Lock() for _ in range(64)]  # per-stage locks, bounded by construction
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ one push

    def handle(self, path: str, authorization: str | None, body: bytes) -> dict[str, Any]:
        """A push, start to end; Refused says the HTTP status and why."""
        ns, name = parse_path(path)
        self.authenticate(authorization, ns, name)
        now = datetime.fromtimestamp(self.wall(), timezone.utc)
        report = parse_report(body, now)
        if report.sent > now:  # a pod's clock ahead of ours would lock later pushes out: read it as now
            report = replace(report, sent=now)
        run, stage = self.resolve(ns, name)
        key = (ns, name)
        rank = beat_rank(report)
        with self._guard:
            self._seen[key] = self.clock()
            if rank is not None:  # a rank's alive beat: remembered, written with the stage's next progress write
                beats = self._beats.setdefault(key, {})
                self._beats[key] = newest_beats(beats, {rank: rfc3339_ms(report.sent)})
        if only_a_beat(report):
            return {"accepted": True, "written": self._beat(key, run, stage)}
        with self._lock(key):
            st = self._stage(ns, run, stage)
            if st.phase != "Running":
                self._forget_unless_pending(key)
                raise Refused(409, f"stage {stage} of {ns}/{run} is {st.phase}, not Running: nothing to report")
            begun = _begun(st.start_time)
            if begun is not None and report.sent < begun:
                # A pod of an earlier attempt (the same child name: a Job recreated after a hang or a
                # deletion) whose report arrives late: none of this attempt's progress.
                raise Refused(409, f"report of {rfc3339_ms(report.sent)} is older than stage {stage}'s current "
                                   f"attempt (started {st.start_time}): an earlier attempt's pod")
            self.throttle.check_fresh(key, report.sent, st.progress.last_updated if st.progress else None)
            slot = self.throttle.slots.get(key)
            previous = slot.pending if slot and slot.pending is not None else st.progress
            progress = stage_progress(report, previous)
            if self.throttle.offer(key, progress, report.sent, self.clock()):
                written = self._write(key, run, stage, progress)
            else:
                written = False
                self._schedule(key, run, stage)
        self._sweep()
        return {"accepted": True, "written": written}

    def _beat(self, key: tuple[str, str], run: str, stage: str) -> bool:
        """A beat reaches status with the stage's progress as it stands (nothing else moves), throttled like a
        report: now when a write is due, else with the next one. No GET per beat: every rank beats. Before this
        replica took the stage's first report (loading, reference precompute) a beat is only remembered."""
        with self._lock(key):
            slot = self.throttle.slots.get(key)
            if slot is None or slot.last_sent is None:
                return False
            if self.clock() < self.throttle.due(key):
                self._schedule(key, run, stage)
                return False
            return self._write(key, run, stage, self.throttle.take(key))

    def _digest(self, authorization: str | None, aud: str) -> tuple[str, str]:
        if not authorization or not authorization.startswith("Bearer ") or len(authorization) > 8192:
            raise Refused(401, "no bearer token (Authorization: Bearer <the pod's projected token>)")
        token = authorization[len("Bearer "):].strip()
        return token, hashlib.sha256(f"{aud}\0{token}".encode()).hexdigest()

    def known(self, authorization: str | None, ns: str, name: str) -> bool:
        """Without any I/O: True for a token accepted lately; Refused for one that cannot be the
        stage's or was refused lately; False when only a TokenReview can tell."""
        aud = audience(ns, name)
        token, digest = self._digest(authorization, aud)
        now = self.clock()
        with self._guard:
            trusted = self._tokens.touch(digest)
            if trusted is not None and trusted[0] > now:
                return True
            if self._refused.touch(digest, 0.0) > now:
                raise Refused(401, f"token refused for audience {aud}")
        claims = _claims(token)
        why = None
        if claims is None:
            why = "not a JWT"
        elif aud not in ([claims.get("aud")] if isinstance(claims.get("aud"), str) else claims.get("aud") or []):
            why = "another audience"
        elif not isinstance(claims.get("exp"), (int, float)) or claims["exp"] <= self.wall():
            why = "expired or without exp"
        elif ((claims.get("kubernetes.io") or {}).get("namespace") if isinstance(claims.get("kubernetes.io"), dict)
              else None) != ns:
            why = "not a service-account token of this namespace"
        elif not isinstance(claims["kubernetes.io"].get("pod"), dict):
            why = "not bound to a pod"
        if why:
            self._refuse(digest)
            raise _refused(aud, why, level=logging.DEBUG)
        return False

    def authenticate(self, authorization: str | None, ns: str, name: str) -> None:
        """The token is the stage's: a TokenReview, then its pod must be one of the stage's child."""
        if self.known(authorization, ns, name):
            return
        aud = audience(ns, name)
        token, digest = self._digest(authorization, aud)
        metrics.PROGRESS_REVIEWS.inc()
        said = self.review(token, aud)  # an exception (the API server unreachable) is not cached
        try:
            if not said["authenticated"] or aud not in said["audiences"]:
                raise _refused(aud, "TokenReview: %s", said.get("error") or "not authenticated")
            user = said.get("username") or ""
            if not user.startswith(f"system:serviceaccount:{ns}:"):
                log.info("progress token of %s for %s refused: another namespace", user, aud)
                raise Refused(403, f"this token may not report for namespace {ns}")
            extra = said.get("extra") or {}
            pod_name, pod_uid = (extra.get(POD_NAME) or [None])[0], (extra.get(POD_UID) or [None])[0]
            if not pod_name or not pod_uid:
                raise _refused(aud, "%s is not bound to a pod", user)
            run, stage = self.resolve(ns, name)
            self._check_pod(aud, ns, run, stage, name, pod_name, pod_uid)
        except Refused:
            self._refuse(digest)
            raise
        with self._guard:
            self._tokens[digest] = (self.clock() + min(TOKEN_CACHE_S, _expires_in(token, self.wall())), (ns, name))

    def _check_pod(self, aud: str, ns: str, run: str, stage: str, child: str, pod_name: str, pod_uid: str) -> None:
        """The token's pod exists with its uid and belongs to the stage's child: its run and stage
        labels, and its controller is the child (a Job or PyTorchJob) or one of its JobSet's Jobs."""
        pod = self.get_pod(ns, pod_name)
        meta = (pod or {}).get("metadata") or {}
        if not pod or meta.get("uid") != pod_uid:
            raise _refused(aud, "pod %s/%s (uid %s) is gone", ns, pod_name, pod_uid)
        labels = meta.get("labels") or {}
        owner = next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), {})
        ours = (labels.get(LABEL_RUN) == run and labels.get(LABEL_STAGE) == stage and (
            (owner.get("kind") in ("Job", "PyTorchJob") and owner.get("name") == child)
            or (owner.get("kind") == "Job" and labels.get(JOBSET_NAME) == child
                and str(owner.get("name", "")).startswith(child + "-"))))
        if not ours:
            raise _refused(aud, "pod %s/%s is not a pod of stage %s of run %s", ns, pod_name, stage, run)

    def _refuse(self, digest: str) -> None:
        with self._guard:
            self._refused[digest] = self.clock() + REFUSED_CACHE_S

    def resolve(self, ns: str, name: str) -> tuple[str, str]:
        """(run, stage) whose stage child is `name`: the run is a prefix of the name up to a '-'."""
        with self._guard:
            found = self._names.touch((ns, name))
        if found:
            return found
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
                    with self._guard:
                        self._names[(ns, name)] = (run.metadata.name, spec.name)
                    return run.metadata.name, spec.name
        raise Refused(404, f"no AlignmentRun in {ns} has a stage whose Job is {name}")

    # ------------------------------------------------------------------ forgetting

    def forget(self, key: tuple[str, str]) -> None:
        """Everything of one stage: its throttle slot, name and tokens."""
        with self._guard:
            self.throttle.forget(key)
            self._names.pop(key, None)
            self._seen.pop(key, None)
            self._beats.pop(key, None)
            self._pending.discard(key)
            for digest in [d for d, (_, k) in self._tokens.items() if k == key]:
                del self._tokens[digest]

    def forget_run(self, ns: str, run: str) -> None:
        """The run is gone (or finished): every stage of it."""
        with self._guard:
            keys = {k for k, (r, _) in self._names.items() if k[0] == ns and r == run}
            keys |= {k for k in self.throttle.slots if k[0] == ns and k[1].startswith(run + "-")}
        for key in keys:
            self.forget(key)

    def _forget_unless_pending(self, key: tuple[str, str]) -> None:
        with self._guard:
            pending = key in self._pending
        if not pending:
            self.forget(key)

    def _sweep(self) -> None:
        """Forget stages nobody pushed to for STATE_TTL_S (the oldest come first in _seen)."""
        limit = self.clock() - STATE_TTL_S
        while True:
            with self._guard:
                key, last = next(iter(self._seen.items()), (None, None))
                if key is None or last > limit or key in self._pending:
                    return
                self._seen.pop(key)
            self.forget(key)

    def sizes(self) -> dict[str, int]:
        """How much is remembered (the benchmark and the tests read it)."""
        with self._guard:
            return {"tokens": len(self._tokens), "refused": len(self._refused), "names": len(self._names),
                    "slots": len(self.throttle.slots), "pending": len(self._pending)}

    # ------------------------------------------------------------------ writing

    def _stage(self, ns: str, run: str, stage: str):
        body = self.get_run(ns, run)
        status = AlignmentRunStatus.model_validate((body or {}).get("status") or {})
        st = next((s for s in status.stages if s.name == stage), None)
        if st is None:
            raise Refused(409, f"stage {stage} of {ns}/{run} has not started")
        return st

    def _write(self, key: tuple[str, str], run: str, stage: str, progress: StageProgress | None,
               phases: tuple[str, ...] = ("Running",)) -> bool:
        """The stage's progress (None: as status has it, for the ranks' beats), with every rank's newest beat:
        this replica's and what status holds (another replica's)."""
        ns = key[0]
        body = self.get_run(ns, run)
        self.throttle.wrote(key, self.clock())  # written or not, the next look is an interval away
        status = AlignmentRunStatus.model_validate((body or {}).get("status") or {})
        index = next((i for i, s in enumerate(status.stages) if s.name == stage), None)
        if index is None or status.stages[index].phase not in phases:
            return False
        phase, stored = status.stages[index].phase, status.stages[index].progress
        progress = progress or stored
        if progress is None:  # nothing reported yet (loading, reference precompute): beats wait for the first report
            return False
        if phase == "Succeeded":  # a held-back report, flushed after the end: the stage did every step
            progress = completed(progress, stored.step if stored and stored.percent == 100 else None)
        with self._guard:
            beats = self._beats.get(key) or {}
        progress = progress.model_copy(update={"ranks": newest_beats(stored.ranks if stored else {}, beats) or None})
        status.stages[index].progress = progress
        done = sum(s.phase == "Succeeded" for s in status.stages)
        ok = self.write(ns, run, index, stage, progress.wire(), summary(status.stages, done), phase=phase)
        if ok:
            metrics.PROGRESS_WRITES.inc()
        return ok

    def _schedule(self, key: tuple[str, str], run: str, stage: str) -> None:
        with self._guard:
            if key in self._pending:
                return
            self._pending.add(key)
        self.later(max(0.0, self.throttle.due(key) - self.clock()), self._flush, key, run, stage)

    def _flush(self, key: tuple[str, str], run: str, stage: str) -> None:
        try:
            with self._lock(key):
                wait = self.throttle.due(key) - self.clock()
                if wait > 0:  # a report written meanwhile (its offer came due first): the next look is after it
                    self.later(wait, self._flush, key, run, stage)
                    return
                with self._guard:
                    self._pending.discard(key)
                progress = self.throttle.take(key)
                if progress is not None:
                    # Accepted while the stage ran, held back by the throttle: still its latest word
                    # when the stage has succeeded meanwhile (a trainer's final 100% arrives a moment
                    # before its pod exits, and the reconciler marks the stage within a second).
                    self._write(key, run, stage, progress, phases=("Running", "Succeeded"))
                else:  # only beats came since the last write
                    self._write(key, run, stage, None)
        except Exception:  # noqa: BLE001 - a timer has nobody to raise to
            log.exception("writing the pending progress of %s/%s failed", *key)

    def _lock(self, key: tuple[str, str]) -> threading.Lock:
        return self._stripes[hash(key) % len(self._stripes)]


def _begun(start_time: str | None) -> datetime | None:
    """The current attempt's start (status.stages[].startTime, whole seconds), None when not known."""
    try:
        t = datetime.fromisoformat(start_time.replace("Z", "+00:00")) if start_time else None
    except ValueError:
        return None
    return t if t is None or t.tzinfo else t.replace(tzinfo=timezone.utc)


def _timer(delay: float, fn: Callable, *args: Any) -> None:
    timer = threading.Timer(delay, fn, args)
    timer.daemon = True
    timer.start()


def _expires_in(token: str, now: float) -> float:
    """Seconds until the token's `exp` (read unverified: the API server has just verified it)."""
    claims = _claims(token) or {}
    exp = claims.get("exp")
    return max(0.0, float(exp) - now) if isinstance(exp, (int, float)) else 0.0


# ---------------------------------------------------------------------------- HTTPS

def _handler(progress: Progress, pool: Pool, limits: Limits, reviews: RateLimiter, all_reviews: RateLimiter):
    async def push(request):
        path = request.raw_path
        try:
            if request.method != "POST":
                raise Refused(405, f"POST {API_PATH}")
            ns, name = parse_path(path)
            length = request.content_length
            if length is None:
                raise Refused(411, "Content-Length required")
            if length > MAX_BODY_BYTES:
                raise Refused(413, f"body is {length} bytes; at most {MAX_BODY_BYTES}")
            authorization = request.headers.get("Authorization")
            # The token is checked before the body is read; a review only for what might pass.
            if not progress.known(authorization, ns, name):
                if not reviews.allow(client_of(request)) or not all_reviews.allow("*"):
                    raise Refused(429, "too many token reviews; retry in a few seconds")
                await pool.run(progress.authenticate, authorization, ns, name)
            try:
                body = await asyncio.wait_for(request.content.readexactly(length), limits.body_s)
            except (asyncio.IncompleteReadError, asyncio.TimeoutError):
                raise Refused(400, f"body: expected {length} bytes in {limits.body_s:g} s") from None
            return reply(200, await pool.run(progress.handle, path, authorization, body))
        except Refused as e:
            metrics.PROGRESS_REFUSED.labels(str(e.code)).inc()
            log.debug("progress push to %s refused (%d): %s", path[:200], e.code, e)
            response = reply(e.code, {"error": str(e)}, {"Retry-After": "2"} if e.code == 429 else None)
            if e.code in (400, 411):  # the rest of the body (if any) cannot be told from the next request
                response.force_close()     # (after any other refusal aiohttp reads and drops it for 1 s at most)
            return response

    return push


def tls_files(tls_dir: str | None, hostnames: list[str]) -> tuple[Path, Path, str, Callable | None]:
    """(certificate, key, CA PEM, refresh): the user's Secret, the installation's Secret, or a CA
    and certificate made now (see the module's docstring for which). `refresh`, for the
    installation's Secret, reads it again and renews the certificate near its expiry."""
    if tls_dir:
        d = Path(tls_dir)
        cert, key = d / "tls.crt", d / "tls.key"
        for f in (cert, key):
            if not f.is_file():
                raise SystemExit(f"ALIGNMENT_PROGRESS_TLS_DIR={tls_dir}: {f.name} is missing "
                                 "(a kubernetes.io/tls Secret has tls.crt and tls.key)")
        ca = d / "ca.crt"
        return cert, key, (ca if ca.is_file() else cert).read_text(), None
    directory = Path(tempfile.mkdtemp(prefix="alignment-progress-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)  # the key lives no longer than we do
    secret = os.environ.get("ALIGNMENT_PROGRESS_TLS_SECRET", "")
    if secret:
        ns, _, name = secret.partition("/")
        if not ns or not name:
            raise SystemExit(f"ALIGNMENT_PROGRESS_TLS_SECRET={secret!r}: expected <namespace>/<name>")
        store = kube.SecretStore(ns, name)
        cert, key, ca = installation_tls(directory, hostnames, store)
        return cert, key, ca, lambda: installation_tls(directory, hostnames, store)
    return (*self_signed(directory, hostnames), None)


# ---------------------------------------------------------------------------- certificates

RENEW_BEFORE = timedelta(days=30)   # the installation's certificate is renewed this long before it expires


def _pem(obj) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "public_bytes"):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(days: int = 3650) -> tuple[bytes, bytes]:
    """(CA certificate PEM, CA key PEM): the installation's CA, valid ten years."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alignment-operator progress CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256()))
    return _pem(cert), _pem(key)


def sign(ca_pem: bytes, ca_key_pem: bytes, hostnames: list[str], days: int = 365) -> tuple[bytes, bytes]:
    """(certificate chain PEM, key PEM) for `hostnames` (DNS names or IPs), signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    now = datetime.now(timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for h in dict.fromkeys([*hostnames, "localhost", "127.0.0.1"]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    # The names are in the SANs (what clients check); a CN holds at most 64 characters, less than a Service's FQDN.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alignment-operator progress endpoint")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _pem(cert) + ca_pem, _pem(key)


def _write_files(directory: Path, chain: bytes, key: bytes) -> tuple[Path, Path]:
    """tls.crt and tls.key in `directory`; unchanged files are left alone (the watcher reloads on a change)."""
    directory.mkdir(parents=True, exist_ok=True)
    crt_path, key_path = directory / "tls.crt", directory / "tls.key"
    if crt_path.is_file() and key_path.is_file() and crt_path.read_bytes() == chain and key_path.read_bytes() == key:
        return crt_path, key_path
    (directory / "tls.crt").write_bytes(chain)
    # The key is written to a new file made 0600 before a byte of it is written, then renamed into place.
    tmp = directory / ".tls.key.new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    os.replace(tmp, directory / "tls.key")
    return directory / "tls.crt", directory / "tls.key"


def self_signed(directory: Path, hostnames: list[str]) -> tuple[Path, Path, str]:
    """A CA and a server certificate for `hostnames` (DNS names or IPs), valid a year."""
    ca, ca_key = make_ca(days=365)
    cert, key = _write_files(directory, *sign(ca, ca_key, hostnames))
    return cert, key, ca.decode()


def needs_renewal(chain_pem: bytes, hostnames: list[str], now: datetime | None = None) -> str | None:
    """Why the installation's certificate must be made anew (None: it may stay)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError:
        return "unreadable"
    now = now or datetime.now(timezone.utc)
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no names"
    have = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    missing = [h for h in hostnames if h not in have]
    return f"lacks {missing}" if missing else None


def installation_tls(directory: Path, hostnames: list[str], store) -> tuple[Path, Path, str]:
    """The installation's CA and certificate, kept in one Secret (`store`: kube.SecretStore), so
    that every replica, every restart and every upgrade serves the CA the stage pods already trust.
    The first operator to find no Secret makes it (another that made it first wins: its CA is
    used); a certificate near its expiry or missing a name is signed anew by the same CA."""
    data, made = store.read(), False
    if data is None:
        ca, ca_key = make_ca()
        chain, key = sign(ca, ca_key, hostnames)
        data = store.create({"ca.crt": ca, "ca.key": ca_key, "tls.crt": chain, "tls.key": key})
        made = data is not None
        if data is None:  # another replica made it meanwhile
            data = store.read()
    log.info("progress endpoint: the installation's CA, %s Secret %s/%s", "made into" if made else "read from",
             store.namespace, store.name)
    missing = {"ca.crt", "ca.key", "tls.crt", "tls.key"} - set(data)
    if missing:
        raise SystemExit(f"Secret {store.namespace}/{store.name} lacks {sorted(missing)}: delete it (stage pods "
                         "started before then lose their progress) or name your own in progress.tlsSecretName")
    why = needs_renewal(data["tls.crt"], hostnames)
    if why:
        chain, key = sign(data["ca.crt"], data["ca.key"], hostnames)
        updated = store.replace({**data, "tls.crt": chain, "tls.key": key})
        data = updated if updated is not None else store.read()  # a replica renewed it first: theirs
        log.info("progress endpoint: certificate renewed (%s)", why)
    cert, key = _write_files(directory, data["tls.crt"], data["tls.key"])
    return cert, key, data["ca.crt"].decode()


class CertWatcher:
    """Loads the certificate again when its files change on disk (a Secret volume's update, a
    cert-manager renewal) or when `refresh` makes new ones: new handshakes use it, open
    connections keep theirs."""

    def __init__(self, context: ssl.SSLContext, cert: Path, key: Path, refresh: Callable | None = None):
        self.context, self.cert, self.key, self.refresh = context, cert, key, refresh
        self.seen = self._signature()
        self.reloads = 0

    def _signature(self) -> tuple:
        try:
            return tuple((s.st_mtime_ns, s.st_ino, s.st_size) for s in (self.cert.stat(), self.key.stat()))
        except OSError:
            return ()

    def check(self) -> bool:
        """Reload if the files changed; True when it did."""
        signature = self._signature()
        if not signature or signature == self.seen:
            return False
        try:
            self.context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:  # half-written (the next check retries): keep serving the old one
            log.warning("progress endpoint: could not load the changed certificate yet: %s", e)
            return False
        self.seen, self.reloads = signature, self.reloads + 1
        log.info("progress endpoint: certificate reloaded from %s", self.cert)
        return True

    async def run(self, every: float = 10.0, refresh_every: float = 3600.0) -> None:
        loop, last_refresh = asyncio.get_running_loop(), time.monotonic()
        while True:
            await asyncio.sleep(every)
            try:
                if self.refresh and time.monotonic() - last_refresh >= refresh_every:
                    last_refresh = time.monotonic()
                    await loop.run_in_executor(None, self.refresh)
                self.check()
            except Exception:  # noqa: BLE001 - keep serving the certificate we have
                log.exception("progress endpoint: refreshing the certificate failed")


# ---------------------------------------------------------------------------- serving

PROGRESS_LIMITS = dict(max_connections=256, per_client=16)  # asyncio holds a 256 KiB TLS buffer per connection
_serving: list[Progress] = []   # what serve() started in this process


def forget_run(namespace: str, name: str) -> None:
    """A run was deleted: its stages' state goes (handlers.py calls this)."""
    for progress in _serving:
        progress.forget_run(namespace, name)



def serve(port: int, url: str, tls_dir: str | None = None, hostnames: list[str] = (),
          progress: Progress | None = None, host: str = "0.0.0.0", loop: Loop | None = None,
          limits: Limits | None = None) -> tuple[Endpoint, Listener]:
    """Start the endpoint on the operator's listener thread; what stage pods need to reach it."""
    cert, key, ca_pem, refresh = tls_files(tls_dir, list(hostnames))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    loop = loop or shared_loop()
    limits = limits or Limits.from_env("ALIGNMENT_PROGRESS", **PROGRESS_LIMITS)
    pool = Pool(workers=4, queue=32)
    progress = progress or Progress()
    if progress.later is _timer:  # held-back reports flush from the loop's timers, not a thread each
        progress.later = lambda delay, fn, *args: loop.loop.call_soon_threadsafe(
            loop.loop.call_later, delay, pool.executor.submit, fn, *args)
    listener = Listener("progress", _handler(progress, pool, limits, RateLimiter(**REVIEW_RATE),
                                             RateLimiter(rate=50.0, burst=100.0)),
                        port, host, ssl_context=context, limits=limits)
    listener.progress = progress
    loop.call(listener.start())
    _serving.append(progress)
    if tls_dir or refresh:
        watcher = CertWatcher(context, cert, key, refresh=refresh)
        loop.loop.call_soon_threadsafe(lambda: loop.loop.create_task(watcher.run()))
    log.info("progress endpoint on :%d, stage pods reach it at %s", listener.port, url)
    return Endpoint(url=url.rstrip("/"), ca_pem=ca_pem), listener
