#!/usr/bin/env bash
# Build kube-apiserver (and kubectl) from Debian's `kubernetes` source package with
# Debian's own golang, and cache the binaries outside the repository, keyed by version:
#   /var/cache/policy-agent/kube-apiserver-<version>/{kube-apiserver,kubectl}
# A rerun with the binaries present does nothing. Works on a fresh Debian 12 machine
# (installs its own apt dependencies). The Debian source package vendors every Go
# module, so no Go module proxy is contacted (GOFLAGS=-mod=vendor, GOPROXY=off).
#
# Usage: scripts/build-kube-apiserver.sh            # prints the cache directory
#        KUBE_VERSION=1.20.2 scripts/build-kube-apiserver.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

KUBE_VERSION="${KUBE_VERSION:-1.20.2}"
CACHE_ROOT="${POLICY_AGENT_CACHE:-/var/cache/policy-agent}"
OUT="$CACHE_ROOT/kube-apiserver-$KUBE_VERSION"

if [[ -x "$OUT/kube-apiserver" && -x "$OUT/kubectl" ]]; then
    echo "$OUT"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    echo "build-kube-apiserver: needs root (apt-get); binaries missing in $OUT" >&2
    exit 1
fi

mkdir -p "$CACHE_ROOT"
# One build at a time (parallel test sessions may all find the binary missing).
exec 9>"$CACHE_ROOT/.kube-apiserver-$KUBE_VERSION.lock"
flock 9
if [[ -x "$OUT/kube-apiserver" && -x "$OUT/kubectl" ]]; then
    echo "$OUT"
    exit 0
fi

log() { echo "build-kube-apiserver: $*" >&2; }

# bookworm carries kubernetes 1.20.5+really1.20.2 (the source tree is 1.20.2).
SRC_LIST=/etc/apt/sources.list.d/policy-agent-deb-src.sources
if [[ ! -f $SRC_LIST ]]; then
    # The mirror is the one this machine already uses for bookworm's binary packages:
    # read from its own apt sources (deb822 or one-line form), never written here.
    uri="$(bash "$HERE/apt-mirror.sh" bookworm)" || {
        log "no apt source for bookworm found in /etc/apt/sources.list{,.d/*}"; exit 1; }
    log "adding deb-src for bookworm from $uri"
    cat >"$SRC_LIST" <<EOF
Types: deb-src
URIs: $uri
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends \
    golang-go rsync dpkg-dev make gcc libc6-dev ca-certificates etcd-server etcd-client \
    >/dev/null

WORK="$(mktemp -d /tmp/kube-build.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
log "fetching source package into $WORK"
apt-get source -qq --download-only kubernetes >/dev/null
# Full extraction: Debian's patches (debian/patches/series) are applied.
dpkg-source -x ./kubernetes_*.dsc src >/dev/null
cd src
ver="$(dpkg-parsechangelog -S Version)"
case "$ver" in
    *"$KUBE_VERSION"*) ;;
    *) log "source package version $ver does not carry $KUBE_VERSION"; exit 1 ;;
esac
log "source package $ver in $(pwd)"

# As debian/rules does: GOPATH in the tree, CGO off, `make WHAT=...`. The tree
# vendors every module (vendor/), and the build runs in GOPATH mode from
# _output/local/go, so nothing is downloaded; GOPROXY=off makes sure of it.
export GOPATH="$PWD/.go" CGO_ENABLED=0 GOPROXY=off GOTOOLCHAIN=local HOME="$WORK/home"
export GOCACHE="$WORK/gocache" PATH="/usr/lib/go/bin:$PATH"
mkdir -p .go/src/k8s.io "$HOME"
[ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
log "building kube-apiserver and kubectl with $(go version)"
make WHAT="cmd/kube-apiserver cmd/kubectl" >"$WORK/build.log" 2>&1 || {
    tail -50 "$WORK/build.log" >&2
    exit 1
}

tmp_out="$OUT.tmp.$$"
rm -rf "$tmp_out"
mkdir -p "$tmp_out"
for b in kube-apiserver kubectl; do
    f="$(find _output -type f -name "$b" -perm -u+x | head -1)"
    [[ -n $f ]] || { log "no $b produced"; exit 1; }
    install -m 0755 "$f" "$tmp_out/$b"
done
"$tmp_out/kube-apiserver" --version >&2
rm -rf "$OUT"
mv "$tmp_out" "$OUT"
echo "$OUT"
