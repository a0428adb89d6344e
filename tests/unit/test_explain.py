"""policy_agent.explain on hand-built DesiredStates: iptables walk semantics and traces."""

from __future__ import annotations

import ipaddress

import pytest

from policy_agent.desired import (
    ACCEPT,
    DROP,
    RETURN,
    Action,
    Chain,
    DesiredState,
    Hook,
    IPSet,
    LocalEndpoint,
    Match,
    Rule,
)
from policy_agent.explain import ExplainError, HookPath, Packet, explain, explain_state_flow
from policy_agent.model import ClusterSnapshot, Pod
from policy_agent.model.types import Labels

ACC = 0x10000


def state(chains: list[Chain], ipsets: list[IPSet] = (), hooks=None, family: int = 4, endpoints=()) -> DesiredState:
    if hooks is None:
        hooks = (
            Hook("filter", "FORWARD", "pa-FORWARD"),
            Hook("filter", "INPUT", "pa-INPUT"),
            Hook("filter", "OUTPUT", "pa-OUTPUT"),
        )
    return DesiredState(
        chains={(family, "filter"): {c.name: c for c in chains}},
        hooks=tuple(hooks),
        ipsets={s.name: s for s in ipsets},
        endpoints=tuple(endpoints),
    )


def pkt(src="10.233.0.1", dst="10.233.0.2", proto="tcp", port=80, ct="NEW", family=4) -> Packet:
    return Packet(family, src, dst, proto, port, ct)


FWD = HookPath("FORWARD", "eni1", "eni2")


def test_no_hooks_falls_through_to_builtin():
    e = explain(DesiredState(), pkt(), FWD)
    assert e.verdict == "ACCEPT" and e.decided_by is None and e.trace == ()
    assert "built-in chain" in e.summary()


def test_accept_drop_and_trace_numbers():
    c = Chain("pa-FORWARD", (Rule(Match(protocol="udp"), ACCEPT, "udp"), Rule(Match(), DROP, "deny the rest")))
    e = explain(state([c]), pkt(), FWD)
    assert e.verdict == "DROP" and not e.allowed
    assert [(s.chain, s.number, s.action) for s in e.trace] == [("FORWARD", 1, "JUMP"), ("pa-FORWARD", 2, "DROP")]
    assert e.decided_by.comment == "deny the rest"
    assert "Dropped by pa-FORWARD rule 2 (deny the rest)" in e.summary()
    e = explain(state([c]), pkt(proto="udp"), FWD)
    assert e.verdict == "ACCEPT" and e.decided_by.number == 1


def test_reject_verdict():
    c = Chain("pa-FORWARD", (Rule(Match(), Action("REJECT"), "no"),))
    e = explain(state([c]), pkt(), FWD)
    assert e.verdict == "REJECT" and "Rejected by" in e.summary()


def test_jump_return_and_goto_semantics():
    # top JUMPs a, a GOTOs b, b RETURNs: control comes back to top (the goto-er's caller)
    top = Chain(
        "pa-FORWARD",
        (
            Rule(Match(), Action("JUMP", "a")),
            Rule(Match(mark=(0x1, 0x1)), ACCEPT, "a set mark 1"),
            Rule(Match(), DROP, "mark 1 missing"),
        ),
    )
    a = Chain(
        "a", (Rule(Match(), Action("GOTO", "b")), Rule(Match(), Action("MARK", mark=(0x2, 0x2)), "never after goto"))
    )
    b = Chain(
        "b",
        (
            Rule(Match(), Action("MARK", mark=(0x1, 0x1)), "set 1"),
            Rule(Match(), RETURN),
            Rule(Match(), DROP, "unreached"),
        ),
    )
    e = explain(state([top, a, b]), pkt(), FWD)
    assert e.verdict == "ACCEPT"
    assert [(s.chain, s.number) for s in e.trace] == [
        ("FORWARD", 1),
        ("pa-FORWARD", 1),
        ("a", 1),
        ("b", 1),
        ("b", 2),
        ("pa-FORWARD", 2),
    ]
    assert e.trace[-1].mark == 0x1


def test_end_of_chain_is_return():
    top = Chain("pa-FORWARD", (Rule(Match(), Action("JUMP", "empty")), Rule(Match(), DROP, "after")))
    e = explain(state([top, Chain("empty")]), pkt(), FWD)
    assert e.verdict == "DROP" and e.decided_by.chain == "pa-FORWARD"


def test_mark_set_xmark_semantics():
    c = Chain(
        "pa-FORWARD",
        (
            Rule(Match(), Action("MARK", mark=(0x30000, 0x30000)), "set both"),
            Rule(Match(), Action("MARK", mark=(0, 0x10000)), "clear accept"),
            Rule(Match(mark=(0x20000, 0x30000)), ACCEPT, "only scratch set"),
        ),
    )
    p = Packet(4, "10.233.0.1", "10.233.0.2", "tcp", 80, "NEW", mark=0x80)
    e = explain(state([c]), p, FWD)
    assert e.verdict == "ACCEPT"
    assert [s.mark for s in e.trace[1:]] == [0x30080, 0x20080, 0x20080]  # foreign bit 0x80 untouched
    assert [s.grants for s in e.trace[1:]] == [True, False, False]


def test_interfaces_exact_wildcard_and_missing():
    c = Chain(
        "pa-FORWARD",
        (
            Rule(Match(in_iface="eni+", out_iface="eth0"), DROP, "to uplink"),
            Rule(Match(in_iface="eni1"), Action("MARK", mark=(1, 1)), "exact in"),
            Rule(Match(out_iface="cali+"), DROP, "other prefix"),
            Rule(Match(in_iface="eni"), DROP, "exact name eni is not a wildcard"),
            Rule(Match(), ACCEPT, "rest"),
        ),
    )
    e = explain(state([c]), pkt(), FWD)
    assert e.verdict == "ACCEPT" and [s.number for s in e.trace[1:]] == [2, 5]
    assert explain(state([c]), pkt(), HookPath("FORWARD", "eni9", "eth0")).decided_by.comment == "to uplink"
    # INPUT has no out interface: -o rules never match there
    c2 = Chain("pa-INPUT", (Rule(Match(out_iface="eni+"), DROP, "x"),))
    assert explain(state([c2]), pkt(), HookPath("INPUT", "eni1")).verdict == "ACCEPT"


def test_nets_negation_proto_ports_ctstate():
    c = Chain(
        "pa-FORWARD",
        (
            Rule(Match(ctstate=("RELATED", "ESTABLISHED")), ACCEPT, "established"),
            Rule(Match(src_net="10.233.0.1/32", src_net_negate=True), DROP, "spoof"),
            Rule(Match(dst_net="10.233.1.0/24"), DROP, "dst net"),
            Rule(Match(protocol="tcp", dst_ports=((80, 80), (8000, 8100))), ACCEPT, "web ports"),
            Rule(Match(), DROP, "rest"),
        ),
    )
    s = state([c])
    assert explain(s, pkt(ct="ESTABLISHED", src="10.233.9.9"), FWD).decided_by.comment == "established"
    assert explain(s, pkt(src="10.233.0.9"), FWD).decided_by.comment == "spoof"
    assert explain(s, pkt(dst="10.233.1.5"), FWD).decided_by.comment == "dst net"
    assert explain(s, pkt(port=8100), FWD).decided_by.comment == "web ports"
    assert explain(s, pkt(port=8000), FWD).decided_by.comment == "web ports"
    assert explain(s, pkt(port=8101), FWD).decided_by.comment == "rest"
    assert explain(s, pkt(proto="udp", port=80), FWD).decided_by.comment == "rest"
    assert explain(s, pkt(proto="icmp", port=None), FWD).decided_by.comment == "rest"


def test_hash_net_set_with_nomatch_and_negation():
    block = IPSet("pa4b-x", 4, "hash:net", frozenset({"10.0.0.0/8", "10.1.0.0/16 nomatch", "10.1.2.0/24"}))
    c = Chain(
        "pa-FORWARD",
        (
            Rule(Match(src_set="pa4b-x"), ACCEPT, "in block"),
            Rule(Match(dst_set="pa4b-x", dst_set_negate=True), DROP, "dst outside"),
            Rule(Match(), Action("REJECT"), "rest"),
        ),
    )
    s = state([c], [block])
    assert explain(s, pkt(src="10.9.0.1"), FWD).decided_by.comment == "in block"
    assert explain(s, pkt(src="10.1.9.1", dst="11.0.0.2"), FWD).decided_by.comment == "dst outside"  # nomatch hole
    assert explain(s, pkt(src="10.1.2.3"), FWD).decided_by.comment == "in block"  # more specific than the hole
    assert explain(s, pkt(src="11.0.0.1", dst="10.1.3.3"), FWD).decided_by.comment == "dst outside"
    assert explain(s, pkt(src="11.0.0.1", dst="10.2.3.3"), FWD).decided_by.comment == "rest"


def test_hash_ip_port_set():
    named = IPSet(
        "pa4n-x", 4, "hash:ip,port", frozenset({"10.233.0.2,tcp:8080", "10.233.0.3,udp:53", "10.233.0.4,9000-9010"})
    )
    c = Chain("pa-FORWARD", (Rule(Match(dst_ipport_set="pa4n-x"), ACCEPT, "named"), Rule(Match(), DROP, "rest")))
    s = state([c], [named])
    assert explain(s, pkt(dst="10.233.0.2", port=8080), FWD).allowed
    assert not explain(s, pkt(dst="10.233.0.2", port=8081), FWD).allowed
    assert not explain(s, pkt(dst="10.233.0.2", proto="udp", port=8080), FWD).allowed
    assert explain(s, pkt(dst="10.233.0.3", proto="udp", port=53), FWD).allowed
    assert explain(s, pkt(dst="10.233.0.4", port=9005), FWD).allowed  # no proto = tcp
    assert not explain(s, pkt(dst="10.233.0.4", port=9011), FWD).allowed


def test_hash_net_iface_set_matches_source_and_incoming_interface():
    eps = IPSet(
        "pa4e-x", 4, "hash:net,iface",
        frozenset({"10.233.0.1/32,eni1", "10.233.0.5/32,eni1", "10.233.7.0/24,eni3", "10.233.7.9/32,eni3 nomatch"}),
    )
    c = Chain(
        "pa-FORWARD",
        (
            Rule(Match(in_iface="eni+", src_iface_set="pa4e-x", src_iface_set_negate=True), DROP, "anti-spoofing"),
            Rule(Match(src_iface_set="pa4e-x"), ACCEPT, "own address"),
            Rule(Match(), Action("REJECT"), "rest"),
        ),
    )
    s = state([c], [eps])
    assert explain(s, pkt(src="10.233.0.1"), FWD).decided_by.comment == "own address"
    assert explain(s, pkt(src="10.233.0.5"), FWD).decided_by.comment == "own address"
    assert explain(s, pkt(src="10.233.0.2"), FWD).decided_by.comment == "anti-spoofing"
    # the address of one interface arriving on another is not in the set
    assert explain(s, pkt(src="10.233.0.1"), HookPath("FORWARD", "eni3", "eth0")).decided_by.comment == "anti-spoofing"
    assert explain(s, pkt(src="10.233.7.8"), HookPath("FORWARD", "eni3", "eth0")).allowed  # net entry
    assert explain(s, pkt(src="10.233.7.9"), HookPath("FORWARD", "eni3", "eth0")).decided_by.comment == "anti-spoofing"
    # no incoming interface (OUTPUT-like path): never in the set; the negated rule needs -i anyway
    assert explain(s, pkt(src="10.233.0.1"), HookPath("FORWARD", None, "eni2")).decided_by.comment == "rest"
    assert "--match-set pa4e-x src,src" in c.rules[0].body() and "! --match-set" in c.rules[0].body()
    bad = IPSet("pa4e-y", 4, "hash:net,iface", frozenset({"10.233.0.1/32"}))
    c2 = Chain("pa-FORWARD", (Rule(Match(src_iface_set="pa4e-y"), ACCEPT, "x"),))
    with pytest.raises(ExplainError, match="NET,IFACE"):
        explain(state([c2], [bad]), pkt(), FWD)


def test_icmp_type_rules_match_only_that_type():
    c = Chain(
        "pa-INPUT",
        (
            Rule(Match(protocol="ipv6-icmp", icmp_type=135), ACCEPT, "NS"),
            Rule(Match(protocol="ipv6-icmp", icmp_type=136), ACCEPT, "NA"),
            Rule(Match(protocol="ipv6-icmp"), DROP, "other icmpv6"),
            Rule(Match(), DROP, "rest"),
        ),
    )
    s = state([c], family=6)
    path = HookPath("INPUT", "eni1")

    def icmp6(t):
        return Packet(6, "fe80::2", "ff02::1:ff00:1", "ipv6-icmp", None, icmp_type=t)

    assert explain(s, icmp6(135), path).decided_by.comment == "NS"
    assert explain(s, icmp6(136), path).decided_by.comment == "NA"
    assert explain(s, icmp6(134), path).decided_by.comment == "other icmpv6"
    # a rule with a type never matches a packet without one
    assert explain(s, icmp6(None), path).decided_by.comment == "other icmpv6"
    # and a typed rule needs the protocol too
    assert explain(s, Packet(6, "fe80::2", "ff02::1", "tcp", 135), path).decided_by.comment == "rest"
    with pytest.raises(ExplainError, match="icmp_type"):
        Packet(4, "10.0.0.1", "10.0.0.2", "tcp", 80, icmp_type=8)
    v4 = Chain("pa-INPUT", (Rule(Match(protocol="icmp", icmp_type=8), ACCEPT, "echo"), Rule(Match(), DROP, "rest")))
    assert explain(state([v4]), Packet(4, "10.0.0.1", "10.0.0.2", "icmp", None, icmp_type=8), path).allowed
    assert not explain(state([v4]), Packet(4, "10.0.0.1", "10.0.0.2", "icmp", None, icmp_type=0), path).allowed


def test_compiled_state_anti_spoofing_and_established_flows():
    """Against the compiler's output: forged sources die first, even for established flows."""
    from policy_agent.compiler import compile
    from policy_agent.compiler.options import NodeConfig
    from policy_agent.shared.naming import veth_name

    a = Pod("default", "a", Labels({}), "n1", (ipaddress.ip_address("10.233.0.1"),), phase="Running")
    b = Pod("default", "b", Labels({}), "n1", (ipaddress.ip_address("10.233.0.2"),), phase="Running")
    st = compile(ClusterSnapshot.of([a, b]), NodeConfig(node_name="n1"))
    ia, ib = veth_name("eni", "default", "a"), veth_name("eni", "default", "b")
    path = HookPath("FORWARD", ia, ib)
    ok = explain(st, pkt("10.233.0.1", "10.233.0.2", ct="ESTABLISHED"), path)
    assert ok.allowed and ok.decided_by.chain == "pa-FORWARD" and \
        ok.decided_by.comment.startswith("established or related flow")
    forged = explain(st, pkt("10.233.0.2", "10.233.0.2", ct="ESTABLISHED"), path)
    assert forged.verdict == "DROP" and forged.decided_by.comment.startswith("anti-spoofing")
    assert explain(st, pkt("10.233.0.1", "10.233.0.2"), path).allowed
    nd = Packet(6, "fe80::2", "ff02::1:ff00:1", "ipv6-icmp", None, icmp_type=135)
    assert explain(st, nd, HookPath("INPUT", ia)).decided_by.comment == "ICMPv6 neighbour solicitation to the node"
    ra = Packet(6, "fe80::2", "ff02::1", "ipv6-icmp", None, icmp_type=134)
    assert explain(st, ra, HookPath("INPUT", ia)).decided_by.comment.startswith("anti-spoofing")


def test_ipv6_sets_and_family_table():
    v6 = IPSet("pa6s-x", 6, "hash:net", frozenset({"fd00:233::5/128"}))
    c = Chain("pa-FORWARD", (Rule(Match(src_set="pa6s-x"), ACCEPT, "v6 peer"), Rule(Match(), DROP, "rest")))
    s = state([c], [v6], family=6)
    assert explain(s, pkt(src="fd00:233::5", dst="fd00:233::6", family=6), FWD).allowed
    assert not explain(s, pkt(src="fd00:233::7", dst="fd00:233::6", family=6), FWD).allowed
    # no v4 chains in this state: v4 packets see no hook targets -> error
    with pytest.raises(ExplainError, match="pa-FORWARD"):
        explain(s, pkt(), FWD)


def test_addrtype_local():
    c = Chain("pa-OUTPUT", (Rule(Match(src_addrtype_local=True), ACCEPT, "from node"), Rule(Match(), DROP, "rest")))
    s = state([c])
    path = HookPath("OUTPUT", out_iface="eni2")
    assert explain(s, pkt(src="10.233.255.1"), path, node_ips=["10.233.255.1"]).allowed
    assert not explain(s, pkt(src="10.233.255.1"), path).allowed


def test_hook_order_last_rendered_runs_first():
    hooks = (Hook("filter", "FORWARD", "pa-a"), Hook("filter", "FORWARD", "pa-b"))
    a = Chain("pa-a", (Rule(Match(), DROP, "a"),))
    b = Chain("pa-b", (Rule(Match(), Action("MARK", mark=(1, 1)), "b"),))
    e = explain(state([a, b], hooks=hooks), pkt(), FWD)
    assert [s.chain for s in e.trace] == ["FORWARD", "pa-b", "FORWARD", "pa-a"]
    assert e.verdict == "DROP"


def test_broken_states_raise():
    with pytest.raises(ExplainError, match="missing"):
        explain(state([Chain("pa-FORWARD", (Rule(Match(), Action("JUMP", "missing")),))]), pkt(), FWD)
    with pytest.raises(ExplainError, match="ipset"):
        explain(state([Chain("pa-FORWARD", (Rule(Match(src_set="nope"), ACCEPT),))]), pkt(), FWD)
    loop = Chain("pa-FORWARD", (Rule(Match(), Action("JUMP", "pa-FORWARD")),))
    with pytest.raises(ExplainError, match="loop"):
        explain(state([loop]), pkt(), FWD)
    with pytest.raises(ExplainError):
        Packet(4, "fd00::1", "10.0.0.1")
    with pytest.raises(ExplainError):
        HookPath("PREROUTING")


# --- explain_state_flow: hook paths from where the pods live ---------------------------


def _flow_state():
    """Every path records where it came in, via a per-path DROP with a comment."""
    chains = [
        Chain(
            "pa-FORWARD",
            (
                Rule(Match(in_iface="eni+"), Action("JUMP", "pa-fw")),
                Rule(Match(out_iface="eni+"), Action("JUMP", "pa-tw")),
            ),
        ),
        Chain(
            "pa-fw",
            (
                Rule(Match(protocol="udp"), DROP, "egress denies udp"),
                Rule(Match(), Action("MARK", mark=(ACC, ACC)), "a/one egress rule 0"),
            ),
        ),
        Chain(
            "pa-tw",
            (
                Rule(Match(dst_ports=((80, 80),), protocol="tcp"), ACCEPT, "b/two ingress rule 0"),
                Rule(Match(), DROP, "no ingress rule"),
            ),
        ),
        Chain("pa-INPUT", (Rule(Match(in_iface="eni+"), DROP, "pod to node denied"),)),
        Chain("pa-OUTPUT", (Rule(Match(out_iface="eni+"), RETURN, "node to pod"),)),
    ]
    eps = (
        LocalEndpoint("a", "one", "eni1", ("10.233.0.1",)),
        LocalEndpoint("b", "two", "eni2", ("10.233.0.2", "fd00:233::2")),
    )
    return state(chains, endpoints=eps)


def _snap():
    import ipaddress

    mk = lambda ns, n, *ips, node="n1": Pod(ns, n, Labels(), node, tuple(ipaddress.ip_address(i) for i in ips))  # noqa: E731
    return ClusterSnapshot.of(
        [
            mk("a", "one", "10.233.0.1"),
            mk("b", "two", "10.233.0.2", "fd00:233::2"),
            mk("c", "far", "10.233.9.9", node="n2"),
        ]
    )


def test_flow_paths():
    s, snap = _flow_state(), _snap()
    e = explain_state_flow(s, snap, "a/one", "b/two", "TCP", 80, node="n1")
    assert e.path == HookPath("FORWARD", "eni1", "eni2") and e.allowed
    assert e.src_name == "a/one" and e.dst_name == "b/two"
    summary = e.summary()
    assert summary.startswith(
        "TCP 10.233.0.1 -> 10.233.0.2:80 (a/one to b/two) is ALLOWED on node n1 (FORWARD, in eni1, out eni2)."
    )
    assert "b/two ingress rule 0" in summary and "a/one egress rule 0" in summary
    assert summary.count(". ") == 1  # two sentences
    e = explain_state_flow(s, snap, "a/one", "b/two", "TCP", 81)
    assert not e.allowed and "no ingress rule" in e.summary()
    e = explain_state_flow(s, snap, "c/far", "b/two", "TCP", 80)
    assert e.path == HookPath("FORWARD", "eth0", "eni2") and e.src_name == "c/far"
    e = explain_state_flow(s, snap, "a/one", "10.1.1.1", "UDP", 53)
    assert e.path == HookPath("FORWARD", "eni1", "eth0") and e.verdict == "DROP"
    e = explain_state_flow(s, snap, "10.233.0.1", "node", "TCP", 10250, node_ips=["10.233.255.1"])
    assert e.path == HookPath("INPUT", "eni1") and e.decided_by.comment == "pod to node denied"
    e = explain_state_flow(s, snap, "node", "b/two", "TCP", 8080, node_ips=["10.233.255.1"])
    assert e.path == HookPath("OUTPUT", None, "eni2") and e.allowed and e.decided_by is None
    assert e.packet.src == "10.233.255.1"
    text = e.render()
    assert "trace:" in text and "verdict: ACCEPT" in text


def test_flow_errors():
    s, snap = _flow_state(), _snap()
    with pytest.raises(ExplainError, match="is a local pod: this node does not see"):
        explain_state_flow(s, snap, "c/far", "10.1.1.1")
    with pytest.raises(ExplainError, match="not in the input"):
        explain_state_flow(s, snap, "a/nope", "b/two")
    with pytest.raises(ExplainError, match="share no address family"):
        explain_state_flow(s, snap, "a/one", "b/two", family=6)
    with pytest.raises(ExplainError, match="node_ips"):
        explain_state_flow(s, snap, "a/one", "node")
    with pytest.raises(ExplainError, match="neither"):
        explain_state_flow(s, snap, "a/one", "garbage")


# --- the CLI, end to end through compile ------------------------------------------------

CLUSTER = """\
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {app: a}}
  spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 8080, name: http}]}]}
  status: {phase: Running, podIPs: [{ip: 10.233.0.5}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: b, namespace: x, labels: {app: b}}
  spec: {nodeName: n1, containers: [{name: c}]}
  status: {phase: Running, podIPs: [{ip: 10.233.0.6}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: http}]}]
"""


def _cli(argv):
    from policy_agent.cli import main

    return main(["--log-level", "error"] + argv)


def test_cli_allowed_and_denied(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(CLUSTER)
    rc = _cli(["explain", "--node", "n1", "--from", "x/b", "--to", "x/a", "--port", "8080", str(f)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "is ALLOWED on node n1" in out and "x/allow-b ingress rule 0" in out and "verdict: ACCEPT" in out
    rc = _cli(["explain", "--node", "n1", "--from", "x/b", "--to", "x/a", "--port", "80", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1 and "is DENIED" in out and "verdict: DROP" in out
    assert "x/a: no ingress policy allowed the packet" in out
    # a's egress is open, b is not isolated for ingress
    rc = _cli(
        ["explain", "--node", "n1", "--from", "10.233.0.5", "--to", "x/b", "--protocol", "udp", "--port", "53", str(f)]
    )
    assert rc == 0 and "UDP 10.233.0.5 -> 10.233.0.6:53 (x/a to x/b)" in capsys.readouterr().out


def test_cli_bad_input(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(CLUSTER.replace("containerPort: 8080", "containerPort: 0"))
    rc = _cli(["explain", "--node", "n1", "--from", "x/b", "--to", "x/a", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and "Pod x/a: spec.containers[0].ports[0].containerPort" in err and str(f) in err
    # --keep-going: the bad pod is skipped, so x/a is unknown
    rc = _cli(["explain", "--keep-going", "--node", "n1", "--from", "x/b", "--to", "x/a", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and "containerPort" in err and "pod x/a is not in the input" in err
    rc = _cli(["explain", "--node", "n1", "--from", "x/b", "--to", "x/a", str(tmp_path / "missing.yaml")])
    assert rc == 2 and "cannot read" in capsys.readouterr().err
