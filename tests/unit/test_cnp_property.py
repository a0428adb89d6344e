"""ClusterNetworkPolicy properties on random clusters.

1. explain(compile(...)) agrees with the independent reference evaluator
   (tests/reference_eval.py + reference_eval_cnp.py) for every pod pair, pod <-> external
   address and pod -> node address, with NetworkPolicies, Admin and Baseline CNPs and
   Nodes mixed, TCP/UDP/SCTP, IPv4 and IPv6.
2. The incremental Compiler, fed the objects in random order with detours, ends
   byte-identical to a full compile.
3. With no ClusterNetworkPolicy selecting a local pod (and any Nodes), the compiled
   state is byte-identical and equal to today's (the NetworkPolicy-only compile), and
   adding then deleting a CNP restores it exactly.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_property import (  # noqa: E402
    CONFIGS,
    EXTERNAL,
    NODE_IPS,
    NODES,
    POD_KEYS,
    SETTINGS,
    cluster_st,
    compare_with_reference,
    ns_selector_st,
    render_all,
    selector_st,
)

from policy_agent.compiler import Compiler, compile  # noqa: E402
from policy_agent.model import (  # noqa: E402
    MATCH_ALL,
    ClusterNetworkPolicy,
    ClusterSnapshot,
    CNPAction,
    CNPPeer,
    CNPPort,
    CNPRule,
    CNPTier,
    Labels,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    Protocol,
)

net = ipaddress.ip_network
NODE_OBJECTS = (
    Node("n1", Labels({"role": "a"}), (ipaddress.ip_address(NODE_IPS["n1"]), ipaddress.ip_address("fd00:233::33"))),
    Node("n2", Labels({"role": "b"}), (ipaddress.ip_address(NODE_IPS["n2"]),)),
)
NETWORKS = (
    (net("10.233.0.0/24"),),
    (net("10.233.0.0/28"), net("fd00:233::/120")),
    (net("0.0.0.0/0"),),
    (net("::/0"),),
    (net("10.233.0.8/29"), net("10.233.1.0/24")),
)
node_sel_st = st.sampled_from(
    (LabelSelector(), LabelSelector(Labels({"role": "a"})), LabelSelector(Labels({"role": "b"})))
)
pods_peer_st = st.one_of(
    st.builds(lambda s: CNPPeer("namespaces", namespace_selector=s), ns_selector_st),
    st.builds(
        lambda n, p: CNPPeer("pods", namespace_selector=n, pod_selector=p),
        st.one_of(st.just(MATCH_ALL), ns_selector_st),
        selector_st(POD_KEYS),
    ),
)
other_peer_st = st.one_of(
    st.sampled_from(NETWORKS).map(lambda n: CNPPeer("networks", networks=n)),
    node_sel_st.map(lambda s: CNPPeer("nodes", node_selector=s)),
    st.just(CNPPeer("domainNames", domain_names=("example.com",))),
    st.just(CNPPeer("unknown")),
)
number_port_st = st.one_of(
    st.builds(lambda pr, p: CNPPort(pr, p, p), st.sampled_from(list(Protocol)), st.sampled_from((53, 80, 81, 8080))),
    st.builds(lambda pr: CNPPort(pr, 80, 81), st.sampled_from(list(Protocol))),
)
named_port_st = st.sampled_from(("http", "dns")).map(lambda n: CNPPort(named_port=n))


@st.composite
def cnp_rule_st(draw, egress: bool):
    action = draw(st.sampled_from(list(CNPAction)))
    peers = draw(st.lists(st.one_of(pods_peer_st, other_peer_st) if egress else pods_peer_st, min_size=1, max_size=2))
    if not egress and draw(st.integers(0, 9)) == 0:
        peers.append(CNPPeer("unknown"))
    only_pods = all(p.kind in ("namespaces", "pods", "unknown") for p in peers)
    port_st = st.one_of(number_port_st, named_port_st) if only_pods else number_port_st
    ports = draw(st.lists(port_st, max_size=2))
    return CNPRule(action, draw(st.sampled_from(("", "r"))), tuple(peers), tuple(ports))


@st.composite
def cnp_st(draw, name):
    if draw(st.booleans()):
        subj_ns, subj_pods = draw(ns_selector_st), MATCH_ALL
    else:
        subj_ns, subj_pods = draw(st.one_of(st.just(MATCH_ALL), ns_selector_st)), draw(selector_st(POD_KEYS))
    return ClusterNetworkPolicy(
        name=name,
        tier=draw(st.sampled_from(list(CNPTier))),
        priority=draw(st.integers(1, 3)),  # few values: ties happen
        subject_namespaces=subj_ns,
        subject_pods=subj_pods,
        ingress=tuple(draw(st.lists(cnp_rule_st(False), max_size=3))),
        egress=tuple(draw(st.lists(cnp_rule_st(True), max_size=3))),
    )


@st.composite
def tiered_cluster_st(draw):
    objects = draw(cluster_st())
    objects += [n for n in NODE_OBJECTS if draw(st.booleans())]
    n = draw(st.integers(1, 3))
    objects += [draw(cnp_st(f"cnp-{chr(ord('c') - i)}")) for i in range(n)]  # names not in creation order
    return objects


def _check_against_reference(objects) -> int:
    snap = ClusterSnapshot.of(objects)
    states = {n: compile(snap, CONFIGS[n]) for n in NODES}
    pods = sorted(snap.pods.values(), key=lambda p: p.key)
    externals = EXTERNAL + tuple(NODE_IPS.values()) + ("fd00:233::33",)
    pairs = [(a, b) for a in pods for b in pods if a is not b]
    pairs += [(a, e) for a in pods for e in externals] + [(e, a) for a in pods for e in EXTERNAL]
    return compare_with_reference(snap, states, pairs)


@SETTINGS
@given(tiered_cluster_st())
def test_tiers_agree_with_reference(objects):
    assert _check_against_reference(objects) > 0


def _feed(c: Compiler, o) -> None:
    if isinstance(o, Namespace):
        c.upsert_namespace(o)
    elif isinstance(o, Pod):
        c.upsert_pod(o)
    elif isinstance(o, NetworkPolicy):
        c.upsert_policy(o)
    elif isinstance(o, Node):
        c.upsert_node(o)
    else:
        c.upsert_cluster_policy(o)


@SETTINGS
@given(tiered_cluster_st(), st.randoms(use_true_random=False))
def test_incremental_equals_full_compile(objects, rnd):
    snap = ClusterSnapshot.of(objects)
    for n in NODES:
        full = compile(snap, CONFIGS[n])
        shuffled = list(objects)
        rnd.shuffle(shuffled)
        c = Compiler(CONFIGS[n])
        detour_cnp = ClusterNetworkPolicy(
            "detour", CNPTier.ADMIN, 0,
            ingress=(CNPRule(CNPAction.DENY, "", (CNPPeer("namespaces", namespace_selector=MATCH_ALL),)),),
            egress=(CNPRule(CNPAction.PASS, "", (CNPPeer("nodes", node_selector=MATCH_ALL),)),),
        )
        for i, o in enumerate(shuffled):
            if isinstance(o, ClusterNetworkPolicy):
                # a changed version first (other tier, priority), then the real one
                c.upsert_cluster_policy(ClusterNetworkPolicy(o.name, CNPTier.BASELINE, 999, ingress=o.egress and ()))
                c.desired()
            if isinstance(o, Namespace):
                c.upsert_namespace(Namespace(o.name, Labels({"team": "zz", "kubernetes.io/metadata.name": o.name})))
                c.desired()
            if isinstance(o, Pod):
                c.upsert_pod(Pod(o.namespace, o.name, Labels({"app": "zz"}), o.node_name, o.ips, o.ports,
                                 phase="Running"))
                c.desired()
            if isinstance(o, Node):
                c.upsert_node(Node(o.name, Labels({"role": "zz"}), ()))
                c.desired()
            _feed(c, o)
            if i == len(shuffled) // 2:
                c.upsert_cluster_policy(detour_cnp)
                c.upsert_node(Node("detour-node", Labels({"role": "a"}), (ipaddress.ip_address("10.233.9.9"),)))
                c.desired()
        c.delete_cluster_policy("detour")
        c.delete_node("detour-node")
        got = c.desired()
        assert render_all(got) == render_all(full)
        assert got == full


def _no_cnp_objects(objects):
    return [o for o in objects if not isinstance(o, (ClusterNetworkPolicy, Node))]


@SETTINGS
@given(cluster_st(), st.lists(st.sampled_from(NODE_OBJECTS), unique=True))
def test_without_cnps_output_is_unchanged(objects, nodes):
    """The NetworkPolicy-only compile is today's (goldens in tests/golden pin it); Nodes and
    CNPs selecting no local pod add nothing; a CNP added then deleted leaves no trace."""
    nothing = LabelSelector(Labels({"team": "no-such-team"}))
    idle = ClusterNetworkPolicy(
        "idle", CNPTier.ADMIN, 1, subject_namespaces=nothing,
        ingress=(CNPRule(CNPAction.DENY, "", (CNPPeer("namespaces", namespace_selector=MATCH_ALL),)),),
    )
    busy = ClusterNetworkPolicy(
        "busy", CNPTier.BASELINE, 1,
        ingress=(CNPRule(CNPAction.DENY, "", (CNPPeer("namespaces", namespace_selector=MATCH_ALL),)),),
        egress=(CNPRule(CNPAction.ACCEPT, "", (CNPPeer("networks", networks=(net("0.0.0.0/0"),)),)),),
    )
    for n in NODES:
        base = compile(ClusterSnapshot.of(objects), CONFIGS[n])
        with_extra = compile(ClusterSnapshot.of([*objects, *nodes, idle]), CONFIGS[n])
        assert render_all(with_extra) == render_all(base)
        assert with_extra == base
        c = Compiler(CONFIGS[n]).load(ClusterSnapshot.of(objects))
        assert c.desired() == base
        c.upsert_cluster_policy(busy)
        if any(p.node_name == n for p in ClusterSnapshot.of(objects).pods.values()):
            assert render_all(c.desired()) != render_all(base)
        for node in nodes:
            c.upsert_node(node)
        c.delete_cluster_policy("busy")
        after = c.desired()
        assert render_all(after) == render_all(base)
        assert after == base
