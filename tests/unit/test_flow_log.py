"""Flow verdict logs without the kernel: the NFLOG rules the compiler writes, their
attribution, the netlink message parser, the JSON lines, `policy-agent flows` and the
bounded metric labels. The kernel and real traffic: tests/conformance/test_flow_logs.py."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import socket
import struct
import sys
import threading
import time

import pytest
from hypothesis import given

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_cnp_property import tiered_cluster_st  # noqa: E402
from test_property import CONFIGS, NODES, SETTINGS, cluster_verdict  # noqa: E402

from policy_agent.commands import flows as flows_cmd  # noqa: E402
from policy_agent.compiler import compile  # noqa: E402
from policy_agent.compiler.options import FlowLogOptions, NodeConfig  # noqa: E402
from policy_agent.desired import (  # noqa: E402
    FlowLog,
    FlowOrigin,
    NFLOG_PREFIX_MAX,
    flow_origins,
    hashlimit_name,
)
from policy_agent.live_explain import canonical, rule_from_spec  # noqa: E402
from policy_agent.model import ClusterSnapshot  # noqa: E402
from policy_agent.model.parse import load_yaml  # noqa: E402
from policy_agent.obs import flowlog  # noqa: E402
from policy_agent.obs.metrics import BoundedLabel, Metrics  # noqa: E402

ON = FlowLogOptions(allow=True)

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: z, labels: {ns: z}}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: a, labels: {pod: a}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 10.233.0.1, podIPs: [{ip: 10.233.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: z, name: b, labels: {pod: b}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {podIP: 10.233.0.2, podIPs: [{ip: 10.233.0.2}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: web}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: guard}
spec:
  tier: Admin
  priority: 7
  subject: {namespaces: {matchLabels: {ns: z}}}
  egress:
  - {name: no x, action: Deny, to: [{namespaces: {matchLabels: {ns: x}}}]}
  - {action: Accept, to: [{namespaces: {}}]}
"""


def snapshot():
    return ClusterSnapshot.of(load_yaml(CLUSTER, "cluster.yaml"))


def nflog_rules(state):
    for (family, _t), tbl in state.chains.items():
        for chain in tbl.values():
            for i, r in enumerate(chain.rules):
                if r.action.verb == "NFLOG":
                    yield family, chain, i, r


# --- desired / compiler -------------------------------------------------------------------


def test_off_by_default_in_the_compiler_and_deny_only_by_default_in_the_agent_config():
    assert not list(nflog_rules(compile(snapshot(), NodeConfig("n1"))))
    from policy_agent.config import Config

    opts = Config(node="n1").node_config().flow_log
    assert opts is not None and opts.deny and not opts.allow and opts.group == 30210
    assert Config(node="n1", flow_log=False).node_config().flow_log is None


def test_deny_sites_are_logged_with_their_origin():
    state = compile(snapshot(), NodeConfig("n1", flow_log=FlowLogOptions()))
    origins = {(o.kind, o.direction, o.policy, o.endpoint) for o in flow_origins(state).values()}
    assert origins == {
        ("no-policy-allowed", "ingress", "", "x/a"),  # x/web isolates x/a; nothing from z is allowed
        ("admin", "egress", "guard", ""),
    }
    for _family, chain, i, r in nflog_rules(state):
        o = r.action.log.origin
        nxt = chain.rules[i + 1]
        assert o.verdict == "deny" and nxt.action.verb == "DROP"
        assert r.match == nxt.match and o.origin == nxt.comment  # same packets, the same naming
        assert r.comment == f"flow log deny: {nxt.comment}"
        if o.kind == "admin":
            assert (o.priority, o.rule, o.rule_name) == (7, 0, "no x")
        else:
            assert o.isolating == ("x/web",)


def test_allow_sites_log_only_the_first_allowing_rule():
    state = compile(snapshot(), NodeConfig("n1", flow_log=ON))
    kinds = {}
    for _f, chain, i, r in nflog_rules(state):
        o = r.action.log.origin
        kinds.setdefault(o.kind, set()).add(o.verdict)
        nxt = chain.rules[i + 1]
        if o.kind == "networkpolicy":
            # non-terminating allow rules: logged only while the accept mark is clear
            assert r.match == dataclasses.replace(nxt.match, mark=(0, 0x10000)) and nxt.action.verb == "MARK"
            assert (o.policy, o.rule) == ("x/web", 0)
        elif o.kind == "admin" and o.verdict == "allow":
            assert r.match == nxt.match and nxt.action.target == "pa-cnp-accept"
    assert kinds == {"networkpolicy": {"allow"}, "no-policy-allowed": {"deny"}, "admin": {"allow", "deny"},
                     "no-policy-selects": {"allow"}}


def test_rendered_rule_fits_the_kernel_limits_and_is_stable():
    o = FlowOrigin("deny", "ingress", "no-policy-allowed", endpoint="x/" + "a" * 253, isolating=("x/p",) * 50,
                   origin="x/a: no ingress policy allowed the packet")
    log = FlowLog(30210, o, 100, 200, 20, 50)
    assert len(log.prefix) <= NFLOG_PREFIX_MAX and log.prefix.startswith("pa:d:i:")
    assert log.prefix == FlowLog(1, dataclasses.replace(o), 5, 5).prefix  # the ID is the origin's, only
    assert dataclasses.replace(o, rule=1).id != o.id
    text = " ".join(log.render())
    assert text == (
        f"-m hashlimit --hashlimit-upto 20/sec --hashlimit-burst 50 --hashlimit-mode srcip --hashlimit-name "
        f"{hashlimit_name('s', 'deny', 20, 50)} -m hashlimit --hashlimit-upto 100/sec --hashlimit-burst 200 "
        f"--hashlimit-name {hashlimit_name('f', 'deny', 100, 200)} -j NFLOG --nflog-prefix {log.prefix} "
        "--nflog-group 30210")
    assert len(hashlimit_name("s", "allow", 10**6, 10**6)) <= 15
    assert hashlimit_name("f", "deny", 100, 200) != hashlimit_name("f", "deny", 101, 200)  # new rate, new table
    with pytest.raises(ValueError, match="group"):
        FlowLogOptions(group=70000)
    with pytest.raises(ValueError, match="verdict"):
        FlowOrigin("drop", "ingress", "x")


def test_kernel_text_of_a_flow_log_rule_reads_back_equal():
    """As iptables-save (nft and legacy) prints it back: drift checks must see no change."""
    state = compile(snapshot(), NodeConfig("n1", flow_log=FlowLogOptions()))
    _f, chain, i, r = next(nflog_rules(state))
    line = chain.render_lines()[i]
    spec = line.split(" ", 2)[2]
    _h, back = rule_from_spec(spec)
    assert canonical(back) == canonical(r)
    altered = spec.replace("--nflog-group 30210", "--nflog-group 1")
    assert canonical(rule_from_spec(altered)[1]) != canonical(r)


@SETTINGS
@given(tiered_cluster_st())
def test_logging_changes_no_verdict_and_only_adds_rules(objects):
    snap = ClusterSnapshot.of(objects)
    on = {n: compile(snap, dataclasses.replace(CONFIGS[n], flow_log=ON)) for n in NODES}
    off = {n: compile(snap, CONFIGS[n]) for n in NODES}
    for n in NODES:
        assert on[n].ipsets == off[n].ipsets and on[n].hooks == off[n].hooks
        for key, tbl in off[n].chains.items():
            assert set(on[n].chains[key]) == set(tbl)
            for name, chain in tbl.items():
                stripped = tuple(r for r in on[n].chains[key][name].rules if r.action.verb != "NFLOG")
                assert stripped == chain.rules, name
    pods = sorted(snap.pods.values(), key=lambda p: p.key)
    for a in pods[:4]:
        for b in pods[:4]:
            if a is b:
                continue
            for family in {ip.version for ip in a.ips} & {ip.version for ip in b.ips}:
                for proto, port in (("TCP", 80), ("UDP", 81)):
                    assert cluster_verdict(on, snap, a, b, proto, port, family)[0] == \
                        cluster_verdict(off, snap, a, b, proto, port, family)[0]


# --- netlink parsing ------------------------------------------------------------------------


def _nlattr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def packet_message(family: int, prefix: str, payload: bytes, indev: int = 0, outdev: int = 0) -> bytes:
    """An NFULNL_MSG_PACKET as nfnetlink_log builds it (include/uapi/linux/netfilter/nfnetlink_log.h)."""
    attrs = _nlattr(1, struct.pack("!HBx", 0x0800, 3))
    if indev:
        attrs += _nlattr(4, struct.pack("!I", indev))
    if outdev:
        attrs += _nlattr(5, struct.pack("!I", outdev))
    attrs += _nlattr(10, prefix.encode() + b"\0") + _nlattr(9, payload)
    body = struct.pack("=BBH", family, 0, socket.htons(30210)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (4 << 8) | 0, 0, 0, 0) + body


def ipv4_tcp(src: str, dst: str, sport: int, dport: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return ip + struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 2, 1000, 0, 0)


def ipv6_udp_with_hop_by_hop(src: str, dst: str, sport: int, dport: int) -> bytes:
    ip = struct.pack("!IHBB16s16s", 6 << 28, 16, 0, 64, socket.inet_pton(socket.AF_INET6, src),
                     socket.inet_pton(socket.AF_INET6, dst))
    hop = bytes([17, 0]) + b"\x01\x04\0\0\0\0"  # next header UDP, length 0 (8 bytes), PadN
    return ip + hop + struct.pack("!HHHH", sport, dport, 8, 0)


def test_packet_messages_parse_to_addresses_ports_prefix_and_interfaces():
    data = packet_message(socket.AF_INET, "pa:d:i:abc", ipv4_tcp("10.233.0.2", "10.233.0.1", 4321, 80), 3, 7)
    data += packet_message(socket.AF_INET6, "pa:a:e:def",
                           ipv6_udp_with_hop_by_hop("fd00:233::2", "fd00:233::1", 5353, 53), 9)
    data += struct.pack("=IHHII", 20, 2, 0, 1, 0) + struct.pack("=i", 0)  # an ACK among them
    pkts, errors = flowlog.parse_messages(data)
    assert errors == []
    assert pkts == [
        flowlog.Packet("pa:d:i:abc", 4, "tcp", "10.233.0.2", "10.233.0.1", 4321, 80, 3, 7),
        flowlog.Packet("pa:a:e:def", 6, "udp", "fd00:233::2", "fd00:233::1", 5353, 53, 9, 0),
    ]
    assert flowlog.parse_messages(data[:30]) == ([], [])  # a truncated datagram: nothing, no exception


def test_record_resolves_policy_rule_and_pods_from_the_current_state():
    state = compile(snapshot(), NodeConfig("n1", flow_log=FlowLogOptions()))
    snap = snapshot()
    gen = [1]
    r = flowlog.Resolver(lambda: (gen[0], state), lambda: list(snap.pods.values()))
    r.refresh(force=True)
    prefix = next(p for p, o in flow_origins(state).items() if o.kind == "admin")
    rec = flowlog.flow_record(flowlog.Packet(prefix, 4, "tcp", "10.233.0.2", "10.233.0.1", 999, 80, 5, 6),
                              r, 0.0, lambda i: f"if{i}")
    assert rec["src_pod"] == "z/b" and rec["dst_pod"] == "x/a" and rec["iface"] == "if5"
    assert (rec["verdict"], rec["direction"], rec["policy"]) == ("deny", "egress", "guard")
    assert rec["rule"] == "admin tier priority 7 egress rule 0 (no x)"
    assert rec["time"] == "1970-01-01T00:00:00.000Z"
    deny = next(p for p, o in flow_origins(state).items() if o.kind == "no-policy-allowed")
    rec = flowlog.flow_record(flowlog.Packet(deny, 4, "udp", "10.9.9.9", "10.233.0.1", 1, 81), r, 0.0,
                              lambda i: None)
    assert rec["src_pod"] is None and rec["policy"] is None and rec["rule"] == "no policy allowed it"
    assert rec["decided_by"]["isolating_policies"] == ["x/web"] and rec["decided_by"]["endpoint"] == "x/a"
    unknown = flowlog.flow_record(flowlog.Packet("pa:d:i:zzzz", 4, "tcp", "1.1.1.1", "2.2.2.2", 1, 2), r, 0.0,
                                  lambda i: None)
    assert unknown["decided_by"] == {"kind": "unknown", "id": "pa:d:i:zzzz"} and unknown["verdict"] == "deny"


def test_metrics_labels_are_bounded():
    b = BoundedLabel(2)
    assert [b(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]
    m = Metrics()
    fm = flowlog.FlowMetrics(m, 2)
    for i in range(10):
        fm({"verdict": "deny", "direction": "ingress", "src_pod": None, "dst_pod": f"ns{i}/p",
            "decided_by": {"kind": "no-policy-allowed", "isolating_policies": [f"ns{i}/pol"]}})
    text = m.render().decode()
    assert text.count("policy_agent_flow_denied_by_namespace_total{") == 3  # ns0, ns1, other
    assert 'policy_agent_flow_denied_by_namespace_total{namespace="other"} 8.0' in text
    assert text.count("policy_agent_flow_denied_by_policy_total{") == 3
    assert 'policy_agent_flow_verdicts_total{direction="ingress",verdict="deny"} 10.0' in text or \
        'policy_agent_flow_verdicts_total{verdict="deny",direction="ingress"} 10.0' in text


def test_rotating_writer_keeps_one_old_file(tmp_path):
    path = str(tmp_path / "sub" / "flows.jsonl")
    w = flowlog.RotatingWriter(path, max_bytes=100)
    for i in range(30):  # ~10 bytes a line: rotates at least twice
        w.write_lines([json.dumps({"i": i}) + "\n"])
    w.close()
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert os.path.getsize(path) <= 100 and os.path.exists(path + ".1")
    seen = [json.loads(ln)["i"] for p in (path + ".1", path) for ln in open(p)]
    assert seen == sorted(seen) and seen[-1] == 29 and seen[0] > 0  # the oldest file went


# --- `policy-agent flows` -------------------------------------------------------------------


def _rec(t: str, verdict: str, src: str | None, dst: str | None, **kw) -> dict:
    r = {"time": t, "verdict": verdict, "direction": "ingress", "protocol": "tcp", "src_ip": "10.233.0.9",
         "src_port": 1, "src_pod": src, "dst_ip": "10.233.0.1", "dst_port": 80, "dst_pod": dst,
         "policy": None, "rule": "no policy allowed it",
         "decided_by": {"kind": "no-policy-allowed", "isolating_policies": ["x/web"]}, "iface": None}
    r.update(kw)
    return r


def _args(path: str, **kw) -> argparse.Namespace:
    base = dict(follow=False, namespace=None, pod=None, verdict=None, since=None, output="text", file=path,
                netns="")
    base.update(kw)
    return argparse.Namespace(**base)


def test_flows_command_filters_and_formats(tmp_path):
    path = str(tmp_path / "flows.jsonl")
    now = time.time()
    old = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now - 7200))
    new = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now - 5))
    with open(path + ".1", "w") as f:
        f.write(json.dumps(_rec(old, "deny", "z/b", "x/a")) + "\n")
    with open(path, "w") as f:
        f.write(json.dumps(_rec(new, "allow", "y/a", "x/a", decided_by={"kind": "networkpolicy"},
                                policy="x/web", rule="ingress rule 0")) + "\n")
        f.write(json.dumps(_rec(new, "deny", None, "x/b")) + "\n")
        f.write('{"time": "partial')  # being written: not shown, not an error
    run = lambda **kw: (flows_cmd.run(_args(path, **kw), out := io.StringIO(), err := io.StringIO()),  # noqa: E731
                        out.getvalue().splitlines(), err.getvalue())
    rc, lines, err = run()
    assert rc == 0 and len(lines) == 3 and err == ""
    assert lines[0].endswith("z/b -> x/a:80  no policy allowed it (isolated by x/web)")
    assert "allow ingress tcp  y/a -> x/a:80  networkpolicy x/web ingress rule 0" in lines[1]
    assert "10.233.0.9 -> x/b:80" in lines[2]
    assert len(run(verdict="deny")[1]) == 2
    assert len(run(since="1h")[1]) == 2
    assert len(run(namespace="z")[1]) == 1
    assert len(run(pod="x/a")[1]) == 2 and len(run(namespace="x", pod="b")[1]) == 1
    rc, lines, _ = run(output="json", verdict="allow")
    assert json.loads(lines[0])["policy"] == "x/web"
    assert run(pod="a")[0] == 2 and run(since="yesterday")[0] == 2
    assert flows_cmd.run(_args(str(tmp_path / "none")), io.StringIO(), io.StringIO()) == 1


def test_flows_follow_sees_new_lines_across_a_rotation(tmp_path):
    path = str(tmp_path / "flows.jsonl")
    w = flowlog.RotatingWriter(path, max_bytes=400)
    out = io.StringIO()
    t = threading.Thread(target=flows_cmd.run, args=(_args(path, follow=True, output="json"), out, io.StringIO()),
                         kwargs={"stop_after": 3.0})
    t.start()
    for i in range(8):  # ~300 bytes a line: every second line rotates
        w.write_lines([json.dumps(_rec("2030-01-01T00:00:00.000Z", "deny", f"x/p{i}", "y/q", pad="." * 100)) + "\n"])
        time.sleep(0.3)
    t.join()
    w.close()
    got = [json.loads(ln)["src_pod"] for ln in out.getvalue().splitlines()]
    assert got == [f"x/p{i}" for i in range(8)]


def test_a_pod_added_since_the_last_index_is_resolved_at_once():
    state = compile(snapshot(), NodeConfig("n1", flow_log=FlowLogOptions()))
    pods = list(snapshot().pods.values())
    gen, now = [1], [100.0]
    r = flowlog.Resolver(lambda: (gen[0], state), lambda: list(pods), clock=lambda: now[0])
    r.refresh(force=True)
    new = dataclasses.replace(pods[0], name="new", ips=(pods[0].ips[0].__class__("10.233.0.77"),))
    pods.append(new)
    now[0] += 0.05
    prefix = next(iter(flow_origins(state)))
    pkt = flowlog.Packet(prefix, 4, "tcp", "10.233.0.77", "10.233.0.1", 1, 80)
    assert flowlog.flow_record(pkt, r, 0.0, lambda i: None)["src_pod"] is None  # the agent did not change yet
    gen[0] += 1
    now[0] += 0.06  # within the 1 s re-index period, past the 0.1 s miss period
    assert flowlog.flow_record(pkt, r, 0.0, lambda i: None)["src_pod"] == "x/new"
