#!/usr/bin/env bash
# Builds the control plane that tests/cluster runs: kube-apiserver, kube-controller-manager
# and etcd from the Go modules pinned in tools/k8s/go.mod, plus helm for the chart's tests.
#
#   tools/k8s/build.sh                    # CI calls exactly this; safe to rerun
#   ALIGNMENT_K8S_BIN=/some/dir tools/k8s/build.sh
#
# Output: ${ALIGNMENT_K8S_BIN:-~/.cache/alignment-operator/k8s/<k8s-version>}/ (outside the
# repository; binaries are never committed). A stamp file holding a hash of go.mod, go.sum,
# this script and the Go version makes a rerun a no-op while nothing changed.
# To move to another Kubernetes release: tools/k8s/gen-gomod.sh vX.Y.Z, then rerun this.
set -euo pipefail
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
HELM_VERSION=v4.3.1
cd "$(dirname "$0")"

k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' go.mod)
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' go.mod)
out=${ALIGNMENT_K8S_BIN:-$HOME/.cache/alignment-operator/k8s/$k8s_version}
binaries=(kube-apiserver kube-controller-manager etcd helm)

stamp=$(cat go.mod go.sum build.sh gen-gomod.sh <(go version) | sha256sum | cut -d' ' -f1)
all_present() { for b in "${binaries[@]}"; do [[ -x $out/$b ]] || return 1; done; }
if all_present && [[ "$(cat "$out/.stamp" 2>/dev/null)" == "$stamp" ]]; then
    echo "control plane $k8s_version up to date in $out"
    exit 0
fi

./gen-gomod.sh --check   # the replace block must still match the release's own go.mod
mkdir -p "$out"
rm -f "$out/.stamp"
started=$SECONDS

# Runs "$@" and prints how long it took.
timed() {
    local name=$1 t0=$SECONDS
    shift
    "$@"
    echo "  $name: $((SECONDS - t0))s"
}

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

# Each binary is written under a temporary name and renamed, so an interrupted build never
# leaves a half-written binary that looks usable.
build() {  # build NAME PACKAGE LDFLAGS
    timed "$1" go build -trimpath -ldflags "$3" -o "$out/$1.partial" "$2"
    mv "$out/$1.partial" "$out/$1"
}

echo "building Kubernetes $k8s_version and etcd $etcd_version into $out (GOMAXPROCS=$(nproc)) ..."
build etcd go.etcd.io/etcd/server/v3 "-s -w"
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$k8s_ldflags"

# helm is built from its own go.mod (go install pkg@version), not from ours: its
# dependency graph (a different k8s.io/client-go) must not move the control plane's.
echo "building helm $HELM_VERSION ..."
helm_ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
helm_ldflags+=" -X helm.sh/helm/v4/internal/version.metadata= -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
GOBIN=$out/.helm-partial timed helm go install -trimpath -ldflags "$helm_ldflags" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
mv "$out/.helm-partial/helm" "$out/helm"
rmdir "$out/.helm-partial"

for b in "${binaries[@]}"; do [[ -x $out/$b ]]; done
echo "$stamp" > "$out/.stamp"
echo "control plane $k8s_version built in $out in $((SECONDS - started))s"
