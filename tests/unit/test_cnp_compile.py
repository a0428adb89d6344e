"""ClusterNetworkPolicy tiers, compiled and walked packet by packet (explain), case by case.

Each test states one point of the API's semantics (docs/decisions/cluster-network-policy.md)
and checks the verdict of the compiled rules, and where useful which tier decided.
"""

from __future__ import annotations

import ipaddress

from test_compiler_evaluator import make_ns, make_pod, make_policy, peer, rule, sel

from policy_agent.compiler import Compiler, compile
from policy_agent.compiler.options import NodeConfig
from policy_agent.desired import render_iptables_save
from policy_agent.explain import explain_state_flow
from policy_agent.model.types import (
    MATCH_ALL,
    ClusterNetworkPolicy,
    ClusterSnapshot,
    CNPAction,
    CNPPeer,
    CNPPort,
    CNPRule,
    CNPTier,
    Labels,
    Node,
    Protocol,
)

NODE = "node-1"
CFG = NodeConfig(NODE)
NS = [make_ns("x", env="prod"), make_ns("y", env="dev")]
A = make_pod("a", ns="x", ips=("10.233.0.2", "fd00:233::2"), labels={"app": "a"},
             ports=[(8080, "TCP", "http"), (5353, "UDP", "dns")])
B = make_pod("b", ns="x", ips=("10.233.0.3", "fd00:233::3"), labels={"app": "b"})
C = make_pod("c", ns="y", ips=("10.233.0.4",), labels={"app": "c"}, ports=[(8443, "TCP", "http")])
R = make_pod("r", ns="y", ips=("10.233.1.5",), labels={"app": "r"}, node="node-2")
PODS = [A, B, C, R]
ADMIN, BASE = CNPTier.ADMIN, CNPTier.BASELINE
ACCEPT, DENY, PASS = CNPAction.ACCEPT, CNPAction.DENY, CNPAction.PASS
NODE_OBJS = [
    Node("node-1", Labels({"role": "worker"}), (ipaddress.ip_address("10.233.0.100"),)),
    Node("cp-1", Labels({"role": "control-plane"}), (ipaddress.ip_address("10.233.9.1"),
                                                     ipaddress.ip_address("fd00:233::9:1"))),
]


def ns_peer(**labels) -> CNPPeer:
    return CNPPeer("namespaces", namespace_selector=sel(labels))


def pods_peer(ns=None, **labels) -> CNPPeer:
    return CNPPeer("pods", namespace_selector=sel(ns) if ns else MATCH_ALL, pod_selector=sel(labels))


def nets(*cidrs) -> CNPPeer:
    return CNPPeer("networks", networks=tuple(ipaddress.ip_network(c) for c in cidrs))


def r(action, *peers, ports=(), name="") -> CNPRule:
    return CNPRule(action, name, tuple(peers), tuple(ports))


def tcp(n, end=None) -> CNPPort:
    return CNPPort(Protocol.TCP, n, end or n)


def cnp(name, tier=ADMIN, priority=10, ingress=(), egress=(), subject_ns=MATCH_ALL, subject_pods=MATCH_ALL):
    return ClusterNetworkPolicy(name, tier, priority, subject_ns, subject_pods, tuple(ingress), tuple(egress))


def flow(*objs, src=B, dst=A, proto="TCP", port=80, family=None, cfg=CFG, **kw):
    snap = ClusterSnapshot.of([*NS, *PODS, *objs])
    state = compile(snap, cfg)
    return explain_state_flow(state, snap, src, dst, proto, port, node=cfg.node_name, family=family, **kw)


def ok(*objs, **kw) -> bool:
    return flow(*objs, **kw).allowed


SUBJ_A = sel({"app": "a"})


def to_a(name, tier, action, priority=10, **kw):
    """A CNP on pod a: ingress from every namespace with the action."""
    return cnp(name, tier, priority, ingress=[r(action, ns_peer(), **kw)], subject_pods=SUBJ_A)


ISOLATE_A = make_policy("only-c", ns="x", pod_selector=SUBJ_A, ingress=[rule([peer(pods=sel({"app": "c"}),
                                                                                   nss=sel())])])


# --- each action in each tier ---------------------------------------------------------------


def test_admin_accept_overrides_a_networkpolicy_that_isolates():
    assert not ok(ISOLATE_A)
    e = flow(ISOLATE_A, to_a("acc", ADMIN, ACCEPT))
    assert e.allowed
    assert any("decided by the admin tier (Accept)" in t for t in e.tier_decisions()), e.render()


def test_admin_deny_overrides_a_networkpolicy_that_allows():
    allow_all = make_policy("all", ns="x", pod_selector=SUBJ_A, ingress=[rule()])
    assert ok(allow_all)
    e = flow(allow_all, to_a("deny", ADMIN, DENY))
    assert not e.allowed and "admin tier cnp deny priority 10 ingress rule 0" in e.decided_by.comment


def test_admin_pass_hands_over_to_networkpolicy_then_to_baseline():
    passing = to_a("pass", ADMIN, PASS)
    base_deny = to_a("bdeny", BASE, DENY)
    # not isolated: Pass -> NetworkPolicy tier does not apply -> baseline Deny
    e = flow(passing, base_deny)
    assert not e.allowed
    assert any("admin tier: pass priority 10 rule 0: Pass; baseline tier: bdeny" in t for t in e.tier_decisions())
    # isolated by a NetworkPolicy that allows c: NetworkPolicy decides, baseline never runs
    assert ok(passing, base_deny, ISOLATE_A, src=C)
    assert not ok(passing, base_deny, ISOLATE_A, src=B)
    # Pass in the admin tier skips a later admin Deny
    later_deny = to_a("later", ADMIN, DENY, priority=20)
    assert not ok(later_deny)
    assert ok(passing, later_deny)


def test_baseline_accept_and_deny_apply_only_to_pods_no_networkpolicy_isolates():
    assert not ok(to_a("bd", BASE, DENY))
    assert ok(to_a("ba", BASE, ACCEPT))
    # isolated: the NetworkPolicy tier is final, baseline Accept cannot widen it
    assert not ok(ISOLATE_A, to_a("ba", BASE, ACCEPT), src=B)
    # an egress-only NetworkPolicy does not isolate ingress: baseline still applies
    egress_only = make_policy("eg", ns="x", pod_selector=SUBJ_A, egress=[rule()], types=["Egress"])
    assert not ok(egress_only, to_a("bd", BASE, DENY))


def test_baseline_pass_goes_to_default_allow():
    e = flow(to_a("bp", BASE, PASS), to_a("bd", BASE, DENY, priority=20))
    assert e.allowed
    assert any("decided by the default allow" in t for t in e.tier_decisions()), e.render()


def test_no_implicit_isolation():
    only_c = cnp("c-only", ingress=[r(ACCEPT, pods_peer(app="c"))], subject_pods=SUBJ_A)
    assert ok(only_c, src=C) and ok(only_c, src=B)  # B matches no rule: falls through to allow
    assert ok(cnp("egress-only", egress=[r(DENY, nets("192.0.2.0/24"))], subject_pods=SUBJ_A))


def test_egress_accept_still_needs_the_destination_ingress():
    eg = cnp("eg", egress=[r(ACCEPT, ns_peer())], subject_pods=sel({"app": "b"}))
    isolate_a_nothing = make_policy("deny", ns="x", pod_selector=SUBJ_A, ingress=[])
    assert not ok(eg, isolate_a_nothing)
    # and it overrides the source's own egress isolation
    b_egress_closed = make_policy("bclosed", ns="x", pod_selector=sel({"app": "b"}), egress=[], types=["Egress"])
    assert not ok(b_egress_closed)
    assert ok(b_egress_closed, eg)


def test_egress_deny_to_a_remote_pod_and_direction_without_rules_is_untouched():
    deny_y = cnp("deny-y", egress=[r(DENY, ns_peer(env="dev"))], subject_ns=sel({"env": "prod"}))
    assert not ok(deny_y, src=A, dst=R)
    assert ok(deny_y, src=R, dst=A)  # the policy has no ingress rules: ingress of a unaffected


# --- ordering -------------------------------------------------------------------------------


def test_lower_priority_value_wins_in_a_tier():
    assert ok(to_a("deny", ADMIN, DENY, priority=20), to_a("acc", ADMIN, ACCEPT, priority=5))
    assert not ok(to_a("deny", ADMIN, DENY, priority=5), to_a("acc", ADMIN, ACCEPT, priority=20))
    assert ok(to_a("deny", BASE, DENY, priority=20), to_a("acc", BASE, ACCEPT, priority=5))


def test_equal_priorities_are_ordered_by_name():
    # The API leaves ties to the implementation; ours is the name order, stable.
    assert ok(to_a("a-accept", ADMIN, ACCEPT), to_a("b-deny", ADMIN, DENY))
    assert not ok(to_a("a-deny", ADMIN, DENY), to_a("b-accept", ADMIN, ACCEPT))


def test_rule_order_inside_a_policy_first_match_wins():
    first_accept = cnp("p", ingress=[r(ACCEPT, pods_peer(app="b")), r(DENY, ns_peer())], subject_pods=SUBJ_A)
    first_deny = cnp("p", ingress=[r(DENY, ns_peer()), r(ACCEPT, pods_peer(app="b"))], subject_pods=SUBJ_A)
    assert ok(first_accept) and not ok(first_accept, src=C)
    assert not ok(first_deny)
    # a non-matching earlier rule does not stop evaluation
    miss_then_deny = cnp("p", ingress=[r(ACCEPT, pods_peer(app="nobody")), r(DENY, ns_peer())], subject_pods=SUBJ_A)
    assert not ok(miss_then_deny)


# --- ports ---------------------------------------------------------------------------------------


def test_port_number_range_and_protocol():
    pol = to_a("p", ADMIN, DENY, ports=[tcp(80), CNPPort(Protocol.UDP, 1000, 2000)])
    assert not ok(pol, port=80) and ok(pol, port=81)
    assert ok(pol, proto="UDP", port=80)
    assert not ok(pol, proto="UDP", port=1000) and not ok(pol, proto="UDP", port=2000)
    assert ok(pol, proto="UDP", port=2001)
    assert ok(pol, proto="SCTP", port=80)
    sctp = to_a("s", ADMIN, DENY, ports=[CNPPort(Protocol.SCTP, 80, 80)])
    assert not ok(sctp, proto="SCTP", port=80) and ok(sctp, proto="TCP", port=80)


def test_named_port_resolves_on_the_destination_pod_with_its_protocol():
    ing = to_a("np", ADMIN, DENY, ports=[CNPPort(named_port="http"), CNPPort(named_port="dns")])
    assert not ok(ing, port=8080)  # a's http is 8080/TCP
    assert ok(ing, port=8443)  # c's http, not a's
    assert ok(ing, proto="UDP", port=8080)  # http is TCP
    assert not ok(ing, proto="UDP", port=5353) and ok(ing, proto="TCP", port=5353)
    eg = cnp("npe", egress=[r(DENY, ns_peer(), ports=[CNPPort(named_port="http")])], subject_pods=sel({"app": "b"}))
    assert not ok(eg, dst=A, port=8080) and ok(eg, dst=A, port=8443)
    assert not ok(eg, dst=C, port=8443) and ok(eg, dst=C, port=8080)


# --- networks and nodes -----------------------------------------------------------------------


def test_networks_ipv4_and_ipv6():
    pol = cnp("n", egress=[r(DENY, nets("10.233.0.2/32", "fd00:233::/120"))], subject_pods=sel({"app": "b"}))
    assert not ok(pol, family=4) and not ok(pol, family=6)
    v4_only = cnp("n", egress=[r(DENY, nets("10.233.0.0/24"))], subject_pods=sel({"app": "b"}))
    assert not ok(v4_only, family=4) and ok(v4_only, family=6)
    all_v6 = cnp("n", egress=[r(DENY, nets("::/0"))], subject_pods=sel({"app": "b"}))
    assert ok(all_v6, family=4) and not ok(all_v6, family=6)
    assert not ok(all_v6, dst="fd00:beef::1") and ok(all_v6, dst="192.0.2.1")


def test_node_peers_match_the_nodes_addresses_and_follow_node_updates():
    deny_cp = cnp("no-cp", egress=[r(DENY, CNPPeer("nodes", node_selector=sel({"role": "control-plane"})))],
                  subject_ns=sel({"env": "prod"}))
    assert not ok(deny_cp, *NODE_OBJS, dst="10.233.9.1")
    assert not ok(deny_cp, *NODE_OBJS, dst="fd00:233::9:1")
    assert ok(deny_cp, *NODE_OBJS, dst="10.233.0.100")  # a worker
    # pod -> its own node (INPUT) passes the pod's egress tiers too
    deny_workers = cnp("no-w", egress=[r(DENY, CNPPeer("nodes", node_selector=sel({"role": "worker"})))],
                       subject_ns=sel({"env": "prod"}))
    e = flow(deny_workers, *NODE_OBJS, src=A, dst="node", node_ips=["10.233.0.100"])
    assert e.path.chain == "INPUT" and not e.allowed
    # incremental: the control plane gets a new address, then its label is removed
    c = Compiler(CFG).load(ClusterSnapshot.of([*NS, *PODS, *NODE_OBJS, deny_cp]))
    snap = ClusterSnapshot.of([*NS, *PODS])
    moved = Node("cp-1", Labels({"role": "control-plane"}), (ipaddress.ip_address("10.233.9.2"),))
    c.upsert_node(moved)
    st = c.desired()
    assert explain_state_flow(st, snap, A, "10.233.9.1", "TCP", 443).allowed
    assert not explain_state_flow(st, snap, A, "10.233.9.2", "TCP", 443).allowed
    c.upsert_node(Node("cp-1", Labels({}), moved.addresses))
    assert explain_state_flow(c.desired(), snap, A, "10.233.9.2", "TCP", 443).allowed
    assert c.desired() == compile(ClusterSnapshot.of([*NS, *PODS, NODE_OBJS[0], Node("cp-1", Labels({}),
                                                      moved.addresses), deny_cp]), CFG)


def test_domain_names_fail_closed_and_unknown_peers_fail_closed():
    dom = CNPPeer("domainNames", domain_names=("example.com",))
    # Accept toward a name: matches nothing (a lower Deny still denies)
    acc = cnp("d", egress=[r(ACCEPT, dom)], subject_pods=sel({"app": "b"}))
    deny_all = cnp("z", egress=[r(DENY, nets("0.0.0.0/0"))], subject_pods=sel({"app": "b"}), priority=20)
    assert ok(acc) and not ok(acc, deny_all)
    # Deny (or Pass) toward a name: every destination on the rule's ports is denied
    assert not ok(cnp("d", egress=[r(DENY, dom)], subject_pods=sel({"app": "b"})))
    on_443 = cnp("d", egress=[r(DENY, dom, ports=[tcp(443)])], subject_pods=sel({"app": "b"}))
    assert not ok(on_443, port=443) and ok(on_443, port=80)
    passed = cnp("d", egress=[r(PASS, dom, ports=[tcp(80)])], subject_pods=sel({"app": "b"}))
    assert not ok(passed, port=80) and ok(passed, port=81)
    acc_unknown = cnp("u", ingress=[r(ACCEPT, CNPPeer("unknown"))], subject_pods=SUBJ_A)
    assert not ok(acc_unknown, ISOLATE_A)  # Accept with an unknown peer matches nothing
    deny_unknown = cnp("u", ingress=[r(DENY, CNPPeer("unknown"), ports=[tcp(9)])], subject_pods=SUBJ_A)
    assert not ok(deny_unknown, port=80)  # Deny with an unknown peer: deny all, ports ignored
    pass_unknown = cnp("u", ingress=[r(PASS, pods_peer(app="c"), CNPPeer("unknown"))], subject_pods=SUBJ_A)
    assert not ok(pass_unknown, src=C)


# --- subjects, marks, actions --------------------------------------------------------------------


def test_subject_follows_namespace_and_pod_labels_incrementally():
    pol = cnp("prod", ingress=[r(DENY, ns_peer())], subject_ns=sel({"env": "prod"}))
    c = Compiler(CFG).load(ClusterSnapshot.of([*NS, *PODS, pol]))
    snap = ClusterSnapshot.of([*NS, *PODS])
    assert not explain_state_flow(c.desired(), snap, C, A, "TCP", 80).allowed
    c.upsert_namespace(make_ns("x", env="staging"))
    assert explain_state_flow(c.desired(), snap, C, A, "TCP", 80).allowed
    c.upsert_namespace(make_ns("y", env="prod"))
    assert not explain_state_flow(c.desired(), snap, A, C, "TCP", 80).allowed
    pods_pol = cnp("pods", ingress=[r(DENY, ns_peer())], subject_pods=sel({"app": "zz"}))
    c.upsert_cluster_policy(pods_pol)
    relabeled = make_pod("b", ns="x", ips=("10.233.0.3", "fd00:233::3"), labels={"app": "zz"})
    c.upsert_pod(relabeled)
    snap2 = ClusterSnapshot.of([make_ns("x", env="staging"), make_ns("y", env="prod"), A, relabeled, C, R])
    assert not explain_state_flow(c.desired(), snap2, A, relabeled, "TCP", 80).allowed
    assert c.desired() == compile(ClusterSnapshot.of([*snap2.namespaces.values(), *snap2.pods.values(), pol,
                                                      pods_pol]), CFG)


def test_pass_uses_the_scratch_bit_and_deny_the_deny_action():
    cfg = NodeConfig(NODE, mark_mask=0x00F00000, deny_action="REJECT")
    text = render_iptables_save(compile(ClusterSnapshot.of([*NS, *PODS, to_a("p", ADMIN, PASS),
                                                            to_a("d", BASE, DENY)]), cfg), 4)
    assert "-A pa-cnp-pass" in text and "--set-xmark 0x200000/0x200000" in text
    assert "-A pa-cnp-accept" in text and "--set-xmark 0x100000/0x100000" in text
    assert "-m mark --mark 0x0/0x200000 -j pa-ai-p" in text
    deny_lines = [ln for ln in text.splitlines() if ln.startswith("-A pa-bi-d")]
    assert deny_lines and all(ln.endswith("-j REJECT") for ln in deny_lines)
    assert not flow(to_a("p", ADMIN, PASS), to_a("d", BASE, DENY), cfg=cfg).allowed


def test_comments_name_tier_policy_priority_rule_and_action():
    pol = cnp("guard", priority=7, ingress=[r(DENY, ns_peer(env="dev"), ports=[tcp(80)], name="no dev")],
              subject_pods=SUBJ_A)
    text = render_iptables_save(compile(ClusterSnapshot.of([*NS, *PODS, pol]), CFG), 4)
    assert '"admin tier cnp guard priority 7 ingress rule 0 peer 0 port 0: Deny, rule name=no dev"' in text
    assert '"admin tier: ingress cluster network policy guard priority 7"' in text


def test_helper_chains_exist_only_while_a_cnp_chain_is_rendered():
    c = Compiler(CFG).load(ClusterSnapshot.of([*NS, *PODS]))
    assert "pa-cnp-accept" not in c.desired().table(4, "filter")
    c.upsert_cluster_policy(to_a("p", ADMIN, PASS))
    assert {"pa-cnp-accept", "pa-cnp-pass"} <= set(c.desired().table(4, "filter"))
    c.delete_cluster_policy("p")
    assert "pa-cnp-pass" not in c.desired().table(4, "filter")
