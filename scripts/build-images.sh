#!/usr/bin/env bash
# Build the cluster tier's container images without any image registry, and cache them
# outside the repository as docker-archive tars:
#   registry.example.com/policy-agent:<setup.cfg version>   the repository's Dockerfile
#   registry.example.com/policy-agent-workload:test         tests/cluster/workload/
#   k8s.gcr.io/pause:3.2                                    FROM scratch + kube's pause
# Both Python images stand on a Debian bookworm base made by mmdebstrap from this
# machine's own Debian mirror (scripts/apt-mirror.sh), imported into buildah (vfs storage,
# chroot isolation) as localhost/policy-agent-base:bookworm and passed to the Dockerfile
# as --build-arg BASE. apt inside the builds uses the same mirror (written into the base
# by mmdebstrap); pip inside the builds uses this machine's pip settings, read at run time
# (`pip config list`, PIP_* variables) and passed as build arguments, with the local
# directories they name mounted read-only. No host name is written in the repository.
#
# Output: /var/cache/policy-agent/images-<key>/{policy-agent,workload,pause}.tar and
# images.json ({"<tar>": "<image name>"}), <key> hashing everything that goes into the
# images; printed as the last line. The base is cached on its own key (package list,
# suite, mirror), so a source change rebuilds only the two small images. A rerun with
# the directory present does nothing. One build at a time (flock).
# Import into a containerd: ctr --address SOCK -n k8s.io images import <tar>
#
# Usage: scripts/build-images.sh [--kube-dir DIR]     (root; installs its apt packages)
# Env:   POLICY_AGENT_CACHE (/var/cache/policy-agent), KUBE_VERSION (1.20.2)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

CACHE_ROOT="${POLICY_AGENT_CACHE:-/var/cache/policy-agent}"
KUBE_VERSION="${KUBE_VERSION:-1.20.2}"
KUBE_DIR=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --kube-dir) KUBE_DIR="${2:?--kube-dir DIR}"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-images: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

log() { echo "build-images: $*" >&2; }
die() { log "$*"; exit 1; }

SUITE=bookworm
BASE_REF=localhost/policy-agent-base:bookworm
# Debian's python3 (with `python` and venv) and the CA bundle; the runtime stage adds
# iptables, ipset and iproute2 with its own apt-get, as in the docker route.
BASE_PACKAGES=(python3 python3-venv python-is-python3 ca-certificates)
# Documentation and translations stay out, as in Debian's slim images.
MMDEBSTRAP_OPTS=(--variant=apt
    "--dpkgopt=path-exclude=/usr/share/man/*" "--dpkgopt=path-exclude=/usr/share/info/*"
    "--dpkgopt=path-exclude=/usr/share/doc/*" "--dpkgopt=path-include=/usr/share/doc/*/copyright"
    "--dpkgopt=path-exclude=/usr/share/locale/*")
VERSION="$(sed -n 's/^version *= *//p' "$REPO/setup.cfg" | head -1)"
[[ -n $VERSION ]] || die "no version in $REPO/setup.cfg [metadata]"
AGENT_IMAGE="registry.example.com/policy-agent:$VERSION"
WORKLOAD_IMAGE="registry.example.com/policy-agent-workload:test"
PAUSE_IMAGE="k8s.gcr.io/pause:3.2"
WORKLOAD_DIR="$REPO/tests/cluster/workload"

sha() { sha256sum | cut -c1-16; }

# The mirror lines (main suite, updates and security where this machine has them).
mirror_lines() {
    local uri
    uri="$(bash "$HERE/apt-mirror.sh" "$SUITE")" || die "no apt source for $SUITE in /etc/apt/sources.list{,.d/*}"
    echo "deb $uri $SUITE main"
    if uri="$(bash "$HERE/apt-mirror.sh" "$SUITE-updates")"; then echo "deb $uri $SUITE-updates main"; fi
    if uri="$(bash "$HERE/apt-mirror.sh" "$SUITE-security")"; then echo "deb $uri $SUITE-security main"; fi
}

# Everything that goes into the image archives. Build-context files as .dockerignore
# lets them through (the allow-list: packaging files, policy_agent/, cni_shim/).
images_key() {
    {
        echo "recipe $(sha256sum <"$0")"
        echo "base $BASE_KEY"
        echo "kube $KUBE_VERSION $(sha256sum <"$KUBE_DIR/pause")"
        cd "$REPO"
        find Dockerfile .dockerignore pyproject.toml setup.cfg README.md policy_agent cni_shim \
            tests/cluster/workload -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
            ! -path 'policy_agent/lab/cluster/*' -print0 \
            | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha
}

# This machine's pip settings as NAME=value lines (environment over files, `install`
# over `global`), for the Dockerfile's PIP_* build arguments. Read at run time only.
pip_settings() {
    local pip_cmd=()
    if command -v pip >/dev/null 2>&1 && pip --version >/dev/null 2>&1; then
        pip_cmd=(pip)
    elif python3 -m pip --version >/dev/null 2>&1; then
        pip_cmd=(python3 -m pip)
    fi
    { [[ ${#pip_cmd[@]} -gt 0 ]] && "${pip_cmd[@]}" config list 2>/dev/null; true; } | python3 -c '
import ast, os, sys
keys = ["index-url", "extra-index-url", "find-links", "trusted-host", "cert", "constraint",
        "default-timeout"]
rank = {"global": 1, "install": 2, ":env:": 3}
best = {}
for line in sys.stdin:
    name, sep, value = line.rstrip("\n").partition("=")
    section, _, key = name.rpartition(".")
    if not sep or key not in keys or section not in rank:
        continue
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        continue
    if rank[section] >= best.get(key, (0, ""))[0]:
        best[key] = (rank[section], str(value))
for key in keys:
    env = "PIP_" + key.upper().replace("-", "_")
    value = os.environ.get(env) or best.get(key, (0, ""))[1]
    if key == "default-timeout" and not value:
        value = os.environ.get("PIP_TIMEOUT", "")
    if value:
        print(env + "=" + " ".join(value.split()))
'
}

# Local paths named by the pip settings (find-links directories, file:// indexes, the
# CA bundle, the constraints file): mounted read-only at the same place in the build.
# A file:// index's pages link to files beside it (../../files/...): mount its parent.
pip_volumes() {
    local line value word path
    while IFS= read -r line; do
        value="${line#*=}"
        for word in $value; do
            path="${word#file://}"
            if [[ $word == file://* && $line == PIP_*INDEX_URL=* ]]; then
                path="$(dirname "${path%/}")"
            fi
            if [[ $path == /* && -e $path ]]; then echo "$path"; fi
        done
    done <<<"$1" | sort -u
}

if [[ $EUID -ne 0 ]]; then
    die "needs root (apt-get, mmdebstrap, buildah)"
fi
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.images.lock"
flock 9

if [[ -z $KUBE_DIR ]]; then
    KUBE_DIR="$(KUBE_VERSION="$KUBE_VERSION" bash "$HERE/build-kube.sh" | tail -1)"
fi
[[ -x $KUBE_DIR/pause ]] || die "no pause program in $KUBE_DIR (scripts/build-kube.sh builds it)"

MIRRORS="$(mirror_lines)"
BASE_KEY="$( { printf '%s\n' "$SUITE" "${BASE_PACKAGES[@]}" "${MMDEBSTRAP_OPTS[@]}" "$MIRRORS"; } | sha)"
KEY="$(images_key)"
OUT="$CACHE_ROOT/images-$KEY"
if [[ -f $OUT/images.json ]]; then
    log "cached: $OUT"
    echo "$OUT"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
need=()
for cmd in mmdebstrap buildah; do command -v "$cmd" >/dev/null || need+=("$cmd"); done
if [[ ${#need[@]} -gt 0 ]]; then
    log "installing ${need[*]}"
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

STORE="$CACHE_ROOT/buildah"
# RUN steps share the machine's network (chroot isolation, --network host): they fetch
# packages and nothing else. buildah's CNI directories point into the cache, so that
# nothing under the machine's /etc/cni is ever created (it would confuse a real node's CNI).
mkdir -p "$STORE/cni/net.d" "$STORE/cni/bin"
cat >"$STORE/containers.conf" <<CONF
[network]
network_config_dir = "$STORE/cni/net.d"
cni_plugin_dirs = ["$STORE/cni/bin"]
CONF
export CONTAINERS_CONF="$STORE/containers.conf"
bh() { buildah --root "$STORE/root" --runroot "$STORE/run" --storage-driver vfs "$@"; }
bud_net=(--network host)
export BUILDAH_ISOLATION=chroot
WORK="$(mktemp -d "$CACHE_ROOT/.images-work.XXXXXX")"
cleanup() {
    # Working containers of this run only (buildah names them after the run's images).
    bh rm --all >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- base ------------------------------------------------------------------------------
BASE_DIR="$CACHE_ROOT/image-base-$BASE_KEY"
have_key="$(bh inspect --type image --format '{{index .OCIv1.Config.Labels "io.policy-agent.base-key"}}' \
    "$BASE_REF" 2>/dev/null || true)"
if [[ $have_key != "$BASE_KEY" ]]; then
    if [[ ! -f $BASE_DIR/rootfs.tar ]]; then
        log "mmdebstrap $SUITE (${BASE_PACKAGES[*]})"
        t0=$SECONDS
        mapfile -t mirrors <<<"$MIRRORS"
        TMPDIR="$WORK" mmdebstrap --quiet --mode=root "${MMDEBSTRAP_OPTS[@]}" \
            --include="$(IFS=,; echo "${BASE_PACKAGES[*]}")" \
            "$SUITE" "$WORK/rootfs.tar" "${mirrors[@]}" >"$WORK/mmdebstrap.log" 2>&1 || {
                tail -30 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
        mkdir -p "$BASE_DIR"
        mv "$WORK/rootfs.tar" "$BASE_DIR/rootfs.tar"
        log "base root file system in $((SECONDS - t0))s"
    fi
    log "importing $BASE_REF"
    ctr="$(bh from --name "pa-base-$$" scratch)"
    bh add "$ctr" "$BASE_DIR/rootfs.tar" / >/dev/null
    bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd '["python3"]' --os linux --arch amd64 \
        --label "io.policy-agent.base-key=$BASE_KEY" "$ctr"
    bh commit --quiet --rm "$ctr" "$BASE_REF" >/dev/null
fi

# --- project and workload images ---------------------------------------------------------
PIP_SETTINGS="$(pip_settings)"
build_args=(--build-arg "BASE=$BASE_REF")
while IFS= read -r line; do
    [[ -n $line ]] && build_args+=(--build-arg "$line")
done <<<"$PIP_SETTINGS"
while IFS= read -r path; do
    [[ -n $path ]] && build_args+=(--volume "$path:$path:ro")
done < <(pip_volumes "$PIP_SETTINGS")

t0=$SECONDS
log "building $AGENT_IMAGE"
bh bud --quiet --pull=never --isolation chroot "${bud_net[@]}" "${build_args[@]}" \
    -f "$REPO/Dockerfile" -t "$AGENT_IMAGE" "$REPO" >"$WORK/agent.log" 2>&1 || {
        tail -40 "$WORK/agent.log" >&2; die "building $AGENT_IMAGE failed"; }
log "$AGENT_IMAGE in $((SECONDS - t0))s"

t0=$SECONDS
bh bud --quiet --pull=never --isolation chroot "${bud_net[@]}" --build-arg "BASE=$BASE_REF" \
    -f "$WORKLOAD_DIR/Containerfile" -t "$WORKLOAD_IMAGE" "$WORKLOAD_DIR" >"$WORK/workload.log" 2>&1 || {
        tail -40 "$WORK/workload.log" >&2; die "building $WORKLOAD_IMAGE failed"; }
log "$WORKLOAD_IMAGE in $((SECONDS - t0))s"

# --- pause: the static sandbox program alone, as upstream's image ------------------------
ctr="$(bh from --name "pa-pause-$$" scratch)"
bh copy --chmod 0755 "$ctr" "$KUBE_DIR/pause" /pause >/dev/null
bh config --entrypoint '["/pause"]' --os linux --arch amd64 "$ctr"
bh commit --quiet --rm "$ctr" "$PAUSE_IMAGE" >/dev/null

# --- archives ---------------------------------------------------------------------------
STAGE="$WORK/out"
mkdir -p "$STAGE"
declare -A archives=([policy-agent.tar]="$AGENT_IMAGE" [workload.tar]="$WORKLOAD_IMAGE" [pause.tar]="$PAUSE_IMAGE")
for tar in "${!archives[@]}"; do
    bh push --quiet "${archives[$tar]}" "docker-archive:$STAGE/$tar:${archives[$tar]}" >/dev/null
done
python3 - "$STAGE/images.json" "$AGENT_IMAGE" "$WORKLOAD_IMAGE" "$PAUSE_IMAGE" <<'PY'
import json, sys
out, agent, workload, pause = sys.argv[1:]
with open(out, "w") as f:
    json.dump({"policy-agent.tar": agent, "workload.tar": workload, "pause.tar": pause}, f, indent=1)
    f.write("\n")
PY
# vfs keeps a full copy per layer: drop everything but the base from the store.
for image in "$AGENT_IMAGE" "$WORKLOAD_IMAGE" "$PAUSE_IMAGE"; do bh rmi --force "$image" >/dev/null 2>&1 || true; done
bh rmi --prune >/dev/null 2>&1 || true
rm -rf "$OUT"
mv "$STAGE" "$OUT"
# Older image sets: keep the three newest (a parallel session may still be importing one).
ls -1dt "$CACHE_ROOT"/images-*/ 2>/dev/null | tail -n +4 | while IFS= read -r old; do
    [[ ${old%/} != "$OUT" ]] && rm -rf "${old%/}"
done
log "images in $OUT"
echo "$OUT"
