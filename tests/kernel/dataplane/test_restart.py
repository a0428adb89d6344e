"""Restart (a new process) and a policy change under continuous probing: no allowed
connection fails and no denied packet gets through at any moment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from policy_agent.lab import netns

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def agent(lab, variant: str) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "agent_proc.py"), lab.node, lab.backend, variant, json.dumps(lab.ips)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Prober(threading.Thread):
    def __init__(self, lab, src, dst, port, timeout):
        super().__init__(daemon=True)
        self.args = (lab.pods[src], lab.ips[dst][0], port)
        self.timeout = timeout
        self.results: list[bool] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.results.append(netns.probe(*self.args, "TCP", self.timeout))
            time.sleep(0.02)


def test_restart_and_policy_change_keep_enforcing(lab):
    first = agent(lab, "s1")
    assert first["lines_written"] > 0
    allowed = Prober(lab, "b", "a", 80, timeout=3.0)  # allowed in s1 and s2
    denied = Prober(lab, "c", "a", 80, timeout=0.3)  # denied in s1 and s2
    for p in (allowed, denied):
        p.start()
    try:
        time.sleep(1.0)
        same = agent(lab, "s1")  # restart with the same desired state
        time.sleep(1.0)
        changed = agent(lab, "s2")  # restart with a new one
        time.sleep(1.0)
    finally:
        for p in (allowed, denied):
            p.stop.set()
        for p in (allowed, denied):
            p.join(10)
    assert same["lines_written"] == 0
    assert changed["iptables_lines"] > 0
    assert len(allowed.results) >= 5 and len(denied.results) >= 5
    assert all(allowed.results), f"{allowed.results.count(False)} allowed connections failed"
    assert not any(denied.results), f"{denied.results.count(True)} denied connections got through"
    assert lab.can("c", "a", 81)  # what s2 added


def test_other_backend_is_swept(lab):
    from policy_agent.lab import specs as s
    from policy_agent.dataplane.apply import Dataplane
    from policy_agent.dataplane.backend import other_backend
    from policy_agent.dataplane.kernel import legacy_available

    other = other_backend(lab.backend)
    if other == "legacy" and not legacy_available():
        pytest.skip("no legacy iptables on this host")
    d = s.build(lab.all_pods(), [])
    Dataplane(netns=lab.node, backend=other, sweep_other_backend=False).apply(d)  # leftovers of an old run
    save_other = lambda: netns.run(lab.node, f"iptables-{other}-save").stdout  # noqa: E731
    assert "pa-FORWARD" in save_other()
    r = Dataplane(netns=lab.node, backend=lab.backend).apply(d, allow_sweep=True)
    assert r.other_backend_cleaned > 0
    assert "pa-" not in save_other()
    assert "pa-FORWARD" in lab.save(4) and "KUBE-FOO" in lab.save(4)
