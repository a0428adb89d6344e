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
    log "adding deb-src for bookworm"
    cat >"$SRC_LIST" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
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
dpkg-source -x --skip-debianization ./kubernetes_*.dsc src >/dev/null 2>&1 \
    || dpkg-source -x ./kubernetes_*.dsc src >/dev/null
cd src

got="$(sed -n 's/^.*gitVersion=v\{0,1\}\([0-9.]*\).*/\1/p' debian/rules 2>/dev/null | head -1 || true)"
log "source tree: $(pwd) (debian/rules version: ${got:-unknown})"

export GOFLAGS=-mod=vendor GOPROXY=off GO111MODULE=on GOTOOLCHAIN=local
export GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath"
# Debian's build stamps the version through KUBE_GIT_* (there is no .git in the tarball).
export KUBE_GIT_VERSION="v$KUBE_VERSION" KUBE_GIT_TREE_STATE=clean \
    KUBE_GIT_COMMIT=debian KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR="$(echo "$KUBE_VERSION" | cut -d. -f2)"
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
