#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up (idempotent), lint contracts, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-cluster >/dev/null
PY=.venv/bin
# The Kubernetes build and the images take minutes on a fresh machine (then they are cached
# by version). Start them now so that they overlap the tests that need neither; the tests
# that need them run last and wait on the scripts' locks (a failure shows up there, with
# the script's own error, and in this log).
PREBUILD_LOG="${TMPDIR:-/tmp}/policy-agent-prebuild.log"
( bash scripts/build-kube.sh && bash scripts/build-images.sh ) >"$PREBUILD_LOG" 2>&1 &
echo "== building Kubernetes and the images in the background (log: $PREBUILD_LOG)"
echo "== import contracts (pure core, stdlib-only shim, independent layers)"
$PY/lint-imports setup.cfg
echo "== ruff"
$PY/ruff check policy_agent cni_shim tests bench
echo "== pytest"
exec $PY/pytest "$@"
