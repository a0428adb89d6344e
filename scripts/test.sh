#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up (idempotent), lint contracts, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
PY=.venv/bin
echo "== import contracts (pure core, stdlib-only shim, independent layers)"
$PY/lint-imports setup.cfg
echo "== ruff"
$PY/ruff check policy_agent cni_shim tests bench
echo "== pytest"
exec $PY/pytest "$@"
