"""The whole agent against the real kernel in private namespaces, with real traffic.

A YAML change in the manifest directory -> rules in the node namespace's kernel
-> TCP between pod namespaces allowed or denied. Plus: the link monitor in a
netns, and `policy-agent run` stopped by SIGTERM leaving its rules enforcing.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from agent_helpers import wait_for
from helpers.agent_process import AgentProcess, write_atomic
from helpers.kernel_lab import node_with_pods

from policy_agent.agent import Agent
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.lab import netns
from policy_agent.shared import endpoint as ep
from policy_agent.shared.naming import veth_name
from policy_agent.sources.cni import CniSource
from policy_agent.sources.events import Delete, InSync, Replace, Upsert
from policy_agent.sources.links import LinkSource
from policy_agent.sources.manifests import ManifestSource

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

IPS = {"a": "10.233.61.2", "b": "10.233.61.3", "c": "10.233.61.4"}
PORT = 8080


def _pods_yaml(labels: dict[str, str]) -> str:
    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"]
    for pod, ip in IPS.items():
        docs.append(
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: x, labels: {{app: {labels.get(pod, pod)}}}}}\n"
            f"spec: {{nodeName: n1, containers: [{{name: c, image: i}}]}}\nstatus: {{podIPs: [{{ip: {ip}}}]}}\n"
        )
    return "---\n".join(docs)


DENY_ALL = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}}
"""

ALLOW_A_TO_B = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: 8080}]
"""


@pytest.fixture
def lab():
    role = f"e{os.getpid() % 100000}"
    pods = {p: netns.unique_name("ag", f"{p}{role[-3:]}") for p in IPS}
    with node_with_pods(netns.unique_name("ag", "node"), pods, {p: [ip] for p, ip in IPS.items()},
                        lambda p: veth_name("eni", "x", p), serve=["b"], tcp_ports=[PORT]) as made:
        yield made


def _save(node: str) -> str:
    """iptables-save of the node netns, from the backend (nft/legacy) the dataplane detects there."""
    return Dataplane(netns=node).kernel.iptables_save(4)


def _reach(pods, src: str, dst: str = "b") -> bool:
    return netns.probe(pods[src], IPS[dst], PORT, "TCP", timeout=1.0)


def _eventually(pods, src: str, want: bool, timeout: float = 60.0) -> None:
    wait_for(lambda: _reach(pods, src) == want, timeout, what=f"{src}->b {'allowed' if want else 'denied'}")


def test_manifest_change_to_rules_to_traffic(lab, tmp_path):
    node, pods = lab
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "pods.yaml").write_text(_pods_yaml({}))
    status_dir = str(tmp_path / "status")
    agent = Agent(
        NodeConfig("n1"),
        Dataplane(netns=node),
        [ManifestSource(str(mdir)), CniSource(str(tmp_path / "endpoints")), LinkSource("eni", netns=node)],
        status_dir=status_dir, min_interval=0.02, refresh_interval=5,
    )
    agent.start()
    try:
        assert agent.wait_ready(60), agent.status()
        # The link monitor saw our veths in the netns (it does not gate readiness: links change no rule).
        wait_for(lambda: agent.status()["counts"]["links"] == 3, what="links seen")
        assert _reach(pods, "a") and _reach(pods, "c")  # no policy: open
        assert ep.read_status(status_dir, "x", "b").interface == veth_name("eni", "x", "b")

        write_atomic(mdir / "deny.yaml", DENY_ALL)
        _eventually(pods, "a", False)
        assert not _reach(pods, "c")

        write_atomic(mdir / "allow.yaml", ALLOW_A_TO_B)
        _eventually(pods, "a", True)
        assert not _reach(pods, "c")
        wait_for(lambda: ep.read_status(status_dir, "x", "b").policies == ("x/allow-a", "x/deny-all"),
                 what="status lists the policies")

        # Pod label change: a is no longer app=a, c becomes app=a.
        write_atomic(mdir / "pods.yaml", _pods_yaml({"a": "z", "c": "a"}))
        _eventually(pods, "a", False)
        _eventually(pods, "c", True)

        # A broken edit keeps the last good policy enforcing.
        write_atomic(mdir / "allow.yaml", ALLOW_A_TO_B.replace("port: 8080", "port: -1"))
        wait_for(lambda: agent.status()["errors"]["recent"], what="error surfaced in status")
        time.sleep(0.5)
        assert _reach(pods, "c") and not _reach(pods, "a")

        # Removing the policies opens the namespace again and sweeps their chains.
        os.unlink(mdir / "deny.yaml")
        os.unlink(mdir / "allow.yaml")
        _eventually(pods, "a", True)
        save = _save(node)
        assert "pa-FORWARD" in save  # read from the backend the agent writes to
        assert "pa-pi-x.deny-all" not in save and "pa-pi-x.allow-a" not in save
        ev = agent.metrics.event_to_enforced.labels("NetworkPolicy")
        assert ev._sum.get() > 0
    finally:
        agent.stop()


def test_link_monitor_in_netns():
    node = netns.unique_name("ag", "lnk")
    events: list = []
    src = LinkSource("eni", netns=node)
    try:
        netns.create(node)
        netns.ip(node, "link", "add", "enipre1", "type", "veth", "peer", "name", "other1")
        src.start(events.append)
        wait_for(lambda: any(isinstance(e, InSync) for e in events), what="in sync")
        first = next(e for e in events if isinstance(e, Replace))
        assert set(first.objects) == {"enipre1"}  # only our prefix
        netns.ip(node, "link", "add", "enipre2", "type", "veth", "peer", "name", "other2")
        wait_for(lambda: any(isinstance(e, Upsert) and e.key == "enipre2" for e in events), what="link added")
        netns.ip(node, "link", "set", "enipre2", "up")
        wait_for(lambda: any(isinstance(e, Upsert) and e.key == "enipre2" and e.obj["up"] for e in events),
                 what="link up")
        netns.ip(node, "link", "del", "enipre1")
        wait_for(lambda: any(isinstance(e, Delete) and e.key == "enipre1" for e in events), what="link gone")
        assert not any(getattr(e, "key", None) in ("other1", "other2") for e in events)
    finally:
        src.stop()
        netns.delete(node)


def test_run_command_sigterm_leaves_rules_enforcing(lab, tmp_path):
    node, pods = lab
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "pods.yaml").write_text(_pods_yaml({}))
    (mdir / "deny.yaml").write_text(DENY_ALL)
    agent = AgentProcess(node, tmp_path, state_file=False)
    try:
        agent.start()
        assert not _reach(pods, "a")
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(60) == 0
        text = agent.log()
        assert "agent_exit" in text
        # The process is gone; its rules are not.
        assert "pa-pi-x.deny-all" in _save(node)
        assert not _reach(pods, "a") and not _reach(pods, "c")
    finally:
        agent.stop()


def test_a_background_drift_check_repairs_a_member_someone_deleted(lab, tmp_path):
    """The periodic refresh reads the kernel in a worker thread (Dataplane.check_start):
    a member deleted behind the agent's back is found and put back, and traffic it
    allowed flows again, without the loop stopping to read (issue 13)."""
    node, pods = lab
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "pods.yaml").write_text(_pods_yaml({}))
    (mdir / "deny.yaml").write_text(DENY_ALL)
    (mdir / "allow.yaml").write_text(ALLOW_A_TO_B)
    agent = Agent(NodeConfig("n1"), Dataplane(netns=node), [ManifestSource(str(mdir)), CniSource(str(tmp_path / "ep"))],
                  min_interval=0.02, refresh_interval=0.5, gc_freeze=False)
    agent.start()
    try:
        assert agent.wait_ready(60), agent.status()
        _eventually(pods, "a", True)
        saved = netns.run(node, "ipset", "save").stdout
        owner = next(ln.split()[1] for ln in saved.splitlines()
                     if ln.startswith("add pa4s-") and ln.split()[2] == IPS["a"])
        refreshes = agent.metrics.refreshes._value.get()
        netns.run(node, "ipset", "del", owner, IPS["a"])  # fails unless it was there
        wait_for(lambda: IPS["a"] in netns.run(node, "ipset", "save", owner).stdout, 30, what="member put back")
        assert agent.metrics.refreshes._value.get() > refreshes
        _eventually(pods, "a", True, timeout=30)
        # a change made while checks keep running is still applied
        write_atomic(mdir / "pods.yaml", _pods_yaml({"a": "z", "c": "a"}))
        _eventually(pods, "a", False)
        _eventually(pods, "c", True)
    finally:
        agent.stop()
