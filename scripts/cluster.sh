#!/usr/bin/env bash
# A real Kubernetes cluster on this machine (docs/cluster.md):
#   scripts/cluster.sh up [--nodes N] [--work DIR]   # prints the kubeconfig path last
#   scripts/cluster.sh down [--work DIR]             # removes everything it made
#   scripts/cluster.sh status [--work DIR]
#   scripts/cluster.sh --help                        # names the network namespaces
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[[ -x $PY ]] || PY=python3
cd "$ROOT"
exec "$PY" -m policy_agent.lab.cluster "$@"
