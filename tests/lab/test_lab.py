"""The lab: real CNI, real agent, real traffic; cleanup after failure and SIGKILL; labs side by side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from policy_agent.lab import lab as L
from policy_agent.lab import netns

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

PID = os.getpid()


def _ns(name, **labels):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {"ns": name}}}


def _pod(ns, name, labels=None, ports=((80, "TCP"), (80, "UDP")), node=None):
    d = {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": ns, "name": name, "labels": labels or {"app": name}},
         "spec": {"containers": [{"name": "c", "image": "none",
                                  "ports": [{"containerPort": p, "protocol": proto, "name": f"p{p}-{proto.lower()}"}
                                            for p, proto in ports]}]}}
    if node:
        d["spec"]["nodeName"] = node
    return d


def _np(ns, name, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"namespace": ns, "name": name},
            "spec": spec}


def _leftovers(name: str) -> list[str]:
    left = netns.list_names(L.netns_prefix(name))
    if os.path.exists(L.state_dir(name)):
        left.append(L.state_dir(name))
    return left


@pytest.fixture
def make_lab():
    made = []

    def make(suffix: str, docs, **kw):
        name = f"t{PID}-{suffix}"
        L.down(name)
        lab = L.Lab(name)
        made.append(name)
        lab.up(docs, **kw)
        return lab

    yield make
    for name in made:
        L.down(name)
        assert _leftovers(name) == []


def _matrix(lab, port=80, proto="TCP"):
    return {(r["from"], r["to"]): r["connected"] for r in lab.probe(port, proto, timeout=1.0, attempts=3)}


def test_policies_local_and_remote_peers(make_lab):
    """Hand-written truth: ingress by label, from a remote node's pod, egress to it, relabel, add/delete pods."""
    docs = [_ns("web"), _ns("ops"),
            _pod("web", "front", {"app": "front"}), _pod("web", "api", {"app": "api"}),
            _pod("ops", "probe", {"app": "probe"}),
            _pod("ops", "far", {"app": "far"}, node="other-node")]
    lab = make_lab("pol", docs)
    assert lab.pods["ops/far"].remote and not lab.pods["web/api"].remote
    m = _matrix(lab)
    assert all(m.values()), m  # no policy: everything open, remote peer included

    # api accepts TCP 80 only from front and from the remote pod (by label, across namespaces).
    lab.apply([_np("web", "api-ingress", {
        "podSelector": {"matchLabels": {"app": "api"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "front"}}},
                              {"namespaceSelector": {"matchLabels": {"ns": "ops"}},
                               "podSelector": {"matchLabels": {"app": "far"}}}],
                     "ports": [{"port": 80, "protocol": "TCP"}]}]})])
    m = _matrix(lab)
    assert m[("web/front", "web/api")] and m[("ops/far", "web/api")]
    assert not m[("ops/probe", "web/api")]
    assert m[("ops/probe", "web/front")] and m[("web/api", "ops/probe")]
    u = _matrix(lab, 80, "UDP")
    assert not u[("web/front", "web/api")] and u[("web/front", "ops/probe")]
    # Local pods are dual-stack (the pool has IPv6 too): the same verdicts over IPv6.
    api6 = [ip for ip in lab.pods["web/api"].ips if ":" in ip][0]
    assert lab.probe(80, "TCP", "web/front", api6, attempts=3)[0]["connected"]
    assert not lab.probe(80, "TCP", "ops/probe", api6, attempts=1)[0]["connected"]

    # front may not send to the remote node's pod (egress, by ipBlock), everything else stays.
    far_ip = lab.pods["ops/far"].ips[0]
    lab.apply([_np("web", "front-egress", {
        "podSelector": {"matchLabels": {"app": "front"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [f"{far_ip}/32"]}}]}]})])
    m = _matrix(lab)
    assert not m[("web/front", "ops/far")] and m[("web/front", "web/api")] and m[("web/front", "ops/probe")]
    assert m[("web/api", "ops/far")]

    # Relabel probe to app=front: it is now let in; a new pod with app=front too; deleting it removes it.
    lab.apply([_pod("ops", "probe", {"app": "front"}), _pod("ops", "late", {"app": "front"})])
    m = _matrix(lab)
    assert not m[("ops/probe", "web/api")]  # podSelector alone = the policy's namespace only
    lab.apply([_np("web", "api-ingress-ops", {
        "podSelector": {"matchLabels": {"app": "api"}},
        "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "front"}}}]}]})])
    m = _matrix(lab)
    assert m[("ops/probe", "web/api")] and m[("ops/late", "web/api")]
    lab.delete([_pod("ops", "late")])
    assert "ops/late" not in lab.pods and not netns.exists(L.netns_prefix(lab.name) + "pod.ops.late")
    lab.delete([_np("web", "api-ingress", {}), _np("web", "api-ingress-ops", {}), _np("web", "front-egress", {})])
    m = _matrix(lab)
    assert all(m.values()), m


def test_two_labs_side_by_side(make_lab):
    docs = [_ns("x"), _pod("x", "a"), _pod("x", "b")]
    one = make_lab("one", docs)
    two = make_lab("two", docs)
    # Same addresses and interface names, different namespaces: fully independent.
    assert one.pods["x/a"].ips == two.pods["x/a"].ips
    assert one.node_netns != two.node_netns
    one.apply([_np("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    assert not _matrix(one)[("x/a", "x/b")]
    assert _matrix(two)[("x/a", "x/b")]
    L.down(one.name)
    assert _leftovers(one.name) == []
    assert _matrix(two)[("x/a", "x/b")] and two.in_sync()


def test_failed_up_cleans_up():
    name = f"t{PID}-fail"
    L.down(name)
    lab = L.Lab(name)
    with pytest.raises(L.LabError, match="timed out|in sync"):
        lab.up([_ns("x"), _pod("x", "a")], timeout=0.01)  # the agent cannot be in sync that fast
    assert _leftovers(name) == []
    for key in ("agent", "ipamd"):
        pid = lab.pids.get(key)
        assert pid and not netns._alive(pid)


def test_bad_spec_is_rejected_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_np("x", "p", {"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]})))
    with pytest.raises(L.LabError, match=r"NetworkPolicy x/p: spec\.ingress\[0\]\.ports\[0\]\.port"):
        L.load_docs([str(bad)])


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "policy_agent.cli", "--log-level", "warning", "lab", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_contract_and_kill_during_up(tmp_path):
    name = f"t{PID}-cli"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump_all([_ns("x"), _pod("x", "a"), _pod("x", "b")]))
    L.down(name)
    try:
        # Killed in the middle of `lab up`: `lab down` still removes everything.
        proc = subprocess.Popen([sys.executable, "-m", "policy_agent.cli", "lab", "up", "--spec", str(spec),
                                 "--name", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not netns.exists(L.netns_prefix(name) + "pod.x.a"):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _leftovers(name), "the up should have been killed half-way"
        state = json.load(open(os.path.join(L.state_dir(name), "state.json")))
        started = [p for p in state.get("pids", {}).values() if p]
        r = _cli("down", "--name", name)
        assert r.returncode == 0, r.stderr
        assert _leftovers(name) == []
        assert not any(netns._alive(p) for p in started)

        r = _cli("up", "--spec", str(spec), "--name", name)
        assert r.returncode == 0, r.stderr
        assert "in sync" in r.stdout
        st = json.loads(_cli("status", "--name", name, "--json").stdout)
        assert st["in_sync"] is True and st["node_netns"] == L.netns_prefix(name) + "node"
        assert {(p["namespace"], p["name"]) for p in st["pods"]} == {("x", "a"), ("x", "b")}
        assert all(p["interface"].startswith("eni") and p["ips"] and p["netns"] for p in st["pods"])
        pol = tmp_path / "deny.yaml"
        pol.write_text(yaml.safe_dump(_np("x", "deny-b", {"podSelector": {"matchLabels": {"app": "b"}}})))
        r = _cli("apply", "--name", name, "-f", str(pol))
        assert r.returncode == 0 and "NetworkPolicy/x/deny-b configured" in r.stdout, r.stderr
        out = json.loads(_cli("probe", "--name", name, "--json", "--from", "x/a").stdout)
        assert out["port"] == 80 and out["protocol"] == "TCP"
        got = {(x["from"], x["to"]): x["connected"] for x in out["results"]}
        assert got == {("x/a", "x/a"): True, ("x/a", "x/b"): False}
        text = _cli("probe", "--name", name, "--protocol", "udp", "--to", st["pods"][1]["ips"][0]).stdout
        assert "UDP/80" in text and "x/b" in text
        r = _cli("delete", "--name", name, "-f", str(pol))
        assert r.returncode == 0 and "deleted" in r.stdout
        out = json.loads(_cli("probe", "--name", name, "--json", "--from", "x/a", "--to", "x/b").stdout)
        assert out["results"] == [{"from": "x/a", "to": "x/b", "connected": True}]
        bad = _cli("probe", "--name", name, "--from", "x/zz")
        assert bad.returncode == 1 and "x/zz" in bad.stderr
    finally:
        _cli("down", "--name", name)
    assert _leftovers(name) == []


def test_demo_command():
    name = f"t{PID}-demo"
    proc = subprocess.run([sys.executable, "-m", "policy_agent.cli", "--log-level", "warning", "demo", "--name", name],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    before, after = out.split("== 4.")[0].split("== 2.")[1], out.split("== 4.")[1].split("== 5.")[0]
    row = {ln.split()[0]: ln.split()[1:] for ln in after.splitlines() if ln[:1] in "xyz" and "/" in ln[:3]}
    # Columns x/a x/b x/c y/a ...: y may reach x/a, z may not; nothing in x is reachable from z.
    assert row["y/b"][:3] == [".", "X", "X"] and row["z/a"][:3] == ["X", "X", "X"] and row["z/a"][3:] == ["."] * 6
    before_rows = [ln.split()[1:] for ln in before.splitlines() if ln[:1] in "xyz" and "/" in ln[:3]]
    assert len(before_rows) == 9 and all(c == "." for r in before_rows for c in r)
    assert "pa-pi-x.allow-y-to-a-on-80" in out and "--dport 80" in out
    assert "What changed" in out and "torn down" in out
    assert _leftovers(name) == []
