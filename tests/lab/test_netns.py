"""policy_agent.lab.netns against the real kernel, in private namespaces."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from policy_agent.lab import netns

pytestmark = pytest.mark.kernel


@pytest.fixture
def trio():
    names = [netns.unique_name("labt", r) for r in ("node", "a", "b")]
    try:
        for n in names:
            netns.create(n)
        netns.enable_forwarding(names[0])
        yield names
    finally:
        for n in names:
            netns.delete(n)
        assert not netns.list_names(f"pa-labt-{os.getpid()}-")


def test_veth_server_and_probes(trio):
    node, a, b = trio
    pid = os.getpid() % 200
    netns.add_veth(node, a, f"plt{os.getpid()}a"[-15:], [f"10.233.201.{pid + 1}", f"fd00:233::201:{pid + 1:x}"])
    netns.add_veth(node, b, f"plt{os.getpid()}b"[-15:], [f"10.233.202.{pid + 1}", f"fd00:233::202:{pid + 1:x}"])
    srv = netns.start_server(b, tcp_ports=[80, 81], udp_ports=[80])
    try:
        v4 = f"10.233.202.{pid + 1}"
        v6 = f"fd00:233::202:{pid + 1:x}"
        assert netns.probe(a, v4, 80, "TCP", timeout=5)
        assert netns.probe(a, v4, 81, "TCP", timeout=5)
        assert netns.probe(a, v4, 80, "UDP", timeout=5)
        assert netns.probe(a, v6, 80, "TCP", timeout=5)
        assert netns.probe(a, v6, 80, "UDP", timeout=5)
        # Nothing listens on UDP 81 / TCP 82: refused, not connected.
        assert not netns.probe(a, v4, 81, "UDP", timeout=1)
        assert not netns.probe(a, v4, 82, "TCP", timeout=1)
        got = netns.probe_many(
            [netns.Probe(a, v4, p, proto, (p, proto)) for p in (80, 81) for proto in ("TCP", "UDP")], timeout=2
        )
        assert got == {(80, "TCP"): True, (80, "UDP"): True, (81, "TCP"): True, (81, "UDP"): False}
        # The address only exists in the lab: the root namespace has no route to it.
        out = subprocess.run(["ip", "route", "get", v4], capture_output=True, text=True).stdout
        assert "plt" not in out
    finally:
        netns.stop_server(srv)
    assert not netns.probe(a, f"10.233.202.{pid + 1}", 80, "TCP", timeout=1)


def test_delete_kills_processes_inside(trio):
    _node, a, _b = trio
    srv = netns.start_server(a, tcp_ports=[80], detach=True)
    assert srv.pid in netns.pids_in(a)
    netns.delete(a)
    assert not netns.exists(a)
    assert not netns._alive(srv.pid)


def test_cleanup_prefix_after_killed_owner():
    """A process that created namespaces and was SIGKILLed leaves them; cleanup_prefix finds them."""
    prefix = f"pa-labk-{os.getpid()}-"
    code = (
        "import os, signal, sys; from policy_agent.lab import netns; "
        f"[netns.create('{prefix}' + r) for r in ('n', 'p')]; "
        f"netns.start_server('{prefix}p', tcp_ports=[80], detach=True); "
        "print('up', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert netns.list_names(prefix) == [prefix + "n", prefix + "p"]
        leftover = netns.pids_in(prefix + "p")
        assert leftover
        assert sorted(netns.cleanup_prefix(prefix)) == [prefix + "n", prefix + "p"]
        assert netns.list_names(prefix) == []
        assert not any(netns._alive(p) for p in leftover)
    finally:
        for n in netns.list_names(prefix):
            netns.delete(n)


def test_bad_names_rejected():
    with pytest.raises(ValueError):
        netns.create("../etc")
    with pytest.raises(ValueError):
        netns.cleanup_prefix("pa")
