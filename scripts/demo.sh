#!/usr/bin/env bash
# The README's main command: install what is needed (Debian packages + venv, cached) and run
# the demo: the x/y/z lab, the reachability matrix before and after example policies, the
# rules for one pod, then tear-down. Needs root (network namespaces, iptables inside them).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/demo.sh: run as root (it creates network namespaces)" >&2
    exit 1
fi
bash scripts/setup.sh
exec .venv/bin/policy-agent --log-level warning demo "$@"
