"""The compile benchmark still runs, and its end-of-run check (incremental state ==
full compile after hundreds of random events) holds, at a small scale. No timing
assertions: figures live in docs/performance-compile.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_compile_small_scale_is_consistent(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile" / "run.py"), "--namespaces", "40", "--local", "30",
         "--reps", "40", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["incremental_equals_full"] is True
    assert data["workload"] == {"namespaces": 40, "pods": 800, "policies": 160, "local_pods": 30}
    assert data["output_shape"]["endpoints"] == 30
    assert set(data["incremental"]) >= {
        "remote_pod_add", "local_pod_add", "remote_pod_delete", "local_pod_delete", "remote_pod_label_change",
        "local_pod_label_change", "namespace_label_change", "policy_add", "policy_update", "policy_delete",
        "policy_add_selecting_local_pod", "cnp_add", "cnp_delete"}
