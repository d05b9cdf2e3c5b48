"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

Like controller-runtime's envtest, plus the controller manager, so Jobs become Pods and the
garbage collector deletes what an owner leaves behind. There is no kubelet and no scheduler:
Pods stay Pending. The binaries come from tools/k8s/build.sh.

    plane = ControlPlane.start(binaries_dir(), workdir)   # raises StartupError with log tails
    plane.kubectl("get", "namespaces")
    plane.stop()
"""

from __future__ import annotations

import ctypes
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BUILD_COMMAND = "tools/k8s/build.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "helm")
SERVICE_CIDR = "10.0.0.0/24"


class StartupError(RuntimeError):
    """The control plane did not come up; the message holds each component's log tail."""


def k8s_version() -> str:
    """The Kubernetes release pinned in tools/k8s/go.mod (the one build.sh builds)."""
    for line in (REPO / "tools/k8s/go.mod").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["k8s.io/kubernetes"]:
            return parts[1]
    raise RuntimeError("tools/k8s/go.mod does not require k8s.io/kubernetes")


def binaries_dir() -> Path:
    """Where build.sh writes the binaries; the same default and env var as build.sh."""
    default = Path.home() / ".cache/alignment-operator/k8s" / k8s_version()
    return Path(os.environ.get("ALIGNMENT_K8S_BIN") or default)


def missing_binaries(bin_dir: Path) -> list[str]:
    return [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]


def kubectl_path() -> str:
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    return "/usr/bin/kubectl" if os.path.exists("/usr/bin/kubectl") else shutil.which("kubectl") or "kubectl"


def die_with_parent() -> None:
    """In the child before exec: kill it when the test process dies, even by SIGKILL, so
    that a killed pytest leaves no etcd or apiserver behind (Linux only). SIGKILL, because
    a SIGTERMed kube-apiserver waits for etcd, which is going away at the same moment."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    # The kernel picks an unused port; a tiny race with other processes is accepted.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, fn, timeout: float = 60, interval: float = 0.2):
    """Polls fn() until it returns something truthy, and returns that; fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def write_kubeconfig(path: Path, server: str, ca: Path, user: dict) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class ControlPlane:
    workdir: Path
    bin_dir: Path
    server: str = ""
    kubeconfig: Path = Path()
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _argv: dict[str, list] = field(default_factory=dict)  # each process's command line (restart_apiserver)
    # For a real node (tests/cluster/node.py): the node's IP. The API server then also listens
    # there and advertises it (the `kubernetes` Service's endpoint, so pods reach it through
    # kube-proxy), and reaches kubelets at their InternalIP with a client certificate.
    node_ip: str = ""

    # ---- lifecycle -------------------------------------------------------------------

    @classmethod
    def start(cls, bin_dir: Path, workdir: Path, node_ip: str = "") -> "ControlPlane":
        """Starts etcd, kube-apiserver and kube-controller-manager; waits until ready."""
        plane = cls(workdir, bin_dir, node_ip=node_ip)
        try:
            plane._start()
        except BaseException as exc:  # also KeyboardInterrupt: never leak processes
            logs = plane.log_tails()
            plane.stop()
            if isinstance(exc, Exception):
                raise StartupError(f"control plane did not start: {exc}\n{logs}") from exc
            raise
        return plane

    def _start(self) -> None:
        bin_dir = self.bin_dir
        certs = write_pki(self.workdir / "pki", self.node_ip)
        etcd_url = f"http://127.0.0.1:{free_port()}"
        peer_url = f"http://127.0.0.1:{free_port()}"
        self._spawn("etcd", [
            bin_dir / "etcd", "--name=test", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}",
            "--unsafe-no-fsync",  # test data: durability is not worth the fsync latency
        ])

        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        self._spawn("kube-apiserver", [
            bin_dir / "kube-apiserver", f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", f"--secure-port={port}", "--advertise-address=127.0.0.1",
            f"--tls-cert-file={certs['apiserver.crt']}", f"--tls-private-key-file={certs['apiserver.key']}",
            f"--client-ca-file={certs['ca.crt']}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={certs['sa.pub']}",
            f"--service-account-signing-key-file={certs['sa.key']}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            # The "kubernetes" Service's endpoints would be 127.0.0.1, which validation refuses.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
        ] + ([
            # Listen on the node's IP too, advertise it as the `kubernetes` Service's endpoint
            # (replacing --endpoint-reconciler-type=none above: the last flag wins).
            "--bind-address=0.0.0.0", f"--advertise-address={self.node_ip}", "--endpoint-reconciler-type=lease",
            "--kubelet-preferred-address-types=InternalIP",  # kubectl logs/exec dial the node's IP
            f"--kubelet-client-certificate={certs['apiserver-kubelet-client.crt']}",
            f"--kubelet-client-key={certs['apiserver-kubelet-client.key']}",
            # Webhooks and aggregated APIs are dialled at their endpoints' pod IPs.
            "--enable-aggregator-routing=true",
        ] if self.node_ip else []))
        admin = {"client-certificate": str(certs["admin.crt"]), "client-key": str(certs["admin.key"])}
        self.kubeconfig = write_kubeconfig(self.workdir / "kubeconfig", self.server, certs["ca.crt"], admin)
        self._wait_ok("kube-apiserver", f"{self.server}/readyz", certs, timeout=90)

        kcm_port = free_port()
        kcm_user = {"client-certificate": str(certs["kcm.crt"]), "client-key": str(certs["kcm.key"])}
        kcm_config = write_kubeconfig(self.workdir / "kcm.kubeconfig", self.server, certs["ca.crt"], kcm_user)
        self._spawn("kube-controller-manager", [
            bin_dir / "kube-controller-manager", f"--kubeconfig={kcm_config}",
            f"--authentication-kubeconfig={kcm_config}", f"--authorization-kubeconfig={kcm_config}",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
            "--controllers=*",  # job, garbagecollector, namespace, serviceaccount(-token), ...
            "--use-service-account-credentials=true",  # each controller under its own RBAC role
            f"--service-account-private-key-file={certs['sa.key']}",
            f"--root-ca-file={certs['ca.crt']}",  # published as kube-root-ca.crt per namespace
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
        ])
        self._wait_ok("kube-controller-manager", f"https://127.0.0.1:{kcm_port}/healthz", None, timeout=60)

    def stop(self) -> None:
        """Stops the components in reverse order; SIGKILL after 10 s. Logs stay in workdir."""
        for name, proc in reversed(list(self.processes.items())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes.clear()

    def restart_apiserver(self, downtime: float) -> None:
        """kube-apiserver killed (SIGKILL), down for `downtime` seconds, then started again with the
        same flags on the same port (etcd keeps the data); returns once it is ready."""
        proc = self.processes["kube-apiserver"]
        proc.kill()
        proc.wait()
        time.sleep(downtime)
        self._spawn("kube-apiserver", self._argv["kube-apiserver"], append=True)
        certs = {"ca.crt": self.workdir / "pki" / "ca.crt", "admin.crt": self.workdir / "pki" / "admin.crt",
                 "admin.key": self.workdir / "pki" / "admin.key"}
        self._wait_ok("kube-apiserver", f"{self.server}/readyz", certs, timeout=90)

    def _spawn(self, name: str, argv: list, append: bool = False) -> None:
        self._argv[name] = argv
        log = open(self.workdir / f"{name}.log", "ab" if append else "wb")
        with log:  # the child keeps its own descriptor
            self.processes[name] = subprocess.Popen(
                [str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )

    def _wait_ok(self, name: str, url: str, certs: dict | None, timeout: float) -> None:
        """Polls url until it answers 200 "ok"; fails early if the process exits."""
        # The controller manager serves a certificate it made itself: not checked (certs=None).
        context = ssl.create_default_context(cafile=str(certs["ca.crt"])) if certs else ssl._create_unverified_context()
        if certs:
            context.load_cert_chain(str(certs["admin.crt"]), str(certs["admin.key"]))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for proc_name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc_name} exited with code {proc.returncode}")
            try:
                with urllib.request.urlopen(url, context=context, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError as exc:  # connection refused, HTTP 500 while starting, ...
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready after {timeout:.0f}s at {url}: {last}")

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for log in sorted(self.workdir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- last {len(tail)} lines of {log} ---\n" + "\n".join(tail))
        return "\n".join(out)

    # ---- clients ---------------------------------------------------------------------

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        """Until the API server serves `crd`. Not `kubectl wait`: right after the apply a CRD may have
        no conditions yet, and kubectl wait then fails at once."""
        wait_for(f"CRD {crd} Established", timeout=timeout, fn=lambda: "True" == self.kubectl(
            "get", "crd", crd, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}",
            check=False).stdout.strip())

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        """Runs kubectl against this cluster; with check, a failure raises with its stderr."""
        argv = [kubectl_path(), f"--kubeconfig={kubeconfig or self.kubeconfig}",
                # A per-cluster discovery cache: another cluster may have had this port.
                f"--cache-dir={self.workdir / 'kubectl-cache'}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}"
            )
        return result

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Runs the helm that build.sh built against this cluster, with its state under workdir."""
        env = {**os.environ, **{f"HELM_{kind}_HOME": str(self.workdir / f"helm-{kind.lower()}")
                                for kind in ("CACHE", "CONFIG", "DATA")}}
        argv = [str(self.bin_dir / "helm"), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
        return result

    def api_client(self, kubeconfig: Path | None = None):
        """A kubernetes.client.ApiClient for this cluster (admin unless kubeconfig is given)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def as_service_account(self, namespace: str, name: str) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount, with a bound token.

        The ServiceAccount must exist. Everything done with it goes through RBAC exactly
        as for a pod running under that account.
        """
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration=2h").stdout.strip()
        ca = self.workdir / "pki" / "ca.crt"
        return write_kubeconfig(self.workdir / f"sa-{namespace}-{name}.kubeconfig", self.server, ca, {"token": token})


# ---- certificates ------------------------------------------------------------------------


def write_pki(directory: Path, node_ip: str = "") -> dict[str, Path]:
    """Writes a CA, the API server's serving certificate, client certificates for the admin
    (group system:masters) and the controller manager, and the service-account signing key.
    The CA's key stays too (ca.key), so a node can sign its kubelet's certificates.

    EC P-256 keys: as good as RSA here and generated in microseconds. `cryptography` is
    imported here so that collecting tests without it fails only the cluster tests.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    files: dict[str, Path] = {}

    def save(name: str, data: bytes) -> None:
        files[name] = directory / name
        files[name].write_bytes(data)

    def save_key(name: str, key) -> None:
        save(name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))

    def name_of(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    def certificate(subject, key, issuer, issuer_key, *extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2)))
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name_of("alignment-operator test CA")
    ca = certificate(ca_name, ca_key, ca_name, ca_key, (x509.BasicConstraints(ca=True, path_length=None), True),
                     (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True))
    save("ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    save_key("ca.key", ca_key)

    def leaf(stem: str, subject: x509.Name, usage, sans=None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [(x509.BasicConstraints(ca=False, path_length=None), True),
                      (x509.ExtendedKeyUsage([usage]), False)]
        if sans:
            extensions.append((x509.SubjectAlternativeName(sans), False))
        cert = certificate(subject, key, ca_name, ca_key, *extensions)
        save(f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM))
        save_key(f"{stem}.key", key)

    service_ip = ipaddress.ip_network(SERVICE_CIDR)[1]  # the "kubernetes" Service's ClusterIP
    leaf("apiserver", name_of("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.DNSName("localhost"), x509.DNSName("kubernetes"), x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"), x509.DNSName("kubernetes.default.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(service_ip),
        *([x509.IPAddress(ipaddress.ip_address(node_ip))] if node_ip else []),
    ])
    leaf("admin", name_of("admin", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH)
    leaf("kcm", name_of("system:kube-controller-manager"), ExtendedKeyUsageOID.CLIENT_AUTH)
    # kube-apiserver -> kubelet (logs, exec); system:masters passes the kubelet's own authorization.
    leaf("apiserver-kubelet-client", name_of("kube-apiserver-kubelet-client", "system:masters"),
         ExtendedKeyUsageOID.CLIENT_AUTH)

    sa_key = ec.generate_private_key(ec.SECP256R1())
    save_key("sa.key", sa_key)
    save("sa.pub", sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
    return files
