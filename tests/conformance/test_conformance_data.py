"""The conformance data is consistent and agrees with the independent reference evaluator.

No kernel needed: the hand-derived truth tables of every case and step are compared
with tests/reference_eval.py on a snapshot built from the cluster spec plus the
case's objects (pods get fixed addresses). SCTP cases are also compiled and the
rule dump must contain the SCTP rule (SCTP is not probed: no SCTP sockets here).
"""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from policy_agent.model.parse import parse_object
from policy_agent.model.types import ClusterSnapshot
import reference_eval
import casedata

CASES = casedata.load_cases()
BASE = casedata.load_cluster()
PODS = casedata.pod_names(BASE)
IPS = {p: f"10.233.{100 + i}.{10 + i}" for i, p in enumerate(PODS)}
IPS6 = {p: f"fd00:233::{100 + i:x}:{10 + i:x}" for i, p in enumerate(PODS)}


def snapshot(state: casedata.State) -> ClusterSnapshot:
    objs = []
    for (kind, ns, name), d in sorted(state.objects.items()):
        d = casedata.substitute(d, IPS, IPS6)
        if kind == "Pod":
            ref = f"{ns}/{name}"
            d = {**d, "spec": {**d["spec"], "nodeName": "lab"},
                 "status": {"phase": "Running", "podIPs": [{"ip": IPS[ref]}, {"ip": IPS6[ref]}]}}
        objs.append(parse_object(d))
    return ClusterSnapshot.of(objs)


def test_enough_cases_and_unique_names():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    assert len(PODS) == 9


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_expectations_match_reference_evaluator(case):
    state = BASE
    for i, step in enumerate(case.steps):
        state = casedata.advance(state, step)
        snap = snapshot(state)
        nodes = casedata.node_targets(state, case.family)
        expected = casedata.expand(step["expect"], PODS, PODS + sorted(nodes))
        ips = IPS6 if case.family == 6 else IPS
        wrong = []
        for (port, proto), matrix in expected.items():
            for (a, b), want in matrix.items():
                # addresses of the case's family: a node target is its address, never a pod
                dst = nodes[b] if b in nodes else ips[b]
                src = reference_eval.resolve(snap, snap.pods[tuple(a.split("/"))], case.family)
                got = reference_eval.allowed(snap, src, dst, proto, port)
                if got != want:
                    wrong.append(f"{a} -> {b} {proto}/{port}: data says {want}, reference says {got}")
        assert not wrong, f"{case.name} step {i}:\n" + "\n".join(wrong)


def test_every_step_changes_something_or_is_the_first():
    """A step whose expectation equals the previous one proves nothing about the change (unless it
    is an update that must not change reachability)."""
    for case in CASES:
        prev, state = None, BASE
        for step in case.steps:
            state = casedata.advance(state, step)
            cur = casedata.expand(step["expect"], PODS, PODS + sorted(casedata.node_targets(state, case.family)))
            assert cur != prev, f"{case.name}: a step repeats the previous expectation"
            prev = cur


def test_cases_parse_as_kubernetes_objects():
    for case in CASES:
        for step in case.steps:
            for obj in step.get("apply", []):
                parse_object(casedata.substitute(obj, IPS, IPS6))
    assert all(ipaddress.ip_address(ip) for ip in IPS.values())


def test_expand_semantics():
    pods = ["x/a", "x/b", "y/a"]
    m = casedata.expand({"default": True, "rules": [
        {"from": "*", "to": "x/*", "connected": False},
        {"from": "y/*", "to": "x/a", "connected": True, "ports": [81], "protocols": ["UDP"]},
    ]}, pods)
    assert m[(81, "UDP")][("y/a", "x/a")] is True
    assert m[(80, "UDP")][("y/a", "x/a")] is False
    assert m[(81, "TCP")][("y/a", "x/a")] is False
    assert m[(80, "TCP")][("x/a", "y/a")] is True
    assert ("x/a", "x/a") not in m[(80, "TCP")]


def test_case_files_are_plain_yaml():
    for case in CASES:
        with open(case.path) as f:
            assert yaml.safe_load(f)["name"] == case.name


SCTP_CASES = [c for c in CASES if c.sctp_dump]


@pytest.mark.parametrize("case", SCTP_CASES, ids=[c.id for c in SCTP_CASES])
def test_sctp_cases_render_sctp_rules(case):
    """SCTP is not probed (no SCTP sockets in this kernel), so check the compiled rules instead:
    the selected pod's ingress policy chain carries an SCTP rule on the port, and no TCP/UDP one."""
    from policy_agent.compiler import compile as compile_rules
    from policy_agent.compiler.options import NodeConfig
    from policy_agent.desired import render_iptables_save

    state = BASE
    for step in case.steps:
        state = casedata.advance(state, step)
    text = render_iptables_save(compile_rules(snapshot(state), NodeConfig(node_name="lab")), 4)
    policy_lines = [ln for ln in text.splitlines() if ln.startswith("-A pa-pi-")]
    assert policy_lines, text
    for port in case.sctp_dump["ports"]:
        assert any("-p sctp" in ln and f"--dport {port}" in ln for ln in policy_lines), text
    assert not any("-p tcp" in ln or "-p udp" in ln for ln in policy_lines), text
