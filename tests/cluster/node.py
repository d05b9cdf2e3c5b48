"""A real node beside the test control plane: containerd + runc + CNI bridge, kubelet,
kube-scheduler, kube-proxy (iptables) and CoreDNS on the host network, so pods run for real.

    plane = ControlPlane.start(binaries_dir(), workdir, node_ip=host_ip())
    node = Node.start(plane, workdir / "node", images)     # raises StartupError with log tails
    node.workspace("ns", "tiny")     # a writable hostPath PV pre-bound to the run's PVC
    node.stop()                      # deletes the pods, stops everything, cleans the host

Binaries: kubelet, kube-scheduler, kube-proxy, coredns from tools/k8s/build.sh; containerd,
runc, CNI plugins, iptables from Debian (scripts/node-packages); images from
scripts/build-images, imported into containerd once (its image store persists under
~/.cache/alignment-operator/node/containerd, so a later session imports nothing; a rebuilt
image brings only the layers the store lacks: after a trainer code change, its last few).

The kubelet writes outside its root dir; stop() (and start(), for a crashed earlier session)
removes all of it: the device-plugin socket, the bind mount of --root-dir, the /kubepods
cgroups of every v1 hierarchy, its iptables chains and kube-proxy's, the CNI bridge, and
containerd's containers. See ../shared/notes/real-node.md for why each is there.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controlplane import BUILD_COMMAND, ControlPlane, StartupError, die_with_parent, free_port, wait_for, write_kubeconfig

NODE_BINARIES = ("kubelet", "kube-scheduler", "kube-proxy", "coredns")
HOST_COMMANDS = ("containerd", "runc", "ctr", "iptables", "ip", "podman", "conntrack")
IMAGES = ("pause", "trainer", "operator", "jobset", "training-operator", "kueue")
PACKAGES_COMMAND = "scripts/node-packages"
IMAGES_COMMAND = "scripts/build-images"
NODE_NAME = "alignment-node"
POD_CIDR = "10.244.0.0/24"   # not 10.88.0.0/16: podman's default bridge takes that one
BRIDGE = "alncni0"
CLUSTER_DOMAIN = "cluster.local"
STORE = Path(os.environ.get("ALIGNMENT_NODE_STORE") or Path.home() / ".cache/alignment-operator/node")
IMAGE_REFS = Path(os.environ.get("ALIGNMENT_IMAGES") or Path.home() / ".cache/alignment-operator/images")
# Chains the kubelet makes (iptables "util chains") in each table it touches.
KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")


def host_ip() -> str:
    """The address of the interface the default route uses: the node's InternalIP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.254", 9))  # no packet is sent; the kernel only picks a source address
        return s.getsockname()[0]


def missing_requirements(bin_dir: Path) -> list[str]:
    """What the node needs and this machine lacks, each with the command that provides it."""
    missing = [f"{b} (build: {BUILD_COMMAND})" for b in NODE_BINARIES if not os.access(bin_dir / b, os.X_OK)]
    missing += [f"{c} (install: {PACKAGES_COMMAND})" for c in HOST_COMMANDS if not shutil.which(c)]
    if not Path("/usr/lib/cni/bridge").exists():
        missing.append(f"CNI plugins in /usr/lib/cni (install: {PACKAGES_COMMAND})")
    for image in IMAGES:
        ref = IMAGE_REFS / f"{image}.ref"
        if not ref.exists() or (shutil.which("podman") and run("podman", "image", "exists", ref.read_text().strip(),
                                                                check=False).returncode != 0):
            missing.append(f"image {image} (build: {IMAGES_COMMAND})")
    if os.geteuid() != 0:
        missing.append("root (containerd and the kubelet need it)")
    return missing


def image_ref(name: str) -> str:
    """The tag scripts/build-images gave image `name` (trainer, operator, pause, an engine)."""
    return (IMAGE_REFS / f"{name}.ref").read_text().strip()


def run(*argv: str, check: bool = True, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], input=input, capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({result.returncode}): "
                           f"{result.stderr.decode(errors='replace')[-2000:]}")
    return result


@dataclass
class Node:
    plane: ControlPlane
    workdir: Path
    ip: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)

    # ---- lifecycle -------------------------------------------------------------------

    @classmethod
    def start(cls, plane: ControlPlane, workdir: Path) -> "Node":
        node = cls(plane, workdir, plane.node_ip)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            clean_host(NODE_NAME)  # what a crashed earlier session may have left
            node._start()
        except BaseException as exc:
            logs = node.log_tails()
            node.stop()
            if isinstance(exc, Exception):
                raise StartupError(f"node did not start: {exc}\n{logs}") from exc
            raise
        return node

    def _start(self) -> None:
        self.images = {name: image_ref(name) for name in IMAGES}
        certs = self._certificates()
        self._start_containerd()
        self._import_images()
        self._start_kubelet(certs)
        wait_for(f"node {NODE_NAME} Ready", timeout=90, fn=self._ready)
        bin_dir = self.plane.bin_dir
        sched = write_kubeconfig(self.workdir / "scheduler.kubeconfig", self.plane.server, certs["ca.crt"],
                                 _cert_user(certs, "scheduler"))
        self._spawn("kube-scheduler", [
            bin_dir / "kube-scheduler", f"--kubeconfig={sched}", f"--authentication-kubeconfig={sched}",
            f"--authorization-kubeconfig={sched}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
        ])
        self._start_kube_proxy(certs)
        self._start_dns()

    @classmethod
    def preload(cls, names: list[str]) -> None:
        """Imports images `names` (pause among them) into containerd's persistent store with no node
        running: scripts/test does it beside the Go build, as soon as they are built. On a new
        machine the trainer's 7.7 GB otherwise took the node tests' first start 250-320 s, while the
        other pytest process had long been computing (fresh-clone cold CI runs at 9ef52ff, 32bd250)."""
        with tempfile.TemporaryDirectory(prefix="alignment-preload-") as tmp:
            node = cls(None, Path(tmp), "")  # type: ignore[arg-type]  # no control plane: containerd only
            node.images = {name: image_ref(name) for name in names}
            try:
                node._start_containerd()
                node._import_images(prune=False)  # the other images' builds are not stale
            except BaseException:
                print(node.log_tails())
                raise
            finally:
                _terminate(node.processes.pop("containerd", None))

    def stop(self) -> None:
        """Deletes every pod (so the kubelet tears sandboxes and CNI down), stops the node's
        processes, then removes what the kubelet and containerd left on the host."""
        if "kubelet" in self.processes and self.processes["kubelet"].poll() is None:
            # Owners first, or their controllers would make the pods again.
            self.plane.kubectl("delete", "alignmentruns,jobs,deployments,replicasets,statefulsets", "--all",
                               "--all-namespaces", "--wait=false", check=False)
            self.plane.kubectl("delete", "pods", "--all", "--all-namespaces", "--wait=false", "--grace-period=5", check=False)
            try:
                wait_for("the node's pods to be gone", timeout=60, interval=1, fn=lambda: not self.plane.kubectl(
                    "get", "pods", "-A", "-o", "name", check=False).stdout.strip())
            except AssertionError:
                pass  # containerd's containers are removed below anyway
        for name in ("coredns", "kube-proxy", "kube-scheduler", "kubelet"):
            _terminate(self.processes.pop(name, None))
        if "containerd" in self.processes and self.processes["containerd"].poll() is None:
            self._remove_containers()
        _terminate(self.processes.pop("containerd", None))
        if (self.plane.bin_dir / "kube-proxy").exists():
            run(self.plane.bin_dir / "kube-proxy", "--cleanup", check=False)
        clean_host(NODE_NAME, self.workdir)

    # ---- pieces ----------------------------------------------------------------------

    def _certificates(self) -> dict[str, Path]:
        """The kubelet's client certificate (the Node authorizer knows it by CN system:node:<name>,
        O system:nodes), and the scheduler's, kube-proxy's and CoreDNS's, signed by the test CA."""
        pki = self.plane.workdir / "pki"
        certs = {"ca.crt": pki / "ca.crt"}
        for stem, cn, org in (("kubelet", f"system:node:{NODE_NAME}", "system:nodes"),
                              ("scheduler", "system:kube-scheduler", None),
                              ("kube-proxy", "system:kube-proxy", None),
                              ("coredns", "coredns", None)):
            certs.update(sign_client_cert(pki, self.workdir / "pki", stem, cn, org))
        return certs

    def _start_containerd(self) -> None:
        root = STORE / "containerd"  # content + snapshots persist: images are imported once
        root.mkdir(parents=True, exist_ok=True)
        cni = self.workdir / "cni"
        cni.mkdir(exist_ok=True)
        (cni / "10-alignment.conflist").write_text(_json({
            "cniVersion": "1.0.0", "name": "alignment",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": str(self.workdir / "cni-ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }))
        self.sock = self.workdir / "containerd.sock"
        config = self.workdir / "containerd.toml"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config.write_text(f"""version = 2
root = "{root}"
state = "{self.workdir / 'containerd-state'}"
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[{cri}]
  sandbox_image = "{self.images['pause']}"
  # root without CAP_SYS_RESOURCE: never lower a container's oom_score_adj below ours
  restrict_oom_score_adj = true
  disable_apparmor = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
""")
        self._spawn("containerd", ["containerd", f"--config={config}"])
        wait_for("containerd's socket", timeout=30, fn=lambda: self._ctr("version", check=False).returncode == 0)

    def _ctr(self, *args: str, check: bool = True, input: bytes | None = None, timeout: float = 120):
        return run("ctr", f"--address={self.sock}", "--namespace=k8s.io", "--connect-timeout=5s", *args,
                   check=check, input=input, timeout=timeout)

    def _import_images(self, prune: bool = True) -> None:
        """podman's images into containerd, each only once per store (a tag names one build). A
        rebuilt image brings only the layers containerd lacks (a trainer code change: its last few,
        kilobytes, instead of all 7 GB); earlier builds are removed after (`prune`), so the layers
        they share with the new one stay."""
        present = set(self._ctr("images", "ls", "-q").stdout.decode().split())
        for name, ref in self.images.items():
            if ref in present:
                continue
            started = time.monotonic()
            try:
                how = self._import_new_layers(ref)
            except Exception as exc:  # noqa: BLE001 - the whole image then, as podman saves it
                print(f"importing only the new layers of {ref} failed ({exc}); importing all of it")
                self._import_whole(ref)
                how = "all layers"
            print(f"imported {ref} into containerd in {time.monotonic() - started:.0f}s ({how})")
        stale = [r for r in present if r.startswith("localhost/alignment-") and r not in self.images.values()]
        if stale and prune:  # earlier builds: the layers only they use are garbage-collected with them
            self._ctr("images", "rm", "--sync", *stale, check=False)

    def _import_whole(self, ref: str) -> None:
        # Streamed: no archive on disk (the trainer's is 7 GB).
        save = subprocess.Popen(["podman", "save", "--format=docker-archive", ref], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            imported = subprocess.run(["ctr", f"--address={self.sock}", "--namespace=k8s.io", "images", "import",
                                       "--snapshotter=overlayfs", "-"], stdin=save.stdout, capture_output=True,
                                      timeout=1800)
        finally:
            save.stdout.close()
            saved = save.wait()
        if saved != 0 or imported.returncode != 0:
            raise RuntimeError(f"importing {ref} into containerd failed: podman save {saved}: "
                               f"{save.stderr.read().decode()[-1000:]}; ctr import {imported.returncode}: "
                               f"{imported.stderr.decode()[-1000:]}")

    def _import_new_layers(self, ref: str) -> str:
        """Imports `ref` as an OCI layout holding its manifest, its config and only the layers
        containerd's content store lacks (layers are uncompressed in both stores, so a layer's
        digest is the same in each); the layers it has are already unpacked into snapshots.
        skopeo copies from podman's storage only the layers not in the layout: those containerd
        has are stood in for by sparse files of their size, which never reach containerd."""
        manifest = json.loads(run("skopeo", "inspect", "--raw", f"containers-storage:{ref}").stdout)
        have = set(self._ctr("content", "ls", "-q").stdout.decode().split())
        layers = manifest["layers"]
        if not any(layer["digest"] in have for layer in layers):
            raise RuntimeError("containerd has none of its layers")
        with tempfile.TemporaryDirectory(dir=STORE, prefix="import-") as tmp:
            layout = Path(tmp)
            blobs = layout / "blobs" / "sha256"
            blobs.mkdir(parents=True)
            stand_ins = set()
            for layer in layers:
                if layer["digest"] in have:
                    with open(blobs / layer["digest"].split(":", 1)[1], "wb") as f:
                        f.truncate(layer["size"])  # sparse: no data written
                    stand_ins.add(layer["digest"])
            run("skopeo", "copy", "--quiet", "--dest-oci-accept-uncompressed-layers",
                f"containers-storage:{ref}", f"oci:{layout}:{ref}", timeout=1800)
            index = json.loads((layout / "index.json").read_text())
            (entry,) = [m for m in index["manifests"]
                        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref]
            blob = lambda digest: blobs / digest.split(":", 1)[1]  # noqa: E731
            copied = json.loads(blob(entry["digest"]).read_text())
            if [layer["digest"] for layer in copied["layers"]] != [layer["digest"] for layer in layers]:
                raise RuntimeError("skopeo wrote other layer digests than podman's manifest names")
            entry = {**entry, "annotations": {"io.containerd.image.name": ref}}  # the name ctr gives the image
            new = [d["digest"] for d in [entry, copied["config"], *copied["layers"]] if d["digest"] not in stand_ins]
            with tempfile.TemporaryFile() as err:
                ctr = subprocess.Popen(["ctr", f"--address={self.sock}", "--namespace=k8s.io", "images", "import",
                                        "--snapshotter=overlayfs", "-"], stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=err)
                try:
                    with tarfile.open(fileobj=ctr.stdin, mode="w|") as tar:
                        for name, data in (("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
                                           ("index.json", json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode())):
                            info = tarfile.TarInfo(name)
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
                        for digest in new:
                            tar.add(blob(digest), arcname=f"blobs/sha256/{digest.split(':', 1)[1]}")
                finally:
                    ctr.stdin.close()
                    code = ctr.wait(timeout=600)
                if code != 0:
                    err.seek(0)
                    raise RuntimeError(f"ctr import exited {code}: {err.read().decode(errors='replace')[-1000:]}")
            size = sum(blob(d).stat().st_size for d in new)
        return f"{len(new) - 2} of its {len(layers)} layers, {size / 1e6:.1f} MB; containerd had the rest"

    def _start_kubelet(self, certs: dict[str, Path]) -> None:
        kubeconfig = write_kubeconfig(self.workdir / "kubelet.kubeconfig", self.plane.server, certs["ca.crt"],
                                      _cert_user(certs, "kubelet"))
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "address": self.ip, "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "authentication": {"x509": {"clientCAFile": str(certs["ca.crt"])},
                               "anonymous": {"enabled": False}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDNS": [self.ip], "clusterDomain": CLUSTER_DOMAIN,
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            # The disk is shared with whatever else runs here: evict (and garbage-collect the
            # images, which reclaiming disk does whatever imageGC* say) only when it is all but full.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "256Mi", "imagefs.available": "256Mi",
                             "nodefs.inodesFree": "1%", "imagefs.inodesFree": "1%"},
            "mergeDefaultEvictionSettings": False, "evictionPressureTransitionPeriod": "10s",
            "podLogsDir": str(self.workdir / "pod-logs"),
            "volumePluginDir": str(self.workdir / "volume-plugins"),
            "syncFrequency": "5s", "nodeStatusUpdateFrequency": "2s", "fileCheckFrequency": "5s",
            "serializeImagePulls": False, "maxPods": 30,
        }
        (self.workdir / "kubelet.yaml").write_text(yaml.safe_dump(config))
        self._spawn("kubelet", [
            self.plane.bin_dir / "kubelet", f"--config={self.workdir / 'kubelet.yaml'}",
            f"--kubeconfig={kubeconfig}", f"--root-dir={self.workdir / 'kubelet'}",
            f"--cert-dir={self.workdir / 'kubelet-pki'}", f"--hostname-override={NODE_NAME}",
            f"--node-ip={self.ip}", "--v=1",
        ])

    def _ready(self) -> bool:
        out = self.plane.kubectl("get", "node", NODE_NAME, "-o",
                                 "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False)
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}")
        return out.stdout.strip() == "True"

    def _start_kube_proxy(self, certs: dict[str, Path]) -> None:
        """iptables mode, so Services' ClusterIPs work (a pod reaches the API server at
        kubernetes.default, as the operator's pod does)."""
        kubeconfig = write_kubeconfig(self.workdir / "kube-proxy.kubeconfig", self.plane.server, certs["ca.crt"],
                                      _cert_user(certs, "kube-proxy"))
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": NODE_NAME, "clusterCIDR": POD_CIDR,
            "bindAddress": "127.0.0.1",
            "healthzBindAddress": f"127.0.0.1:{free_port()}", "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # Leave the host's sysctls alone: no conntrack table resize, no route_localnet.
            "conntrack": {"maxPerCore": 0, "min": 0}, "iptables": {"localhostNodePorts": False},
        }
        (self.workdir / "kube-proxy.yaml").write_text(yaml.safe_dump(config))
        self._spawn("kube-proxy", [self.plane.bin_dir / "kube-proxy", f"--config={self.workdir / 'kube-proxy.yaml'}"])

    def _start_dns(self) -> None:
        """CoreDNS on the node's IP, port 53 (the kubelet's clusterDNS): Services and headless
        Services' pods resolve as on a cluster; nothing is forwarded (no upstream here)."""
        certs = self.workdir / "pki"
        kubeconfig = write_kubeconfig(self.workdir / "coredns.kubeconfig", self.plane.server,
                                      self.plane.workdir / "pki" / "ca.crt",
                                      {"client-certificate": str(certs / "coredns.crt"),
                                       "client-key": str(certs / "coredns.key")})
        self.plane.kubectl("apply", "-f", "-", input=COREDNS_RBAC)
        ready = free_port()
        (self.workdir / "Corefile").write_text(f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 {{
    bind {self.ip}
    errors
    ready 127.0.0.1:{ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kubeconfig} test
        pods insecure
        ttl 5
    }}
}}
.:53 {{
    bind {self.ip}
    errors
}}
""")
        self._spawn("coredns", [self.plane.bin_dir / "coredns", "-conf", self.workdir / "Corefile"])
        wait_for("CoreDNS ready", timeout=30, fn=lambda: _http_ok(f"http://127.0.0.1:{ready}/ready"))

    def _remove_containers(self) -> None:
        """Whatever the kubelet did not tear down: tasks killed, containers removed."""
        for cid in self._ctr("containers", "ls", "-q", check=False).stdout.decode().split():
            self._ctr("tasks", "kill", "--signal=SIGKILL", cid, check=False)
            self._ctr("tasks", "delete", "--force", cid, check=False)
            self._ctr("containers", "delete", cid, check=False)

    # ---- run volumes -------------------------------------------------------------------

    def workspace(self, namespace: str, run: str, size: str = "1Gi") -> Path:
        """A hostPath PersistentVolume pre-bound to the run's claim `<run>-workspace`, on a
        directory uid 1000 (the trainer) owns; returns that directory, to copy inputs into."""
        path = self.workdir / "volumes" / f"{namespace}-{run}"
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, 1000, 1000)
        self.plane.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{namespace}-{run}"},
            "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                     "hostPath": {"path": str(path), "type": "Directory"},
                     "claimRef": {"namespace": namespace, "name": f"{run}-workspace"}}}))
        return path

    # ---- helpers ---------------------------------------------------------------------

    def _spawn(self, name: str, argv: list) -> None:
        with open(self.workdir / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                [str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # Own session: a Ctrl-C to the test's process group must not kill containerd
                # before stop() has removed the containers (die_with_parent still applies).
                preexec_fn=die_with_parent, cwd=self.workdir, start_new_session=True)

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for log in sorted(self.workdir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- last {len(tail)} lines of {log} ---\n" + "\n".join(tail))
        return "\n".join(out)


COREDNS_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: coredns}
"""


def clean_host(node_name: str, workdir: Path | None = None) -> None:
    """Removes what a node leaves outside its directories; safe to run when nothing is there."""
    # Mounts under the node's dirs (the kubelet bind-mounts --root-dir onto itself; pods'
    # volumes; containerd's overlay rootfs), deepest first.
    roots = [str(STORE)] + ([str(workdir)] if workdir else [])
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if any(m.startswith(r) for r in roots)), key=len, reverse=True):
        run("umount", "-l", mount, check=False)
    Path("/var/lib/kubelet/device-plugins/kubelet.sock").unlink(missing_ok=True)
    # cgroups the kubelet made at the root of every v1 hierarchy: rmdir depth first.
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / "kubepods"
        if top.is_dir():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                _rmdir(d)
            _rmdir(top)
    # The kubelet's iptables chains (kube-proxy --cleanup removes its own).
    for binary in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            listing = run(binary, "-t", table, "-S", check=False).stdout.decode()
            for rule in listing.splitlines():
                if rule.startswith("-A ") and any(c in rule for c in KUBELET_CHAINS):
                    run(binary, "-t", table, "-D", *shlex.split(rule)[1:], check=False)
            for chain in KUBELET_CHAINS:
                run(binary, "-t", table, "-F", chain, check=False)
                run(binary, "-t", table, "-X", chain, check=False)
    # The CNI bridge, and masquerade rules of our sandboxes nobody tore down (only those from
    # our pod subnet: podman's bridge plugin makes CNI- chains too).
    run("ip", "link", "delete", BRIDGE, check=False)
    prefix = POD_CIDR.rsplit(".", 1)[0] + "."
    nat = run("iptables", "-t", "nat", "-S", "POSTROUTING", check=False).stdout.decode()
    for rule in nat.splitlines():
        argv = shlex.split(rule)
        if argv[:1] == ["-A"] and "-s" in argv and argv[argv.index("-s") + 1].startswith(prefix) and "-j" in argv:
            chain = argv[argv.index("-j") + 1]
            run("iptables", "-t", "nat", "-D", *argv[1:], check=False)
            if chain.startswith("CNI-"):
                run("iptables", "-t", "nat", "-F", chain, check=False)
                run("iptables", "-t", "nat", "-X", chain, check=False)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _terminate(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _json(value) -> str:
    import json

    return json.dumps(value, indent=2)


def _cert_user(certs: dict[str, Path], stem: str) -> dict:
    return {"client-certificate": str(certs[f"{stem}.crt"]), "client-key": str(certs[f"{stem}.key"])}


def sign_client_cert(ca_dir: Path, out_dir: Path, stem: str, cn: str, org: str | None) -> dict[str, Path]:
    """A client certificate for `cn` (and group `org`) signed by the control plane's test CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out_dir.mkdir(parents=True, exist_ok=True)
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name(attrs)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, pem = out_dir / f"{stem}.crt", out_dir / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return {f"{stem}.crt": crt, f"{stem}.key": pem}


if __name__ == "__main__":  # scripts/test: python tests/cluster/node.py preload IMAGE...
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "preload" or "pause" not in sys.argv[2:] or set(sys.argv[2:]) - set(IMAGES):
        sys.exit(f"usage: {sys.argv[0]} preload pause IMAGE... (of {', '.join(IMAGES)})")
    started = time.monotonic()
    Node.preload(sys.argv[2:])
    print(f"images {', '.join(sys.argv[2:])} in containerd's store in {time.monotonic() - started:.0f}s")
