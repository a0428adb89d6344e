#!/usr/bin/env bash
# Build the Kubernetes components from Debian's `kubernetes` source package with
# Debian's own golang, in one Go build (they share most packages), and cache them
# outside the repository, keyed by version:
#   /var/cache/policy-agent/kube-<version>/{kube-apiserver,kubectl,kubelet,kube-proxy,
#       kube-controller-manager,kube-scheduler,pause}
# `pause` is the pod sandbox program from the same tree (build/pause), built static.
# A rerun with the binaries present does nothing. Works on a fresh Debian 12 machine
# (installs its own apt dependencies). The Debian source package vendors every Go
# module, so no Go module proxy is contacted (GOFLAGS=-mod=vendor, GOPROXY=off).
#
# Usage: scripts/build-kube.sh            # prints the cache directory
#        KUBE_VERSION=1.20.2 scripts/build-kube.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

KUBE_VERSION="${KUBE_VERSION:-1.20.2}"
CACHE_ROOT="${POLICY_AGENT_CACHE:-/var/cache/policy-agent}"
OUT="$CACHE_ROOT/kube-$KUBE_VERSION"
BINS=(kube-apiserver kubectl kubelet kube-proxy kube-controller-manager kube-scheduler)
# Present in binaries built with the reflect2 fix below; an older cache is rebuilt.
STAMP=.reflect2-go118

if [[ -f "$OUT/$STAMP" ]]; then
    echo "$OUT"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    echo "build-kube: needs root (apt-get); binaries missing in $OUT" >&2
    exit 1
fi

mkdir -p "$CACHE_ROOT"
# One build at a time (parallel test sessions may all find the binary missing).
exec 9>"$CACHE_ROOT/.kube-$KUBE_VERSION.lock"
flock 9
if [[ -f "$OUT/$STAMP" ]]; then
    echo "$OUT"
    exit 0
fi

log() { echo "build-kube: $*" >&2; }

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

# The vendored modern-go/reflect2 (1.0.1) links reflect.mapiterinit with its signature
# from before Go 1.18, which then took a third argument (the caller's iterator). Built
# with Debian's Go 1.19, every map iteration through it crashes the process ("unexpected
# fault address"): json-iterator's sorted-key encoder runs it on every custom resource
# create and update (apiextensions GetObjectMeta), so the first ClusterNetworkPolicy
# written killed the server. Give it the Go 1.18 signature and a caller-owned iterator.
R2=vendor/github.com/modern-go/reflect2
if grep -q 'func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) \*hiter' "$R2/unsafe_link.go"; then
    log "patching $R2 for Go >= 1.18 map iteration"
    sed -i 's/func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) \*hiter/func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)/' "$R2/unsafe_link.go"
    # The iterator is now ours to allocate: it needs the runtime's whole layout (Go 1.19's
    # runtime.hiter; pointer fields as pointers so the collector sees them).
    sed -i '/^type hiter struct {/,/^}/d' "$R2/unsafe_link.go"
    sed -i 's/hiter:      mapiterinit(type2.rtype, \*(\*unsafe.Pointer)(obj)),/hiter:      newHiter(type2.rtype, *(*unsafe.Pointer)(obj)),/' "$R2/unsafe_map.go"
    cat >>"$R2/unsafe_map.go" <<'GO'

// hiter is runtime.hiter (Go 1.18-1.21 layout).
type hiter struct {
	key         unsafe.Pointer
	value       unsafe.Pointer
	t           unsafe.Pointer
	h           unsafe.Pointer
	buckets     unsafe.Pointer
	bptr        unsafe.Pointer
	overflow    unsafe.Pointer
	oldoverflow unsafe.Pointer
	startBucket uintptr
	offset      uint8
	wrapped     bool
	B           uint8
	i           uint8
	bucket      uintptr
	checkBucket uintptr
}

// newHiter: since Go 1.18 reflect.mapiterinit fills an iterator the caller allocates.
func newHiter(rtype unsafe.Pointer, m unsafe.Pointer) *hiter {
	it := new(hiter)
	mapiterinit(rtype, m, it)
	return it
}
GO
fi
grep -q 'func newHiter' "$R2/unsafe_map.go" && ! grep -rq 'mapiterinit(type2' "$R2" || {
    log "$R2: unexpected source, the Go 1.18 map iteration fix did not apply"; exit 1; }

# As debian/rules does: GOPATH in the tree, CGO off, `make WHAT=...`. The tree
# vendors every module (vendor/), and the build runs in GOPATH mode from
# _output/local/go, so nothing is downloaded; GOPROXY=off makes sure of it.
export GOPATH="$PWD/.go" CGO_ENABLED=0 GOPROXY=off GOTOOLCHAIN=local HOME="$WORK/home"
export GOCACHE="$WORK/gocache" PATH="/usr/lib/go/bin:$PATH"
mkdir -p .go/src/k8s.io "$HOME"
[ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
log "building ${BINS[*]} with $(go version)"
make WHAT="${BINS[*]/#/cmd/}" >"$WORK/build.log" 2>&1 || {
    tail -50 "$WORK/build.log" >&2
    exit 1
}

tmp_out="$OUT.tmp.$$"
rm -rf "$tmp_out"
mkdir -p "$tmp_out"
for b in "${BINS[@]}"; do
    f="$(find _output -type f -name "$b" -perm -u+x | head -1)"
    [[ -n $f ]] || { log "no $b produced"; exit 1; }
    install -m 0755 "$f" "$tmp_out/$b"
done
# The sandbox ("pause") image's program, as build/pause/Makefile builds it.
pause_c=""
for c in build/pause/linux/pause.c build/pause/pause.c; do
    [[ -f $c ]] && { pause_c=$c; break; }
done
[[ -n $pause_c ]] || { log "no build/pause source in the tree"; exit 1; }
gcc -Os -Wall -Werror -static -DVERSION="v3.4-$KUBE_VERSION" -o "$tmp_out/pause" "$pause_c"
strip "$tmp_out/pause"
"$tmp_out/kube-apiserver" --version >&2
touch "$tmp_out/$STAMP"
rm -rf "$OUT"
mv "$tmp_out" "$OUT"
echo "$OUT"
