"""Lab pieces that need no kernel: names, spec loading, matrix rendering, pool, ports."""

from __future__ import annotations

import pytest
import yaml

from policy_agent.lab import lab as L


def test_names_do_not_overlap_between_labs():
    assert L.netns_prefix("a") == "palab-a."
    assert not (L.netns_prefix("a-2") + "node").startswith(L.netns_prefix("a"))
    for bad in ("", "A", "a_b", "-a", "x" * 25, "a.b", "../x"):
        with pytest.raises(L.LabError):
            L.check_name(bad)


def test_load_docs_validates_with_the_agent_parser(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n")
    with pytest.raises(L.LabError, match="unsupported object kind 'Service'"):
        L.load_docs([str(f)])
    f.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"v": 1}}}))
    with pytest.raises(L.LabError, match=r"Pod default/p: metadata\.labels"):
        L.load_docs([str(f)])
    f.write_text("kind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: x}}\n")
    assert [L.obj_key(d) for d in L.load_docs([str(f)])] == ["Namespace/x"]
    with pytest.raises(L.LabError, match="cannot read"):
        L.load_docs([str(tmp_path / "missing.yaml")])


def test_pod_ports_serve_tcp_and_udp_only():
    d = {"spec": {"containers": [{"ports": [{"containerPort": 80}, {"containerPort": 81, "protocol": "UDP"},
                                            {"containerPort": 82, "protocol": "SCTP"}]}],
                  "initContainers": [{"ports": [{"containerPort": 90, "protocol": "TCP"}]}]}}
    assert L._pod_ports(d) == ([80, 90], [81])


def test_pool_is_dual_stack_and_in_the_lab_range():
    pool = L._pool()
    ips = [ip for e in pool["enis"] for ip in e["secondaryIPs"]]
    ips6 = [ip for e in pool["enis"] for ip in e["secondaryIPv6"]]
    assert len(ips) == len(set(ips)) == len(ips6) == 60
    assert all(ip.startswith("10.233.") for ip in ips) and all(ip.startswith("fd00:233::") for ip in ips6)


def test_format_matrix():
    res = [{"from": "x/a", "to": "x/a", "connected": True}, {"from": "x/a", "to": "y/b", "connected": False},
           {"from": "y/b", "to": "x/a", "connected": True}, {"from": "y/b", "to": "y/b", "connected": True}]
    lines = L.format_matrix(res, 81, "UDP").splitlines()
    assert lines[0].startswith("UDP/81")
    assert lines[1].split() == ["x/a", "y/b"]
    assert lines[2].split() == ["x/a", ".", "X"]
    assert lines[3].split() == ["y/b", ".", "."]


def test_cli_lab_parser():
    from policy_agent.cli import build_parser

    a = build_parser().parse_args(["lab", "probe", "--port", "81", "--protocol", "udp", "--from", "x/a", "--json"])
    assert (a.port, a.protocol, a.src, a.dst, a.json, a.name) == (81, "UDP", "x/a", None, True, "default")
    a = build_parser().parse_args(["lab", "apply", "--name", "n1", "-f", "a.yaml", "-f", "b.yaml"])
    assert a.files == ["a.yaml", "b.yaml"] and a.name == "n1"
    a = build_parser().parse_args(["lab", "kubectl", "--name", "n1", "get", "pods", "-A"])
    assert a.args == ["get", "pods", "-A"]
