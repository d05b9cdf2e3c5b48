#!/usr/bin/env bash
# Builds what tests/cluster runs: the control plane (kube-apiserver, kube-controller-manager,
# etcd), the real node's Kubernetes parts (kubelet, kube-scheduler, kube-proxy) from the Go
# modules pinned in tools/k8s/go.mod, the cluster DNS server (CoreDNS, from its own module in
# tools/k8s/coredns/), helm for the chart's tests, and the distributed-training engines the
# operator renders multi-node stages for, each from its own module: the JobSet controller
# (tools/k8s/jobset/), the Kubeflow training operator (PyTorchJob; tools/k8s/training-operator/)
# and Kueue (tools/k8s/kueue/). An engine's install manifests (CRDs, webhook configurations,
# RBAC, its Deployment) are rendered with `kubectl kustomize` from that same module's files into
# <name>.yaml beside its binary; scripts/build-images puts the binary in an image and
# tests/cluster/engines.py installs both on the real node. And the S3-compatible server the tests
# read models and datasets from and export to: Versity's S3 gateway (posix backend), from its own
# module (tools/k8s/versitygw/); tests/s3server.py starts it on loopback.
#
#   tools/k8s/build.sh                    # CI calls exactly this; safe to rerun
#   ALIGNMENT_K8S_BIN=/some/dir tools/k8s/build.sh
#
# Output: ${ALIGNMENT_K8S_BIN:-~/.cache/alignment-operator/k8s/<k8s-version>}/ (outside the
# repository; binaries are never committed). Each binary has its own stamp (.stamp-<name>: a
# hash of the module files it is built from and the Go version), so a rerun builds only what is
# missing or changed, and adding a binary does not rebuild the others. Change RECIPE when you
# change how binaries are built (flags), to rebuild them all.
# To move to another Kubernetes release: tools/k8s/gen-gomod.sh vX.Y.Z, then rerun this.
set -euo pipefail
# No DWARF from the compiler: every binary is linked with -s -w (no symbol table, no DWARF), so the
# compiler's debug info only cost time. CoreDNS from an empty build cache, the two built side by side:
# 286 s of CPU with it, 253 s without.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=readonly -gcflags=all=-dwarf=false"
HELM_VERSION=v4.3.1
# KServe's InferenceService CRD (promote.serve renders one), taken from its own module's config/crd/full/.
KSERVE_VERSION=v0.15.2
RECIPE=3
cd "$(dirname "$0")"

k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' go.mod)
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' go.mod)
coredns_version=$(awk 'NF >= 2 && $(NF-1) == "github.com/coredns/coredns" { print $NF; exit }' coredns/go.mod)
out=${ALIGNMENT_K8S_BIN:-$HOME/.cache/alignment-operator/k8s/$k8s_version}
k8s_binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
engines=(jobset training-operator kueue)
binaries=("${k8s_binaries[@]}" coredns helm "${engines[@]}" versitygw kserve-crd)

common="$(go version) recipe $RECIPE"
stamp_of() {  # what a binary is built from
    case $1 in
        helm) echo "$common $HELM_VERSION" ;;
        kserve-crd) echo "$common $KSERVE_VERSION" ;;
        coredns) cat coredns/go.mod coredns/go.sum coredns/*.go <(echo "$common") | sha256sum | cut -d' ' -f1 ;;
        versitygw) cat "$1/go.mod" "$1/go.sum" <(echo "$common") | sha256sum | cut -d' ' -f1 ;;
        jobset|training-operator|kueue)  # (and how its manifests are rendered)
            cat "$1/go.mod" "$1/go.sum" <(echo "$common") <(declare -f engine_manifests) | sha256sum | cut -d' ' -f1 ;;
        *) cat go.mod go.sum gen-gomod.sh <(echo "$common $1") | sha256sum | cut -d' ' -f1 ;;
    esac
}
# An engine: its module, the main package, and the kustomization (relative to the module) whose
# output installs it as its project publishes it.
engine_module() {
    case $1 in
        jobset) echo sigs.k8s.io/jobset ;;
        training-operator) echo github.com/kubeflow/training-operator ;;
        kueue) echo sigs.k8s.io/kueue ;;
    esac
}
engine_package() {
    case $1 in
        jobset) echo sigs.k8s.io/jobset ;;
        training-operator) echo github.com/kubeflow/training-operator/cmd/training-operator.v1 ;;
        kueue) echo sigs.k8s.io/kueue/cmd/kueue ;;
    esac
}
engine_manifests() {  # engine_manifests NAME OUT: its install manifests, from its own module's files
    local dir kustomization tmp
    dir=$(go -C "$1" list -m -f '{{.Dir}}' "$(engine_module "$1")")
    case $1 in
        jobset|kueue) kustomization=config/default ;;
        training-operator) kustomization=manifests/overlays/standalone ;;
    esac
    # A copy: kustomize reads a path with "github.com/...@v1.8.1" in it as a remote repository.
    tmp=$(mktemp -d)
    cp -r "$dir/${kustomization%%/*}" "$tmp/"
    chmod -R u+w "$tmp"
    kubectl kustomize "$tmp/$kustomization" 2>/dev/null > "$2"
    rm -rf "$tmp"
}
current() { [[ ( -x $out/$1 || $1 == kserve-crd && -s $out/$1.yaml ) && "$(cat "$out/.stamp-$1" 2>/dev/null)" == "$(stamp_of "$1")" ]]; }
todo=()
for b in "${binaries[@]}"; do current "$b" || todo+=("$b"); done
if [[ ${#todo[@]} -eq 0 ]]; then
    echo "Kubernetes $k8s_version binaries up to date in $out"
    exit 0
fi
wanted() { [[ " ${todo[*]} " == *" $1 "* ]]; }

mkdir -p "$out"
started=$SECONDS

# Runs "$@" and prints how long it took.
timed() {
    local name=$1 t0=$SECONDS
    shift
    "$@"
    echo "  $name: $((SECONDS - t0))s"
}

# Each binary is written under a temporary name and renamed, then stamped, so an interrupted
# build never leaves a half-written binary that looks usable.
build() {  # build NAME PACKAGE LDFLAGS [MODULE-DIR]
    rm -f "$out/.stamp-$1"
    timed "$1" go -C "${4:-.}" build -trimpath -ldflags "$3" -o "$out/$1.partial" "$2"
    mv "$out/$1.partial" "$out/$1"
    stamp_of "$1" > "$out/.stamp-$1"
}

need_k8s=0
for b in "${k8s_binaries[@]}"; do wanted "$b" && need_k8s=1; done
if [[ $need_k8s == 1 ]]; then
    ./gen-gomod.sh --check   # the replace block must still match the release's own go.mod
    echo "downloading modules ..."
    timed "module download" go mod download

    # /version must tell the truth: the same -X flags as Kubernetes' hack/lib/version.sh.
    # buildDate is the release's tag time (from the module proxy), so builds are reproducible.
    minor=${k8s_version#v1.}
    minor=${minor%%.*}
    release_time=$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
    v=k8s.io/component-base/version
    k8s_ldflags="-s -w -X $v.gitVersion=$k8s_version -X $v.gitMajor=1 -X $v.gitMinor=$minor"
    k8s_ldflags+=" -X $v.gitTreeState=clean -X $v.buildDate=$release_time"

    echo "building Kubernetes $k8s_version and etcd $etcd_version into $out (GOMAXPROCS=$(nproc)): ${todo[*]} ..."
    if wanted etcd; then build etcd go.etcd.io/etcd/server/v3 "-s -w"; fi
    # The kubelet and kube-proxy share most packages with the control plane: minutes after it.
    for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
        if wanted "$b"; then build "$b" "k8s.io/kubernetes/cmd/$b" "$k8s_ldflags"; fi
    done
fi

# CoreDNS from its own module (its k8s.io/* client versions differ from the control plane's), with
# the plugins the real node's Corefile uses (coredns/main.go).
if wanted coredns; then
    echo "building CoreDNS $coredns_version ..."
    timed "module download" go -C coredns mod download
    build coredns . "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$coredns_version" coredns
fi

# The tests' S3 server from its own module (its AWS SDK and other versions are its own).
if wanted versitygw; then
    version=$(awk 'NF >= 2 && $(NF-1) == "github.com/versity/versitygw" { print $NF; exit }' versitygw/go.mod)
    echo "building versitygw $version ..."
    timed "module download" go -C versitygw mod download
    build versitygw github.com/versity/versitygw/cmd/versitygw "-s -w" versitygw
fi

# KServe's InferenceService CRD, from its module (downloaded, never built: only the manifest is used).
if wanted kserve-crd; then
    rm -f "$out/.stamp-kserve-crd"
    dir=$(go mod download -json "github.com/kserve/kserve@$KSERVE_VERSION" | awk -F'"' '$2 == "Dir" { print $4 }')
    cp "$dir/config/crd/full/serving.kserve.io_inferenceservices.yaml" "$out/kserve-crd.yaml.partial"
    mv "$out/kserve-crd.yaml.partial" "$out/kserve-crd.yaml"
    stamp_of kserve-crd > "$out/.stamp-kserve-crd"
fi

# The engines, each from its own module (their k8s.io/* and controller-runtime versions differ).
for e in "${engines[@]}"; do
    if wanted "$e"; then
        version=$(awk -v m="$(engine_module "$e")" 'NF >= 2 && $(NF-1) == m { print $NF; exit }' "$e/go.mod")
        echo "building $e $version ..."
        timed "module download" go -C "$e" mod download
        engine_manifests "$e" "$out/$e.yaml"
        build "$e" "$(engine_package "$e")" "-s -w" "$e"
    fi
done

# helm is built from its own go.mod (go install pkg@version), not from ours: its
# dependency graph (a different k8s.io/client-go) must not move the control plane's.
if wanted helm; then
    echo "building helm $HELM_VERSION ..."
    rm -f "$out/.stamp-helm"
    helm_ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
    helm_ldflags+=" -X helm.sh/helm/v4/internal/version.metadata= -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
    GOBIN=$out/.helm-partial timed helm go install -trimpath -ldflags "$helm_ldflags" \
        "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
    mv "$out/.helm-partial/helm" "$out/helm"
    rmdir "$out/.helm-partial"
    stamp_of helm > "$out/.stamp-helm"
fi

for b in "${binaries[@]}"; do current "$b"; done
echo "built ${todo[*]} in $out in $((SECONDS - started))s"
