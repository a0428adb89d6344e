#!/usr/bin/env bash
# Installs everything policy-agent needs on a fresh Debian machine (as root):
# Debian packages for the dataplane and tests, and a venv with the Python deps.
# The venv lives outside the repository, keyed by a hash of setup.cfg, so a
# second run (or CI on the same machine) reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iptables ipset iproute2 conntrack kmod procps python3-venv python3-dev gcc
              containernetworking-plugins socat iperf3 netcat-openbsd etcd-server etcd-client openssl rsync
              ca-certificates curl git nftables)
# --with-cluster (scripts/test.sh): also what the Kubernetes build, the offline images and
# the real-cluster tier need, in this one apt run, so that their scripts (which run in the
# background and install these themselves when run alone) never race for apt's lock.
if [[ ${1:-} == --with-cluster ]]; then
    APT_PACKAGES+=(golang-go dpkg-dev make libc6-dev etcd-server etcd-client
                   containerd runc mmdebstrap buildah)
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # etcd-server's package starts a system etcd; tests start their own.
    systemctl disable --now etcd >/dev/null 2>&1 || true
fi

CACHE=${POLICY_AGENT_CACHE:-/var/cache/policy-agent}
# Key the venv on the dependency lists only, so editing lint config does not rebuild it.
KEY=$(python3 -c 'import configparser as c; p=c.ConfigParser(); p.read("setup.cfg"); print(p["options"]["install_requires"], p["options.extras_require"]["test"])' | sha256sum | cut -c1-12)
VENV="$CACHE/venv-py311-$KEY"
if [[ ! -x "$VENV/bin/python" || ! -f "$VENV/.complete" ]]; then
    echo "setup: building venv $VENV" >&2
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
    "$VENV/bin/pip" install -q -e '.[test]'
    touch "$VENV/.complete"
else
    # Re-link the editable install to this checkout (CI clones elsewhere).
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . >/dev/null
fi
ln -sfn "$VENV" .venv
echo "$VENV"
