"""Property tests: compile output is deterministic, and explain(compile(...)) agrees with
the independent reference evaluator (tests/reference_eval.py) on random small clusters.

Flows checked: every ordered pair of distinct pods (on the same node: one FORWARD pass
on that node; on different nodes: the source node's FORWARD then the destination
node's, both must accept), plus addresses that are not pods, for TCP/UDP on a few
ports, in IPv4 and (when both ends have one) IPv6.
"""

from __future__ import annotations

import ipaddress
import os
import random
import sys

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference_eval as ref  # noqa: E402

from policy_agent.compiler import Compiler, compile  # noqa: E402
from policy_agent.compiler.options import NodeConfig  # noqa: E402
from policy_agent.desired import render_ipset_restore, render_iptables_save  # noqa: E402
from policy_agent.explain import explain_state_flow  # noqa: E402
from policy_agent.model import (  # noqa: E402
    ClusterSnapshot,
    ContainerPort,
    IPBlock,
    Labels,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PolicyPort,
    PolicyType,
    Protocol,
    Requirement,
    Rule,
)

NODES = ("n1", "n2")
NAMESPACES = ("x", "y", "z")
PORTS = (53, 80, 81, 8080)
EXTERNAL = ("10.233.0.1", "10.233.1.1", "fd00:233::1", "fd00:234::1")
CONFIGS = {n: NodeConfig(n) for n in NODES}
NODE_IPS = {"n1": "10.233.0.33", "n2": "10.233.1.33"}  # inside / outside the ipBlocks' /24

net = ipaddress.ip_network

# --- strategies -------------------------------------------------------------------------

label_values = {"app": ("a", "b"), "tier": ("f", "b"), "team": ("a", "b")}


def labels_st(keys):
    return st.dictionaries(st.sampled_from(keys), st.sampled_from(("a", "b", "f")), max_size=2).map(Labels)


def requirement_st(keys):
    return st.builds(
        lambda k, op, vals: Requirement(
            k, op, tuple(sorted(set(vals))) if op in (Operator.IN, Operator.NOT_IN) else ()
        ),
        st.sampled_from(keys),
        st.sampled_from(list(Operator)),
        st.lists(st.sampled_from(("a", "b", "f")), min_size=1, max_size=2),
    )


def selector_st(keys):
    # Mostly small selectors, so that policies do select pods and peers do match.
    return st.one_of(
        st.just(LabelSelector()),
        st.builds(
            lambda ml, reqs: LabelSelector(ml, tuple(sorted(set(reqs), key=Requirement.canonical))),
            st.dictionaries(st.sampled_from(keys), st.sampled_from(("a", "b")), max_size=1).map(Labels),
            st.lists(requirement_st(keys), max_size=1),
        ),
    )


POD_KEYS = ("app", "tier")
NS_KEYS = ("team", "kubernetes.io/metadata.name")

ns_selector_st = st.one_of(
    selector_st(("team",)),
    st.sampled_from(NAMESPACES).map(lambda n: LabelSelector(Labels({"kubernetes.io/metadata.name": n}))),
)

IP_BLOCKS = (
    IPBlock(net("10.233.0.0/24")),
    IPBlock(net("10.233.0.0/27"), (net("10.233.0.16/28"),)),
    IPBlock(net("10.233.0.8/29")),
    IPBlock(net("0.0.0.0/0"), (net("10.233.0.0/28"),)),
    IPBlock(net("10.233.0.0/16"), (net("10.233.0.0/26"), net("10.233.0.20/30"))),
    IPBlock(net("fd00:233::/64"), (net("fd00:233::/124"),)),
    IPBlock(net("::/0")),
)

peer_st = st.one_of(
    st.builds(lambda s: Peer(pod_selector=s), selector_st(POD_KEYS)),
    st.builds(lambda s: Peer(namespace_selector=s), ns_selector_st),
    st.builds(lambda p, n: Peer(pod_selector=p, namespace_selector=n), selector_st(POD_KEYS), ns_selector_st),
    st.sampled_from(IP_BLOCKS).map(lambda b: Peer(ip_block=b)),
    st.sampled_from(IP_BLOCKS[:2] + IP_BLOCKS[3:6]).map(lambda b: Peer(ip_block=b)),  # excepts, more often
    st.sampled_from(IP_BLOCKS[:2] + IP_BLOCKS[3:6]).map(lambda b: Peer(ip_block=b)),  # (twice: excepts need weight)
)

policy_port_st = st.one_of(
    st.builds(PolicyPort, st.sampled_from(list(Protocol))),
    st.builds(PolicyPort, st.sampled_from(list(Protocol)), st.sampled_from((53, 80, 81, 8080))),
    st.builds(lambda p: PolicyPort(p, 80, 81), st.sampled_from(list(Protocol))),
    st.builds(PolicyPort, st.sampled_from(list(Protocol)), st.sampled_from(("http", "dns"))),
)

rule_st = st.builds(
    lambda ports, peers: Rule(tuple(ports), tuple(peers)),
    st.lists(policy_port_st, max_size=2),
    st.lists(peer_st, max_size=2),
)

CONTAINER_PORTS = (
    ContainerPort(80, Protocol.TCP, "http"),
    ContainerPort(8080, Protocol.TCP, "http"),
    ContainerPort(53, Protocol.UDP, "dns"),
    ContainerPort(53, Protocol.TCP, "dns"),
    ContainerPort(81, Protocol.TCP, None),
    ContainerPort(80, Protocol.SCTP, "http"),
)


@st.composite
def policy_st(draw, name):
    types = draw(
        st.sampled_from(((PolicyType.INGRESS,), (PolicyType.EGRESS,), (PolicyType.INGRESS, PolicyType.EGRESS), None))
    )
    ingress = tuple(draw(st.lists(rule_st, max_size=2)))
    egress = tuple(draw(st.lists(rule_st, max_size=2)))
    if types is None:  # the parser's defaulting
        types = (PolicyType.INGRESS, PolicyType.EGRESS) if egress else (PolicyType.INGRESS,)
    return NetworkPolicy(
        namespace=draw(st.sampled_from(NAMESPACES[:2])),
        name=name,
        pod_selector=draw(selector_st(POD_KEYS)),
        policy_types=types,
        ingress=ingress,
        egress=egress,
    )


@st.composite
def cluster_st(draw):
    objects: list = []
    for n in NAMESPACES[:2]:
        if draw(st.booleans()):
            lab = draw(labels_st(("team",)))
            objects.append(Namespace(n, Labels({**lab, "kubernetes.io/metadata.name": n})))
    n_pods = draw(st.integers(2, 5))
    hosts = draw(st.lists(st.integers(2, 31), min_size=n_pods, max_size=n_pods, unique=True))
    for i, h in enumerate(hosts):
        v4, v6 = ipaddress.ip_address(f"10.233.0.{h}"), ipaddress.ip_address(f"fd00:233::{h:x}")
        ips = draw(st.sampled_from(([v4], [v4, v6], [v4, v6], [v6])))
        ports = tuple(draw(st.lists(st.sampled_from(CONTAINER_PORTS), max_size=2, unique=True)))
        objects.append(
            Pod(
                namespace=draw(st.sampled_from(NAMESPACES)),
                name=f"p{i}",
                labels=draw(labels_st(POD_KEYS)),
                node_name=draw(st.sampled_from(NODES)),
                ips=tuple(ips),
                ports=ports,
                phase="Running",
            )
        )
    n_pols = draw(st.integers(0, 3))
    for i in range(n_pols):
        objects.append(draw(policy_st(f"pol{i}")))
    return objects


# --- helpers ----------------------------------------------------------------------------


def render_all(state) -> str:
    return render_iptables_save(state, 4) + render_iptables_save(state, 6) + render_ipset_restore(state)


def cluster_verdict(states, snap, src, dst, protocol, port, family) -> tuple[bool, list[str]]:
    """Evaluate on every node that sees the flow (source's node, destination's node)."""
    nodes = []
    for end in (src, dst):
        if isinstance(end, Pod) and end.node_name not in nodes:
            nodes.append(end.node_name)
    allowed = True
    traces = []
    for n in nodes:
        e = explain_state_flow(states[n], snap, src, dst, protocol, port, node=n, family=family)
        traces.append(e.render())
        allowed = allowed and e.allowed
    return allowed, traces


def _ip(end, family):
    if isinstance(end, Pod):
        return next((str(i) for i in end.ips if i.version == family), None)
    return end if ipaddress.ip_address(end).version == family else None


# --- properties -------------------------------------------------------------------------

SETTINGS = settings(
    max_examples=int(os.environ.get("PA_PROPERTY_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("CI", "").lower() in ("1", "true", "yes"),
)


@SETTINGS
@given(cluster_st(), st.randoms(use_true_random=False))
def test_compile_is_deterministic_and_order_independent(objects, rnd):
    snap = ClusterSnapshot.of(objects)
    for n in NODES:
        first = render_all(compile(snap, CONFIGS[n]))
        assert render_all(compile(snap, CONFIGS[n])) == first
        shuffled = list(objects)
        rnd.shuffle(shuffled)
        assert render_all(compile(ClusterSnapshot.of(shuffled), CONFIGS[n])) == first
        # incremental: insert in random order, with a detour (extra policy, relabel) undone
        c = Compiler(CONFIGS[n])
        detour = NetworkPolicy("x", "detour", LabelSelector(), (PolicyType.INGRESS, PolicyType.EGRESS))
        for o in shuffled:
            if isinstance(o, Namespace):
                c.upsert_namespace(Namespace(o.name, Labels({"team": "zz", "kubernetes.io/metadata.name": o.name})))
                c.desired()
                c.upsert_namespace(o)
            elif isinstance(o, Pod):
                c.upsert_pod(o)
                c.upsert_pod(
                    Pod(o.namespace, o.name, Labels({"app": "zz"}), o.node_name, o.ips, o.ports, phase="Running")
                )
                c.desired()
                c.delete_pod(o.namespace, o.name)
                c.upsert_pod(o)
            else:
                c.upsert_policy(o)
            if o is shuffled[len(shuffled) // 2]:
                c.upsert_policy(detour)
                c.desired()
        if snap.policies.get(("x", "detour")) is None:
            c.delete_policy("x", "detour")
        assert render_all(c.desired()) == first


def compare_with_reference(snap, states, pairs) -> int:
    """Every (src, dst) pair, both families, every protocol and port: the compiled
    verdict must equal the reference evaluator's; returns how many flows were checked."""
    checked = 0
    for src, dst in pairs:
        for family in (4, 6):
            if _ip(src, family) is None or _ip(dst, family) is None:
                continue
            s = _ip(src, family) if isinstance(src, str) else src
            d = _ip(dst, family) if isinstance(dst, str) else dst
            for protocol, ports in (("TCP", PORTS), ("UDP", PORTS), ("SCTP", (80,))):
                for port in ports:
                    want = ref.allowed(snap, ref.resolve(snap, s, family), ref.resolve(snap, d, family), protocol, port)
                    got, traces = cluster_verdict(states, snap, s, d, protocol, port, family)
                    if got != want:
                        note("\n".join(traces))
                        name = lambda e: e.ref if isinstance(e, Pod) else e  # noqa: E731
                        pytest.fail(
                            f"IPv{family} {protocol} {name(src)} -> {name(dst)}:{port}: "
                            f"compiled={'allow' if got else 'deny'} reference={'allow' if want else 'deny'}\n"
                            + "\n".join(traces)
                        )
                    checked += 1
    return checked


@SETTINGS
@given(cluster_st())
def test_explain_of_compiled_state_matches_reference(objects):
    snap = ClusterSnapshot.of(objects)
    states = {n: compile(snap, CONFIGS[n]) for n in NODES}
    pods = sorted(snap.pods.values(), key=lambda p: p.key)
    pairs = [(a, b) for a in pods for b in pods if a is not b]
    pairs += [(a, e) for a in pods for e in EXTERNAL] + [(e, a) for a in pods for e in EXTERNAL]
    checked = compare_with_reference(snap, states, pairs)
    # The node and its own pods: pod -> node passes the pod's egress policy (the node
    # address is not a pod, so only ipBlocks can allow it when the pod is isolated);
    # node -> pod is never policed (kubelet probes; the NetworkPolicy API text).
    for pod in pods:
        if not pod.ips_of(4):
            continue  # the node addresses here are IPv4
        node_ip = NODE_IPS[pod.node_name]
        want = ref.egress_allows(snap, pod, node_ip, "TCP", 10250)
        e = explain_state_flow(
            states[pod.node_name], snap, pod, "node", "TCP", 10250, node=pod.node_name, node_ips=[node_ip]
        )
        assert e.path.chain == "INPUT"
        assert e.allowed == want, e.render()
        e = explain_state_flow(
            states[pod.node_name], snap, "node", pod, "TCP", 80, node=pod.node_name, node_ips=[node_ip]
        )
        assert e.path.chain == "OUTPUT" and e.allowed, e.render()
    assert checked > 0


# --- the reference evaluator itself, on hand-checked cases --------------------------------


def _pod(ns, name, ip, labels=None, ports=(), node="n1"):
    return Pod(ns, name, Labels(labels or {}), node, (ipaddress.ip_address(ip),), tuple(ports), phase="Running")


def test_reference_hand_cases():
    a = _pod("x", "a", "10.233.0.2", {"app": "a"}, [ContainerPort(8080, Protocol.TCP, "http")])
    b = _pod("x", "b", "10.233.0.3", {"app": "b"})
    c = _pod("y", "c", "10.233.0.4", {"app": "b"})
    ns_y = Namespace("y", Labels({"team": "t", "kubernetes.io/metadata.name": "y"}))
    sel = lambda **kw: LabelSelector(Labels(kw))  # noqa: E731
    allow_b_http = NetworkPolicy(
        "x",
        "p",
        sel(app="a"),
        (PolicyType.INGRESS,),
        ingress=(Rule((PolicyPort(Protocol.TCP, "http"),), (Peer(pod_selector=sel(app="b")),)),),
    )
    snap = ClusterSnapshot.of([a, b, c, ns_y, allow_b_http])
    assert ref.allowed(snap, b, a, "TCP", 8080)
    assert not ref.allowed(snap, b, a, "TCP", 80)  # named port resolves to 8080 only
    assert not ref.allowed(snap, c, a, "TCP", 8080)  # podSelector alone: policy namespace only
    assert ref.allowed(snap, a, b, "TCP", 1)  # b not selected
    assert not ref.allowed(snap, "10.1.1.1", a, "TCP", 8080)
    both = NetworkPolicy(
        "x",
        "q",
        sel(app="a"),
        (PolicyType.INGRESS,),
        ingress=(Rule((), (Peer(pod_selector=sel(app="b"), namespace_selector=sel(team="t")),)),),
    )
    snap2 = ClusterSnapshot.of([a, b, c, ns_y, both])
    assert ref.allowed(snap2, c, a, "UDP", 9) and not ref.allowed(snap2, b, a, "UDP", 9)
    block = NetworkPolicy(
        "x",
        "r",
        LabelSelector(),
        (PolicyType.EGRESS,),
        egress=(
            Rule(
                (PolicyPort(Protocol.TCP, 80, 90),),
                (Peer(ip_block=IPBlock(net("10.233.0.0/24"), (net("10.233.0.4/32"),))),),
            ),
        ),
    )
    snap3 = ClusterSnapshot.of([a, b, c, block])
    assert ref.allowed(snap3, a, b, "TCP", 90) and not ref.allowed(snap3, a, b, "TCP", 91)
    assert not ref.allowed(snap3, a, c, "TCP", 80)  # except
    assert not ref.allowed(snap3, a, b, "UDP", 80)
    deny_all = NetworkPolicy("x", "d", LabelSelector(), (PolicyType.INGRESS, PolicyType.EGRESS))
    snap4 = ClusterSnapshot.of([a, b, c, deny_all])
    assert not ref.allowed(snap4, a, b) and not ref.allowed(snap4, c, a) and ref.allowed(snap4, c, "10.9.9.9")


def test_random_smoke_single_example_runs_fast():
    # A fixed, non-hypothesis example through the same path (keeps a failure easy to reproduce).
    rnd = random.Random(7)
    objs = [
        _pod("x", f"p{i}", f"10.233.0.{i + 2}", {"app": rnd.choice("ab")}, node=rnd.choice(NODES)) for i in range(4)
    ]
    objs.append(
        NetworkPolicy(
            "x",
            "p",
            LabelSelector(Labels({"app": "a"})),
            (PolicyType.INGRESS,),
            ingress=(Rule((), (Peer(pod_selector=LabelSelector(Labels({"app": "b"}))),)),),
        )
    )
    snap = ClusterSnapshot.of(objs)
    states = {n: compile(snap, CONFIGS[n]) for n in NODES}
    for s in snap.pods.values():
        for d in snap.pods.values():
            if s is not d:
                got, _ = cluster_verdict(states, snap, s, d, "TCP", 80, 4)
                assert got == ref.allowed(snap, s, d, "TCP", 80), (s.ref, d.ref)


@SETTINGS
@given(cluster_st(), cluster_st(), st.randoms(use_true_random=False))
def test_incremental_transition_equals_full_compile(before, after, rnd):
    """Load cluster A, then turn it into cluster B by deletes and upserts (in random
    order): the incremental compiler must render exactly what a full compile of B does."""
    snap_a, snap_b = ClusterSnapshot.of(before), ClusterSnapshot.of(after)
    for n in NODES:
        c = Compiler(CONFIGS[n]).load(snap_a)
        c.desired()
        ops = []
        ops += [("dp", k) for k in snap_a.pods if k not in snap_b.pods]
        ops += [("dpol", k) for k in snap_a.policies if k not in snap_b.policies]
        ops += [("dns", k) for k in snap_a.namespaces if k not in snap_b.namespaces]
        ops += [("up", o) for o in after]
        rnd.shuffle(ops)
        for i, (op, x) in enumerate(ops):
            if op == "dp":
                c.delete_pod(*x)
            elif op == "dpol":
                c.delete_policy(*x)
            elif op == "dns":
                c.delete_namespace(x)
            elif isinstance(x, Namespace):
                c.upsert_namespace(x)
            elif isinstance(x, Pod):
                c.upsert_pod(x)
            else:
                c.upsert_policy(x)
            if i % 3 == 0:
                c.desired()
        assert render_all(c.desired()) == render_all(compile(snap_b, CONFIGS[n]))
