"""The real-cluster tier: one `scripts/cluster.sh up` per session (2 nodes, manifests/ and
manifests/shim/ applied, both DaemonSets ready), `down` at the end, also on failure.

A cluster already up in the work area (POLICY_AGENT_CLUSTER_WORK, default
/var/lib/policy-agent-cluster) is reused and left up; POLICY_AGENT_CLUSTER_KEEP=1 also
leaves up the one this session made (for development: the next run reuses it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cluster_helpers as H
import pytest

from policy_agent.lab.cluster import state as state_mod

DEFAULT_WORK = "/var/lib/policy-agent-cluster"
CLUSTER_SH = ["bash", str(H.REPO / "scripts" / "cluster.sh")]
# The first cluster test also waits for `up`, which on a fresh machine may wait for the
# Kubernetes and image builds scripts/test.sh started in the background.
FIRST_TEST_TIMEOUT = 3600
UP_TIMEOUT = 3300


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    first = next((i for i in items if i.get_closest_marker("cluster")), None)
    if first is not None:
        first.add_marker(pytest.mark.timeout(FIRST_TEST_TIMEOUT))


def _healthy(c: H.Cluster) -> str:
    """'' when the cluster answers with every node Ready and both DaemonSets ready, else why not."""
    try:
        nodes = c.get("nodes")["items"]
        ready = [n["metadata"]["name"] for n in nodes
                 if {x["type"]: x["status"] for x in n["status"].get("conditions", [])}.get("Ready") == "True"]
        if not c.nodes or sorted(ready) != sorted(n.name for n in c.nodes):
            return f"nodes ready {ready}, expected {[n.name for n in c.nodes]}"
        for ds in c.get("ds", "-n", H.AGENT_NS)["items"]:
            s = ds.get("status", {})
            if s.get("numberReady") != len(c.nodes):
                return f"DaemonSet {ds['metadata']['name']}: {s.get('numberReady')}/{len(c.nodes)} ready"
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return f"{type(exc).__name__}: {exc}"
    return ""


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*CLUSTER_SH, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def cluster() -> H.Cluster:
    if os.geteuid() != 0:
        pytest.skip("needs root (network and mount namespaces, cgroups)")
    work = Path(os.environ.get("POLICY_AGENT_CLUSTER_WORK", DEFAULT_WORK))
    keep = os.environ.get("POLICY_AGENT_CLUSTER_KEEP", "") == "1"
    st = state_mod.State(work)
    if st.exists() and "kubeconfig" in st.info():
        c = H.Cluster.from_work(work)
        why = _healthy(c)
        if not why:
            print(f"cluster: reusing the cluster up in {work} (left up afterwards)", file=sys.stderr)
            yield c
            return
        pytest.fail(f"a cluster is recorded in {work} but is not usable ({why}); "
                    f"run `scripts/cluster.sh down --work {work}` (or wait for the `up` in progress)")
    t = time.monotonic()
    ours = False  # down only what this session brought up (a failed `up` removed its own)
    try:
        try:
            up = _run(["up", "--work", str(work)], UP_TIMEOUT)
        except BaseException:
            ours = True  # killed mid-way (timeout, Ctrl-C): what it made is ours to remove
            raise
        up_seconds = time.monotonic() - t
        ours = up.returncode == 0
        lines = up.stdout.strip().splitlines()
        if up.returncode != 0 or not lines or not Path(lines[-1]).is_file():
            pytest.fail(f"scripts/cluster.sh up failed (exit {up.returncode}) after {up_seconds:.0f}s:\n"
                        f"{up.stderr.strip()[-6000:]}", pytrace=False)
        c = H.Cluster.from_work(work)
        c.up_seconds = up_seconds
        assert str(c.kubeconfig) == lines[-1], (c.kubeconfig, lines[-1])
        print(f"cluster: up in {up_seconds:.0f}s: {up.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        yield c
    finally:
        if ours and not keep:
            down = _run(["down", "--work", str(work)], 600)
            if down.returncode != 0:
                pytest.fail(f"scripts/cluster.sh down failed (exit {down.returncode}):\n{down.stderr.strip()[-4000:]}",
                            pytrace=False)
        elif ours:
            print(f"cluster: left up (POLICY_AGENT_CLUSTER_KEEP=1); remove with scripts/cluster.sh down --work {work}",
                  file=sys.stderr)
