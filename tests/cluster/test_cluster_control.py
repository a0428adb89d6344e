"""The cluster's control plane alone (`cluster.sh up --nodes 0`): real etcd, kube-apiserver,
controller-manager and scheduler in pa-cl-ctl, reached from the root namespace through the
loopback forwarder; `down` leaves nothing, also after `up` itself was killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
CLUSTER = ["bash", str(REPO / "scripts" / "cluster.sh")]
# Our own namespace prefix: these control-plane-only clusters can run while the session's
# 2-node cluster (tests/cluster/conftest.py, prefix pa-cl-) is up.
PREFIX = "pa-ct-"
ENV = {**os.environ, "POLICY_AGENT_CLUSTER_PREFIX": PREFIX}


def _cluster(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLUSTER, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def _pa_cl_namespaces() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def _alive(entry: dict) -> bool:
    try:
        with open(f"/proc/{entry['pid']}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and int(fields[19]) == entry["start"]


def _mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(str(path))]


def _kubectl(kubeconfig: str, *args: str) -> subprocess.CompletedProcess:
    info = {k: v for r in _records(Path(kubeconfig).parent, "info") for k, v in r.items()}
    kubectl = Path(info["kube_bin"]) / "kubectl"
    return subprocess.run([str(kubectl), "--kubeconfig", kubeconfig, "--request-timeout=30s", *args],
                          capture_output=True, text=True, timeout=60)


def _assert_gone(work: Path, pids: list[dict]) -> None:
    assert _pa_cl_namespaces() == [], "down left network namespaces"
    assert [p for p in pids if _alive(p)] == [], "down left processes running"
    assert _mounts_below(work) == [], "down left mounts"
    assert not work.exists(), f"down left {work}: {list(work.iterdir()) if work.exists() else ''}"


@pytest.fixture
def work(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    leftover = _pa_cl_namespaces()
    assert not leftover, f"another cluster is up ({leftover}); run scripts/cluster.sh down first"
    w = tmp_path_factory.mktemp("cluster") / "work"
    yield w
    if w.exists():
        _cluster("down", "--work", str(w))


def _records(work: Path, kind: str) -> list:
    return [r["value"] for r in json.loads((work / "state.json").read_text())["records"] if r["kind"] == kind]


def test_control_plane_up_serves_the_root_namespace_and_down_leaves_nothing(work):
    t0 = time.monotonic()
    up = _cluster("up", "--nodes", "0", "--work", str(work))
    up_s = time.monotonic() - t0
    assert up.returncode == 0, up.stderr[-4000:]
    kubeconfig = up.stdout.strip().splitlines()[-1]
    assert kubeconfig == str(work / "admin.kubeconfig")
    # Only the namespaces we made; the root namespace got no VPC address or route.
    assert _pa_cl_namespaces() == [f"{PREFIX}ctl", f"{PREFIX}vpc"]
    root_routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    assert "10.240." not in root_routes
    # The kubeconfig reaches the API server from here (127.0.0.1 -> forwarder -> pa-cl-ctl).
    assert "server: https://127.0.0.1:" in Path(kubeconfig).read_text()
    ns = _kubectl(kubeconfig, "get", "ns", "-o", "name")
    assert ns.returncode == 0, ns.stderr
    assert {"namespace/default", "namespace/kube-system", "namespace/policy-agent-system"} <= set(ns.stdout.split())
    # The kubernetes Service sends to the advertised address inside the VPC.
    ep = json.loads(_kubectl(kubeconfig, "get", "endpoints", "kubernetes", "-o", "json").stdout)
    assert [a["ip"] for a in ep["subsets"][0]["addresses"]] == ["10.240.0.2"]
    svc = json.loads(_kubectl(kubeconfig, "get", "svc", "kubernetes", "-o", "json").stdout)
    assert svc["spec"]["clusterIP"] == "10.96.0.1"
    # The controller-manager runs: the DaemonSets were applied and its token controller gave
    # the agent's ServiceAccount a token (what the pods' in-cluster config reads).
    ds = _kubectl(kubeconfig, "-n", "policy-agent-system", "get", "ds", "-o", "name")
    assert set(ds.stdout.split()) == {"daemonset.apps/policy-agent", "daemonset.apps/vpcip-ipamd"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sa = json.loads(_kubectl(kubeconfig, "-n", "policy-agent-system", "get", "sa", "policy-agent", "-o",
                                 "json").stdout)
        if sa.get("secrets"):
            break
        time.sleep(1)
    assert sa.get("secrets"), "no token for ServiceAccount policy-agent (controller-manager not working)"
    # A second up while this one is up fails clearly and changes nothing.
    again = _cluster("up", "--nodes", "0", "--work", str(work))
    assert again.returncode != 0
    assert "already up" in again.stderr
    st = _cluster("status", "--work", str(work))
    assert st.returncode == 0 and "kube-apiserver" in st.stdout and "EXITED" not in st.stdout, st.stdout
    pids = _records(work, "pid")
    assert {p["name"] for p in pids} >= {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                                         "forwarder"}
    t0 = time.monotonic()
    down = _cluster("down", "--work", str(work))
    down_s = time.monotonic() - t0
    assert down.returncode == 0, down.stderr[-3000:]
    _assert_gone(work, pids)
    print(f"up {up_s:.1f}s, down {down_s:.1f}s")


def test_down_cleans_up_after_up_was_killed(work):
    """kill -9 of `up` once the API server is starting: `down` still removes everything."""
    proc = subprocess.Popen([*CLUSTER, "up", "--nodes", "0", "--work", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=ENV)
    deadline = time.monotonic() + 300
    pids: list[dict] = []
    while time.monotonic() < deadline:
        try:
            pids = _records(work, "pid")
        except (OSError, ValueError):
            pids = []
        if any(p["name"] == "forwarder" for p in pids):
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.1)
    assert any(p["name"] == "kube-apiserver" for p in pids), "up never started the API server"
    # The python process itself (bash exec'ed it, so the pid is the interpreter's).
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert any(_alive(p) for p in pids), "the control plane must outlive the killed up for this test to mean anything"
    down = _cluster("down", "--work", str(work))
    assert down.returncode == 0, down.stderr[-3000:]
    _assert_gone(work, pids)


# --- teardown guards (no cluster needed) ------------------------------------------------


def test_teardown_never_signals_a_recycled_pid(tmp_path):
    """A recorded pid whose start time no longer matches is someone else's process now."""
    from policy_agent.lab.cluster import state

    ours = subprocess.Popen(["sleep", "60"])
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        st = state.State(tmp_path / "w")
        st.record("pid", {"pid": ours.pid, "name": "ours"})
        st.record("pid", {"pid": stranger.pid, "name": "recycled"})
        # As if the recorded process had exited and its pid been reused by a later one.
        rec = st.records[-1]["value"]
        rec["start"] = rec["start"] - 1
        st.save()
        errors: list[str] = []
        state.teardown(state.State(tmp_path / "w"), None, errors)
        assert errors == []
        # Ended (teardown reaps its own children, so no exit status is left to read): not 60 s of sleep.
        ours.wait(5)
        assert not os.path.exists(f"/proc/{ours.pid}")
        assert stranger.poll() is None, "a process whose start time differs from the record was signalled"
    finally:
        for p in (ours, stranger):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_remove_path_refuses_to_descend_into_a_mount(tmp_path):
    """In a private mount namespace: a bind mount below the path stops the removal, and
    the mount's source is untouched."""
    src = tmp_path / "precious"
    src.mkdir()
    (src / "file").write_text("keep")
    victim = tmp_path / "work"
    (victim / "mnt").mkdir(parents=True)
    script = (
        "import subprocess, sys\n"
        "from policy_agent.lab.cluster import state\n"
        f"subprocess.run(['mount', '--bind', {str(src)!r}, {str(victim / 'mnt')!r}], check=True)\n"
        "try:\n"
        f"    state.remove_path({str(victim)!r})\n"
        "except state.StateError as exc:\n"
        "    print('refused:', exc)\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
                       capture_output=True, text=True, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mounts below it" in p.stdout
    assert (src / "file").read_text() == "keep"
