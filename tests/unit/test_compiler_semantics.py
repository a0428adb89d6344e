"""Every NetworkPolicy corner, checked by walking packets through the compiled state."""

from __future__ import annotations

import pytest
from test_compiler_evaluator import (
    HOST_IFACE,
    NODE,
    Packet,
    allowed,
    external_to_pod,
    iface_of,
    make_ns,
    make_pod,
    make_policy,
    node_config,
    peer,
    pod_to_external,
    pod_to_pod,
    port,
    rule,
    sel,
    walk,
)

from policy_agent.compiler import compile
from policy_agent.desired import render_ipset_restore, render_iptables_save
from policy_agent.model.types import ClusterSnapshot
from policy_agent.shared import naming


def state_of(*objs, **node_kw):
    return compile(ClusterSnapshot.of(objs), node_config(**node_kw))


NS = [make_ns("default"), make_ns("x", team="a"), make_ns("y", team="b")]
WEB = make_pod("web", ips=("10.233.0.10", "fd00:233::10"), labels={"app": "web"}, ports=[(8080, "TCP", "http")])
DB = make_pod("db", ips=("10.233.0.11",), labels={"app": "db"})
X1 = make_pod("x1", ns="x", ips=("10.233.1.1",), labels={"app": "web"}, node="node-2")
Y1 = make_pod("y1", ns="y", ips=("10.233.2.1",), labels={"app": "web"}, node="node-2")
PODS = [WEB, DB, X1, Y1]


def flows_ok(state, src, dst, **kw):
    return allowed(pod_to_pod(state, src, dst, **kw))


def test_no_policy_means_open_both_ways():
    s = state_of(*NS, *PODS)
    assert flows_ok(s, X1, WEB)
    assert flows_ok(s, WEB, DB)
    assert allowed(pod_to_external(s, WEB, "8.8.8.8"))
    t = external_to_pod(s, "192.0.2.1", WEB)
    assert t.verdict == "ACCEPT"  # marked by the tw chain, accepted in pa-FORWARD


def test_empty_ingress_list_denies_all_ingress_but_not_egress():
    deny = make_policy("deny", pod_selector=sel({"app": "web"}), ingress=[])
    s = state_of(*NS, *PODS, deny)
    assert not flows_ok(s, X1, WEB)
    assert not flows_ok(s, DB, WEB)
    assert flows_ok(s, WEB, X1)  # egress not governed
    assert flows_ok(s, X1, DB)  # db not selected
    t = external_to_pod(s, "192.0.2.1", WEB)
    assert t.verdict == "DROP"
    assert "default/web: no ingress policy allowed the packet" in t.comments()


def test_empty_pod_selector_selects_every_pod_of_its_namespace_only():
    deny = make_policy("deny", ns="default", ingress=[])
    s = state_of(*NS, *PODS, deny, make_pod("x2", ns="x", ips=("10.233.1.2",)))
    assert not flows_ok(s, X1, WEB) and not flows_ok(s, X1, DB)
    x2 = make_pod("x2", ns="x", ips=("10.233.1.2",))
    assert flows_ok(s, WEB, x2)


def test_pod_selector_peer_is_limited_to_the_policy_namespace():
    pol = make_policy("p", pod_selector=sel({"app": "web"}), ingress=[rule([peer(pods=sel({"app": "db"}))])])
    xdb = make_pod("xdb", ns="x", ips=("10.233.1.5",), labels={"app": "db"}, node="node-2")
    s = state_of(*NS, *PODS, xdb, pol)
    assert flows_ok(s, DB, WEB)
    assert not flows_ok(s, xdb, WEB)


def test_namespace_selector_peer_and_empty_namespace_selector():
    by_team = make_policy("p", pod_selector=sel({"app": "web"}), ingress=[rule([peer(nss=sel({"team": "a"}))])])
    s = state_of(*NS, *PODS, by_team)
    assert flows_ok(s, X1, WEB)
    assert not flows_ok(s, Y1, WEB)
    assert not flows_ok(s, DB, WEB)  # default has no team label
    any_ns = make_policy("p", pod_selector=sel({"app": "web"}), ingress=[rule([peer(nss=sel())])])
    s = state_of(*NS, *PODS, any_ns)
    assert flows_ok(s, X1, WEB) and flows_ok(s, Y1, WEB) and flows_ok(s, DB, WEB)
    assert not allowed(external_to_pod(s, "192.0.2.1", WEB))  # pods only


def test_pod_and_namespace_selector_in_one_peer_is_an_and():
    pol = make_policy(
        "p", pod_selector=sel({"app": "web"}),
        ingress=[rule([peer(pods=sel({"app": "web"}), nss=sel({"team": "a"}))])],
    )
    x_db = make_pod("xdb", ns="x", ips=("10.233.1.5",), labels={"app": "db"}, node="node-2")
    s = state_of(*NS, *PODS, x_db, pol)
    assert flows_ok(s, X1, WEB)
    assert not flows_ok(s, x_db, WEB)  # right namespace, wrong pod
    assert not flows_ok(s, Y1, WEB)  # right pod labels, wrong namespace


def test_namespace_selector_uses_implicit_name_label_for_unknown_namespace():
    pol = make_policy(
        "p", pod_selector=sel({"app": "web"}),
        ingress=[rule([peer(nss=sel({"kubernetes.io/metadata.name": "ghost"}))])],
    )
    g = make_pod("g", ns="ghost", ips=("10.233.3.1",), node="node-2")
    s = state_of(*NS, *PODS, g, pol)
    assert flows_ok(s, g, WEB)
    assert not flows_ok(s, X1, WEB)


def test_ipblock_with_except_also_applies_to_pod_addresses():
    pol = make_policy(
        "p", pod_selector=sel({"app": "web"}),
        ingress=[rule([peer(cidr="10.233.0.0/16", excepts=["10.233.2.0/24"])])],
    )
    s = state_of(*NS, *PODS, pol)
    assert flows_ok(s, X1, WEB)  # 10.233.1.1: inside, and a pod
    assert not flows_ok(s, Y1, WEB)  # 10.233.2.1: in the except
    assert allowed(external_to_pod(s, "10.233.200.1", WEB))
    assert not allowed(external_to_pod(s, "192.0.2.1", WEB))
    sets = [x for x in s.ipsets.values() if x.name.startswith("pa4b-")]
    assert len(sets) == 1 and "10.233.2.0/24 nomatch" in sets[0].members


def test_egress_to_everything_but_private_ranges_with_slash_zero():
    pol = make_policy(
        "p", pod_selector=sel({"app": "web"}),
        egress=[rule([peer(cidr="0.0.0.0/0", excepts=["10.0.0.0/8", "192.168.0.0/16"])])], types=["Egress"],
    )
    s = state_of(*NS, *PODS, pol)
    assert allowed(pod_to_external(s, WEB, "8.8.8.8"))
    assert allowed(pod_to_external(s, WEB, "200.1.1.1"))
    assert not allowed(pod_to_external(s, WEB, "10.1.2.3"))
    assert not flows_ok(s, WEB, DB)
    b = next(x for x in s.ipsets.values() if x.name.startswith("pa4b-"))
    assert {"0.0.0.0/1", "128.0.0.0/1"} <= b.members  # hash:net cannot hold /0
    # the v4 ipBlock allows nothing in v6
    assert not allowed(pod_to_external(s, WEB, "2001:db8::1"))


def test_ipblock_without_except_is_a_plain_address_match():
    pol = make_policy("p", pod_selector=sel({"app": "web"}), ingress=[rule([peer(cidr="192.0.2.0/24")])])
    s = state_of(*NS, *PODS, pol)
    assert allowed(external_to_pod(s, "192.0.2.7", WEB))
    assert not allowed(external_to_pod(s, "198.51.100.7", WEB))
    assert not [n for n in s.ipsets if n.startswith("pa4b-")]


@pytest.mark.parametrize(
    "selector, ok",
    [
        (sel(env=("In", ["prod", "stage"])), {"p1", "p2"}),
        (sel(env=("NotIn", ["prod"])), {"p2", "p3"}),  # NotIn matches when the key is absent
        (sel(env=("Exists",)), {"p1", "p2"}),
        (sel(env=("DoesNotExist",)), {"p3"}),
        (sel({"app": "c"}, env=("Exists",)), {"p1"}),
    ],
)
def test_match_expressions(selector, ok):
    clients = {
        "p1": make_pod("p1", ips=("10.233.0.21",), labels={"env": "prod", "app": "c"}, node="node-2"),
        "p2": make_pod("p2", ips=("10.233.0.22",), labels={"env": "stage"}, node="node-2"),
        "p3": make_pod("p3", ips=("10.233.0.23",), labels={}, node="node-2"),
    }
    pol = make_policy("p", pod_selector=sel({"app": "web"}), ingress=[rule([peer(pods=selector)])])
    s = state_of(*NS, WEB, *clients.values(), pol)
    got = {name for name, c in clients.items() if flows_ok(s, c, WEB)}
    assert got == ok


def test_rule_without_peers_or_ports_allows_everything():
    pol = make_policy("p", pod_selector=sel({"app": "web"}), ingress=[rule()])
    s = state_of(*NS, *PODS, pol)
    assert allowed(external_to_pod(s, "192.0.2.1", WEB, proto="udp", dport=9))
    assert allowed(external_to_pod(s, "2001:db8::1", WEB, proto="sctp", dport=9))


def test_several_policies_add_up():
    p1 = make_policy("p1", pod_selector=sel({"app": "web"}), ingress=[rule([peer(pods=sel({"app": "db"}))])])
    p2 = make_policy("p2", pod_selector=sel({"app": "web"}), ingress=[rule([peer(nss=sel({"team": "a"}))])])
    s = state_of(*NS, *PODS, p1, p2)
    assert flows_ok(s, DB, WEB) and flows_ok(s, X1, WEB)
    assert not flows_ok(s, Y1, WEB)
    ep = next(e for e in s.endpoints if e.pod == "web")
    assert ep.ingress_policies == ("default/p1", "default/p2") and ep.ingress_isolated


def test_ports_numbers_ranges_protocols():
    pol = make_policy(
        "p", pod_selector=sel({"app": "web"}),
        ingress=[rule(ports=[port(80), port(1000, end=1010), port(53, "UDP"), port(None, "SCTP")])],
    )
    s = state_of(*NS, *PODS, pol)

    def ok(proto, dport):
        return allowed(external_to_pod(s, "192.0.2.1", WEB, proto=proto, dport=dport))

    assert ok("tcp", 80) and not ok("udp", 80) and not ok("tcp", 81)
    assert ok("tcp", 1000) and ok("tcp", 1010) and not ok("tcp", 1011) and not ok("tcp", 999)
    assert ok("udp", 53) and not ok("tcp", 53)
    assert ok("sctp", 1) and ok("sctp", 65535)
    assert not ok("icmp", 0)


def test_named_port_resolves_against_the_destination_pod():
    web2 = make_pod("web2", ips=("10.233.0.12",), labels={"app": "web"}, ports=[(9090, "TCP", "http")])
    udp = make_pod("dns", ips=("10.233.0.13",), labels={"app": "web"}, ports=[(8080, "UDP", "http")])
    pol = make_policy("p", pod_selector=sel({"app": "web"}), ingress=[rule(ports=[port("http")])])
    s = state_of(*NS, *PODS, web2, udp, pol)
    assert allowed(external_to_pod(s, "192.0.2.1", WEB, dport=8080))
    assert not allowed(external_to_pod(s, "192.0.2.1", WEB, dport=9090))
    assert allowed(external_to_pod(s, "192.0.2.1", web2, dport=9090))
    assert not allowed(external_to_pod(s, "192.0.2.1", web2, dport=8080))
    # protocol is part of the name lookup: the UDP "http" port is not a TCP one
    assert not allowed(external_to_pod(s, "192.0.2.1", udp, dport=8080))
    assert not allowed(external_to_pod(s, "192.0.2.1", udp, proto="udp", dport=8080))
    n = next(x for x in s.ipsets.values() if x.name.startswith("pa4n-"))
    assert n.type == "hash:ip,port" and "10.233.0.10,tcp:8080" in n.members
    assert "fd00:233::10,tcp:8080" in s.ipsets[n.name.replace("pa4n", "pa6n")].members
    assert allowed(external_to_pod(s, "2001:db8::1", WEB, dport=8080))


def test_egress_named_port_to_a_remote_pod_and_to_an_ipblock():
    remote = make_pod("api", ns="x", ips=("10.233.1.9",), labels={"app": "api"}, node="node-2",
                      ports=[(7000, "TCP", "grpc")])
    pol = make_policy(
        "p", pod_selector=sel({"app": "web"}), types=["Egress"],
        egress=[
            rule([peer(pods=sel({"app": "api"}), nss=sel())], [port("grpc")]),
            rule([peer(cidr="10.233.0.0/16")], [port("grpc")]),
        ],
    )
    s = state_of(*NS, *PODS, remote, pol)
    referenced = set().union(*(c.ipsets for t in s.chains.values() for c in t.values()))
    assert referenced == set(s.ipsets)  # no selector set besides the named-port set
    assert not [n for n in s.ipsets if n.startswith("pa4s-")]
    assert flows_ok(s, WEB, remote, dport=7000)
    assert not flows_ok(s, WEB, remote, dport=7001)
    assert not allowed(pod_to_external(s, WEB, "10.233.9.9", dport=7000))  # not a pod with that port


def test_dual_stack_pod_gets_rules_in_both_families():
    pol = make_policy(
        "p", pod_selector=sel({"app": "web"}),
        ingress=[rule([peer(cidr="2001:db8::/32"), peer(pods=sel({"app": "db"}))])],
    )
    db6 = make_pod("db6", ips=("10.233.0.30", "fd00:233::30"), labels={"app": "db"}, node="node-2")
    s = state_of(*NS, *PODS, db6, pol)
    assert allowed(external_to_pod(s, "2001:db8::5", WEB))
    assert not allowed(external_to_pod(s, "2001:db9::5", WEB))
    assert allowed(pod_to_pod(s, db6, WEB, family=6))
    assert allowed(pod_to_pod(s, db6, WEB, family=4))
    assert "pa-pi-default.p" in s.table(6) and "pa-pi-default.p" in s.table(4)
    v6 = render_iptables_save(s, 6)
    assert "-s 2001:db8::/32" in v6 and "2001:db8" not in render_iptables_save(s, 4)
    assert all(x.inet == "inet6" for x in s.ipsets.values() if x.name.startswith("pa6"))


def test_v4_only_pod_is_not_reachable_over_v6():
    s = state_of(*NS, *PODS)
    t = walk(s, "FORWARD", Packet("fd00:233::99", "fd00:233::11", in_iface=HOST_IFACE, out_iface=iface_of(DB)))
    assert t.verdict == "DROP" and t.comments()[-1] == "unknown interface"
    assert naming.to_workload_chain(iface_of(DB)) not in s.table(6)


def test_local_pod_to_local_pod_needs_source_egress_and_destination_ingress():
    eg = make_policy("eg", pod_selector=sel({"app": "db"}), egress=[rule([peer(pods=sel({"app": "web"}))])],
                     types=["Egress"])
    s = state_of(*NS, *PODS, eg)
    assert flows_ok(s, DB, WEB)
    ing = make_policy("ing", pod_selector=sel({"app": "web"}), ingress=[])
    s = state_of(*NS, *PODS, eg, ing)
    t = pod_to_pod(s, DB, WEB)
    assert t.verdict == "DROP"
    assert "default/eg egress rule 0 peer 0" in t.comments()  # egress allowed it first
    assert "default/web: no ingress policy allowed the packet" in t.comments()
    # and the other way: ingress allows, egress does not
    ing2 = make_policy("ing", pod_selector=sel({"app": "web"}), ingress=[rule()])
    eg2 = make_policy("eg", pod_selector=sel({"app": "db"}), egress=[], types=["Egress"])
    s = state_of(*NS, *PODS, eg2, ing2)
    assert not flows_ok(s, DB, WEB)


def test_anti_spoofing():
    s = state_of(*NS, *PODS)
    spoof = Packet("10.233.0.99", "10.233.1.1", in_iface=iface_of(WEB), out_iface=HOST_IFACE)
    t = walk(s, "FORWARD", spoof)
    assert t.verdict == "DROP" and t.comments()[-1].startswith("anti-spoofing")
    # even when the spoofed packet would look like an established flow: another local
    # pod's address (to a remote or to a local pod), or a remote address
    for src, out in (("10.233.0.11", HOST_IFACE), ("10.233.0.11", iface_of(DB)), ("10.233.1.1", iface_of(DB))):
        t = walk(s, "FORWARD", Packet(src, "10.233.0.11" if out != HOST_IFACE else "10.233.1.1",
                                      in_iface=iface_of(WEB), out_iface=out, ctstate="ESTABLISHED"))
        assert t.verdict == "DROP" and t.comments()[-1].startswith("anti-spoofing"), (src, out)
        t = walk(s, "INPUT", Packet(src, "10.0.0.1", in_iface=iface_of(WEB), ctstate="ESTABLISHED"))
        assert t.verdict == "DROP" and t.comments()[-1].startswith("anti-spoofing"), src
    # the genuine established packet passes, before any dispatch
    t = walk(s, "FORWARD", Packet("10.233.0.10", "10.233.0.11", in_iface=iface_of(WEB), out_iface=iface_of(DB),
                                  ctstate="ESTABLISHED"))
    assert t.verdict == "ACCEPT" and [c for c, _ in t.rules] == ["pa-FORWARD"]
    ok6 = Packet("fd00:233::10", "2001:db8::1", in_iface=iface_of(WEB), out_iface=HOST_IFACE)
    assert allowed(walk(s, "FORWARD", ok6))
    # pa-FORWARD: the established accept for packets from pods (rule 1) needs the
    # (source, interface) pair in the endpoints set; anti-spoofing drops every other
    # packet from a pod next, ahead of any other verdict
    own = naming.ipset_name(4, "e", "local-endpoints")
    first, second = s.table(4)[naming.CHAIN_FORWARD].rules[:2]
    assert first.match.in_iface == "eni+" and first.match.ctstate == ("RELATED", "ESTABLISHED")
    assert first.match.src_iface_set == own and not first.match.src_iface_set_negate
    assert first.action.verb == "ACCEPT"
    assert second.match.src_iface_set == own and second.match.src_iface_set_negate
    assert second.action.verb == "DROP" and second.match.in_iface == "eni+"


def test_local_endpoints_set_pairs_each_address_with_its_interface():
    s = compile(ClusterSnapshot.of([*NS, *PODS]), node_config(ipv6=True))
    v4 = s.ipsets[naming.ipset_name(4, "e", "local-endpoints")]
    v6 = s.ipsets[naming.ipset_name(6, "e", "local-endpoints")]
    assert v4.type == v6.type == "hash:net,iface"
    assert v4.members == {f"10.233.0.10/32,{iface_of(WEB)}", f"10.233.0.11/32,{iface_of(DB)}"}
    assert v6.members == {f"fd00:233::10/128,{iface_of(WEB)}"}  # DB has no IPv6 address
    # DB's IPv6 traffic: no entry, so dropped by anti-spoofing
    t = walk(s, "FORWARD", Packet("fd00:233::11", "2001:db8::1", in_iface=iface_of(DB), out_iface=HOST_IFACE))
    assert t.verdict == "DROP" and t.comments()[-1].startswith("anti-spoofing")
    # a node without pods still has (empty) sets: the static chains reference them
    empty = compile(ClusterSnapshot.of(NS), node_config(ipv6=True))
    assert empty.ipsets[v4.name].members == frozenset() and empty.ipsets[v6.name].members == frozenset()


def test_anti_spoofing_with_several_addresses_uses_an_endpoint_set():
    multi = make_pod("m", ips=("10.233.0.40", "10.233.0.41"))
    s = state_of(*NS, multi)
    for src in ("10.233.0.40", "10.233.0.41"):
        assert allowed(walk(s, "FORWARD", Packet(src, "1.1.1.1", in_iface=iface_of(multi), out_iface=HOST_IFACE)))
    assert not allowed(walk(s, "FORWARD", Packet("10.233.0.42", "1.1.1.1", in_iface=iface_of(multi),
                                                  out_iface=HOST_IFACE)))
    ep_set = s.ipsets[naming.ipset_name(4, "e", "local-endpoints")]
    assert ep_set.members == {f"10.233.0.40/32,{iface_of(multi)}", f"10.233.0.41/32,{iface_of(multi)}"}
    # one pod's address from another pod's interface is still forged
    other = make_pod("o", ips=("10.233.0.43",))
    s = state_of(*NS, multi, other)
    t = walk(s, "FORWARD", Packet("10.233.0.40", "1.1.1.1", in_iface=iface_of(other), out_iface=HOST_IFACE))
    assert t.verdict == "DROP" and t.comments()[-1].startswith("anti-spoofing")


def test_unknown_interface_with_our_prefix_is_dropped_and_others_untouched():
    s = state_of(*NS, *PODS)
    for p in (
        Packet("10.233.1.1", "10.233.9.9", in_iface=HOST_IFACE, out_iface="enifffffffffff"),
        Packet("10.233.1.1", "10.233.9.9", in_iface=HOST_IFACE, out_iface="enifffffffffff", ctstate="INVALID"),
    ):
        t = walk(s, "FORWARD", p)
        assert t.verdict == "DROP" and t.comments()[-1] in ("unknown interface", "invalid conntrack state")
    # from an unknown interface, even with a known pod's address or as an established flow:
    # it has no entry in the local-endpoints set, so anti-spoofing drops it (fail closed)
    for src, ct in (("10.233.9.9", "NEW"), ("10.233.0.10", "NEW"), ("10.233.0.10", "ESTABLISHED")):
        p = Packet(src, "10.233.1.1", in_iface="eni0123456789a", out_iface=HOST_IFACE, ctstate=ct)
        t = walk(s, "FORWARD", p)
        assert t.verdict == "DROP" and t.comments()[-1].startswith("anti-spoofing"), (src, ct)
    assert walk(s, "FORWARD", Packet("10.1.1.1", "10.2.2.2", in_iface="eth1", out_iface=HOST_IFACE)).verdict \
        == "CONTINUE"
    t = walk(s, "INPUT", Packet("10.233.9.9", "10.0.0.1", in_iface="eni0123456789a"))
    assert t.verdict == "DROP"


def test_node_to_own_pods_is_allowed_and_pod_to_node_passes_egress():
    deny_all = make_policy("deny", ingress=[], egress=[], types=["Ingress", "Egress"])
    s = state_of(*NS, *PODS, deny_all)
    probe = Packet("10.0.0.1", "10.233.0.10", out_iface=iface_of(WEB))
    assert allowed(walk(s, "OUTPUT", probe))
    reply = Packet("10.233.0.10", "10.0.0.1", in_iface=iface_of(WEB), ctstate="ESTABLISHED")
    assert allowed(walk(s, "INPUT", reply))
    new_to_host = Packet("10.233.0.10", "10.0.0.1", in_iface=iface_of(WEB))
    assert walk(s, "INPUT", new_to_host).verdict == "DROP"  # egress deny applies to the node too
    s = state_of(*NS, *PODS)
    # endpoint_to_host_action RETURN (default): the host's own INPUT rules decide
    assert walk(s, "INPUT", new_to_host).verdict == "CONTINUE"
    assert walk(s, "INPUT", reply).verdict == "CONTINUE"  # established flows too
    s = state_of(*NS, *PODS, endpoint_to_host_action="ACCEPT")
    assert walk(s, "INPUT", new_to_host).verdict == "ACCEPT"
    s = state_of(*NS, *PODS, endpoint_to_host_action="DROP")
    assert walk(s, "INPUT", new_to_host).verdict == "DROP"
    assert allowed(walk(s, "INPUT", reply))


def test_ipv6_neighbour_discovery_to_the_node_survives_egress_deny():
    deny_all = make_policy("deny", egress=[], types=["Egress"])
    s = state_of(*NS, *PODS, deny_all)
    for icmp_type in (130, 131, 132, 133, 135, 136):
        ns_msg = Packet("fe80::1", "ff02::1:ff00:1", proto="ipv6-icmp", in_iface=iface_of(WEB), icmp_type=icmp_type)
        assert allowed(walk(s, "INPUT", ns_msg)), icmp_type
    # other ICMPv6 from a link-local source (router advertisement, echo) is not the pod's address
    for icmp_type in (128, 134, 137, None):
        msg = Packet("fe80::1", "ff02::1", proto="ipv6-icmp", in_iface=iface_of(WEB), icmp_type=icmp_type)
        t = walk(s, "INPUT", msg)
        assert t.verdict == "DROP" and t.comments()[-1].startswith("anti-spoofing"), icmp_type


def test_conntrack_established_accepted_invalid_dropped():
    deny = make_policy("deny", ingress=[])
    s = state_of(*NS, *PODS, deny)
    assert allowed(external_to_pod(s, "192.0.2.1", WEB, ctstate="ESTABLISHED"))
    assert allowed(external_to_pod(s, "192.0.2.1", WEB, ctstate="RELATED"))
    assert not allowed(external_to_pod(s, "192.0.2.1", WEB, ctstate="INVALID"))
    s = state_of(*NS, *PODS)
    assert not allowed(external_to_pod(s, "192.0.2.1", WEB, ctstate="INVALID"))
    # conntrack is decided in pa-FORWARD, before dispatch; the endpoint chains see only new flows
    t = external_to_pod(s, "192.0.2.1", WEB, ctstate="ESTABLISHED")
    assert [c for c, _ in t.rules] == ["pa-FORWARD"] and t.comments() == ["established or related flow"]
    t = pod_to_external(s, WEB, "192.0.2.1", ctstate="RELATED")
    assert t.verdict == "ACCEPT" and {c for c, _ in t.rules} == {"pa-FORWARD"}
    t = pod_to_external(s, WEB, "192.0.2.1", ctstate="INVALID")
    assert t.verdict == "DROP" and t.comments()[-1] == "invalid conntrack state"
    for chain in (naming.to_workload_chain(iface_of(WEB)), naming.from_workload_chain(iface_of(WEB))):
        assert not any(r.match.ctstate for r in s.table(4)[chain].rules)
    # traffic not touching a pod interface is left to the host's own FORWARD rules
    other = walk(s, "FORWARD", Packet("10.1.1.1", "10.2.2.2", in_iface="eth1", out_iface=HOST_IFACE,
                                      ctstate="ESTABLISHED"))
    assert other.verdict == "CONTINUE" and other.rules[-1][1].comment == "clear policy mark bits"


def test_egress_only_policy_leaves_ingress_open_and_types_decide():
    eg = make_policy("eg", pod_selector=sel({"app": "web"}), egress=[], types=["Egress"])
    s = state_of(*NS, *PODS, eg)
    assert allowed(external_to_pod(s, "192.0.2.1", WEB))
    assert not allowed(pod_to_external(s, WEB, "192.0.2.1"))
    # egress rules present but only Ingress in policyTypes: egress is not governed
    ing = make_policy("ing", pod_selector=sel({"app": "web"}), ingress=[rule()], egress=[], types=["Ingress"])
    s = state_of(*NS, *PODS, ing)
    assert allowed(pod_to_external(s, WEB, "192.0.2.1"))
    assert "pa-po-default.ing" not in s.table(4)


def test_only_policies_selecting_local_pods_and_their_sets_are_rendered():
    remote_only = make_policy("remote", ns="x", ingress=[rule([peer(pods=sel({"z": "1"}))])])
    local = make_policy("local", pod_selector=sel({"app": "web"}), ingress=[rule([peer(pods=sel({"app": "db"}))])])
    s = state_of(*NS, *PODS, remote_only, local)
    names = set(s.table(4))
    assert "pa-pi-default.local" in names
    assert not any(n.startswith("pa-pi-x.") for n in names)
    assert len([n for n in s.ipsets if n.startswith("pa4s-")]) == 1
    referenced = set().union(*(c.ipsets for t in s.chains.values() for c in t.values()))
    assert referenced == set(s.ipsets)


def test_selector_sets_are_shared_between_policies():
    p1 = make_policy("p1", pod_selector=sel({"app": "web"}), ingress=[rule([peer(pods=sel({"app": "db"}))])])
    p2 = make_policy("p2", pod_selector=sel({"app": "db"}), egress=[rule([peer(pods=sel({"app": "db"}))])],
                     types=["Egress"])
    s = state_of(*NS, *PODS, p1, p2)
    v4 = [n for n in s.ipsets if n.startswith("pa4s-")]
    assert len(v4) == 1
    assert s.ipsets[v4[0]].origin == "pods matching app=db in namespace default"
    assert s.ipsets[v4[0]].members == frozenset({"10.233.0.11/32"})


def test_every_rule_names_its_origin():
    pol = make_policy(
        "web-allow", pod_selector=sel({"app": "web"}),
        ingress=[rule([peer(pods=sel({"app": "db"})), peer(cidr="192.0.2.0/24")], [port(80), port(443)])],
    )
    s = state_of(*NS, *PODS, pol)
    comments = [r.comment for r in s.table(4)["pa-pi-default.web-allow"].rules]
    assert comments == [
        "default/web-allow ingress rule 0 peer 0 port 0",
        "default/web-allow ingress rule 0 peer 0 port 1",
        "default/web-allow ingress rule 0 peer 1 port 0",
        "default/web-allow ingress rule 0 peer 1 port 1",
    ]
    assert [r for t in s.chains.values() for c in t.values() for r in c.rules if not r.comment] == []
    disp = s.table(4)[naming.CHAIN_TO_WL_DISPATCH]
    assert {r.comment for r in disp.rules} == {"default/web", "default/db", "unknown interface"}


def test_output_is_deterministic_whatever_the_input_order():
    pol = make_policy("p", pod_selector=sel({"app": "web"}), ingress=[rule([peer(nss=sel({"team": "a"}))])])
    objs = [*NS, *PODS, pol]
    a = state_of(*objs)
    b = state_of(*reversed(objs))
    for f in (4, 6):
        assert render_iptables_save(a, f) == render_iptables_save(b, f)
    assert render_ipset_restore(a) == render_ipset_restore(b)
    assert a == b


def test_dispatch_is_a_one_level_tree_that_grows_sublinearly():
    pods = [make_pod(f"p{i}", ips=(f"10.233.{i // 200}.{i % 200 + 1}",)) for i in range(110)]
    s = state_of(*NS, *pods)
    t = s.table(4)
    root = t[naming.CHAIN_FROM_WL_DISPATCH]
    children = [n for n in t if n.startswith("pa-from-wl-dispatch-")]
    assert children and len(root.rules) <= 17
    for c in children:
        ch = t[c]
        assert all(r.action.verb == "GOTO" and r.action.target.startswith("pa-fw-") for r in ch.rules[:-1])
        assert ch.rules[-1].comment == "unknown interface"
        assert len(ch.rules) < 30
    assert root.rules[-1].comment == "unknown interface"
    for p in pods[:20]:  # every pod reaches its own chain
        tr = walk(s, "FORWARD", Packet(str(p.ips[0]), "1.1.1.1", in_iface=iface_of(p), out_iface=HOST_IFACE))
        assert tr.verdict == "ACCEPT"
        assert naming.from_workload_chain(iface_of(p)) in [c for c, _ in tr.rules]
        assert len(tr.rules) < 12


def test_pod_without_addresses_is_listed_but_fails_closed():
    pending = make_pod("pending", ips=())
    s = state_of(*NS, pending)
    assert [e.pod for e in s.endpoints] == ["pending"]
    t = walk(s, "FORWARD", Packet("10.233.0.50", "1.1.1.1", in_iface=iface_of(pending), out_iface=HOST_IFACE))
    assert t.verdict == "DROP"


def test_host_network_and_finished_pods_are_not_endpoints_nor_peers():
    hn = make_pod("hn", ips=("10.0.0.1",), labels={"app": "db"}, host_network=True)
    done = make_pod("done", ips=("10.233.0.60",), labels={"app": "db"}, phase="Succeeded")
    pol = make_policy("p", pod_selector=sel({"app": "web"}), ingress=[rule([peer(pods=sel({"app": "db"}))])])
    s = state_of(*NS, WEB, hn, done, pol)
    assert [e.pod for e in s.endpoints] == ["web"]
    (sset,) = [x for x in s.ipsets.values() if x.name.startswith("pa4s-")]
    assert sset.members == frozenset()


def test_custom_mark_mask_and_reject():
    deny = make_policy("deny", pod_selector=sel({"app": "web"}), ingress=[])
    s = state_of(*NS, *PODS, deny, mark_mask=0x00F00000, deny_action="REJECT")
    t = external_to_pod(s, "192.0.2.1", WEB)
    assert t.verdict == "REJECT"
    text = render_iptables_save(s, 4)
    assert "0x100000/0x100000" in text and "0x10000/" not in text
    assert allowed(external_to_pod(s, "192.0.2.1", DB))


def test_ipv4_only_node_renders_one_family():
    s = state_of(*NS, *PODS, ipv6=False)
    assert set(s.chains) == {(4, "filter")}
    assert not any(x.family == 6 for x in s.ipsets.values())


def test_skeleton_and_hooks_in_both_families_even_without_pods():
    s = state_of()
    for f in (4, 6):
        assert {naming.CHAIN_FORWARD, naming.CHAIN_INPUT, naming.CHAIN_OUTPUT, naming.CHAIN_WL_TO_HOST,
                naming.CHAIN_FROM_WL_DISPATCH, naming.CHAIN_TO_WL_DISPATCH} <= set(s.table(f))
    assert {(h.chain, h.target) for h in s.hooks} == {
        ("FORWARD", "pa-FORWARD"), ("INPUT", "pa-INPUT"), ("OUTPUT", "pa-OUTPUT")}
    # no pods: every pod-prefixed packet is dropped
    assert walk(s, "FORWARD", Packet("10.233.0.1", "1.1.1.1", in_iface="eni1", out_iface=HOST_IFACE)).verdict == "DROP"


def test_local_endpoints_describe_interface_addresses_and_policies():
    eg = make_policy("eg", pod_selector=sel({"app": "web"}), egress=[], types=["Egress"])
    s = state_of(*NS, *PODS, eg)
    (web,) = [e for e in s.endpoints if e.pod == "web"]
    assert web.interface == naming.veth_name("eni", "default", "web")
    assert web.ips == ("10.233.0.10", "fd00:233::10")
    assert web.egress_policies == ("default/eg",) and web.egress_isolated and not web.ingress_isolated
    assert {e.pod for e in s.endpoints} == {"web", "db"} and NODE


def test_iface_prefix_is_used_everywhere():
    s = state_of(*NS, *PODS, iface_prefix="cali")
    text = render_iptables_save(s, 4)
    assert "-i cali+" in text and "eni" not in text


def test_ipblock_slash0_with_except_covering_a_half_drops_that_half():
    # Review finding: the /0 is stored as two /1 halves; an except equal to a half
    # must remove it, not sit next to it as "nomatch" (ipset would hold both).
    import ipaddress

    from policy_agent.compiler.scopes import ipblock_empty, ipblock_members
    from policy_agent.model.types import IPBlock

    net = ipaddress.ip_network
    b = IPBlock(net("0.0.0.0/0"), (net("128.0.0.0/1"), net("10.0.0.0/8")))
    assert ipblock_members(b) == {"0.0.0.0/1", "10.0.0.0/8 nomatch"}
    assert not ipblock_empty(b)
    both = IPBlock(net("0.0.0.0/0"), (net("128.0.0.0/1"), net("0.0.0.0/1")))
    assert ipblock_empty(both)
    assert ipblock_members(IPBlock(net("10.0.0.0/8"), (net("10.1.0.0/16"),))) == {"10.0.0.0/8", "10.1.0.0/16 nomatch"}
