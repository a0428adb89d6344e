"""Incremental Compiler == full compile, after random event sequences; and the
verdicts implied by the desired state agree with an independent reference
evaluator of NetworkPolicy semantics (hypothesis)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_compiler_evaluator import (
    NODE,
    allowed,
    assert_well_formed,
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
)

from policy_agent.compiler import Compiler, compile
from policy_agent.compiler.scopes import eligible
from policy_agent.desired import render_ipset_restore, render_iptables_save
from policy_agent.model.types import MATCH_ALL, ClusterSnapshot, Labels, PolicyType

NAMESPACES = ("ns0", "ns1", "ns2")
LABEL_KEYS = ("app", "tier")
LABEL_VALUES = ("a", "b")
NAMED = ("http", "alt")
EXTERNAL = ("10.233.200.7", "192.0.2.9", "fd00:233::ff07")


def _labels(rng: random.Random) -> dict:
    return {k: rng.choice(LABEL_VALUES) for k in LABEL_KEYS if rng.random() < 0.6}


def _selector(rng: random.Random):
    r = rng.random()
    if r < 0.2:
        return MATCH_ALL
    if r < 0.7:
        return sel(_labels(rng) or {"app": "a"})
    key = rng.choice(LABEL_KEYS)
    op = rng.choice(["In", "NotIn", "Exists", "DoesNotExist"])
    spec = (op, rng.sample(LABEL_VALUES, rng.randint(1, 2))) if op in ("In", "NotIn") else (op,)
    return sel(**{key: spec})


def gen_ns(rng: random.Random, name: str):
    labels = {"team": rng.choice(("x", "y"))} if rng.random() < 0.7 else {}
    return make_ns(name, **labels)


def gen_pod(rng: random.Random, i: int):
    ns = rng.choice(NAMESPACES)
    ips = (f"10.233.0.{i + 1}",) + ((f"fd00:233::{i + 1:x}",) if rng.random() < 0.5 else ())
    ports = []
    for name in NAMED:
        if rng.random() < 0.4:
            ports.append((rng.choice((80, 81)), rng.choice(("TCP", "TCP", "UDP")), name))
    phase = "Succeeded" if rng.random() < 0.05 else "Running"
    return make_pod(f"p{i}", ns=ns, ips=ips, labels=_labels(rng), node=rng.choice((NODE, NODE, "node-2")),
                    ports=ports, phase=phase)


def _peer(rng: random.Random):
    r = rng.random()
    if r < 0.35:
        return peer(pods=_selector(rng))
    if r < 0.55:
        return peer(nss=sel({"team": rng.choice(("x", "y"))}) if rng.random() < 0.7 else MATCH_ALL)
    if r < 0.75:
        return peer(pods=_selector(rng), nss=sel({"team": rng.choice(("x", "y"))}))
    if rng.random() < 0.8:
        return peer(cidr="10.233.0.0/24", excepts=rng.choice(([], ["10.233.0.0/29"], ["10.233.0.8/30"])))
    return peer(cidr=rng.choice(("fd00:233::/64", "0.0.0.0/0", "192.0.2.0/24")))


def _port(rng: random.Random):
    r = rng.random()
    if r < 0.35:
        return port(rng.choice((80, 81)), rng.choice(("TCP", "UDP")))
    if r < 0.5:
        return port(80, "TCP", end=81)
    if r < 0.75:
        return port(rng.choice(NAMED), rng.choice(("TCP", "TCP", "UDP")))
    return port(None, rng.choice(("TCP", "UDP", "SCTP")))


def _rules(rng: random.Random):
    out = []
    for _ in range(rng.randint(0, 2)):
        peers = [_peer(rng) for _ in range(rng.randint(0, 2))]
        ports = [_port(rng) for _ in range(rng.randint(0, 2))]
        out.append(rule(peers, ports))
    return out


def gen_policy(rng: random.Random, i: int):
    types = rng.choice((["Ingress"], ["Egress"], ["Ingress", "Egress"]))
    return make_policy(
        f"np{i}", ns=rng.choice(NAMESPACES), pod_selector=_selector(rng),
        ingress=_rules(rng) if "Ingress" in types or rng.random() < 0.2 else None,
        egress=_rules(rng) if "Egress" in types or rng.random() < 0.2 else None,
        types=types,
    )


def gen_cluster(rng: random.Random, npods: int = 10, npols: int = 5):
    objs = [gen_ns(rng, n) for n in NAMESPACES if rng.random() < 0.9]
    objs += [gen_pod(rng, i) for i in range(npods)]
    objs += [gen_policy(rng, i) for i in range(npols)]
    return objs


# --- incremental == full --------------------------------------------------------------------


def _current_objects(c: Compiler):
    return [*c.namespaces.values(), *c.pods.values(), *c.policies.values()]


@pytest.mark.parametrize("seed", range(40))
def test_incremental_equals_full_compile_after_random_changes(seed):
    rng = random.Random(seed)
    node = node_config()
    c = Compiler(node)
    objs = gen_cluster(rng, npods=8, npols=4)
    rng.shuffle(objs)  # any arrival order, policies before pods included
    for o in objs:
        {"Namespace": c.upsert_namespace, "Pod": c.upsert_pod, "NetworkPolicy": c.upsert_policy}[type(o).__name__](o)
    for step in range(60):
        r = rng.random()
        if r < 0.3:
            c.upsert_pod(gen_pod(rng, rng.randrange(12)))  # add or replace (labels, node, ips, ports change)
        elif r < 0.4:
            key = rng.choice(sorted(c.pods)) if c.pods else None
            if key:
                c.delete_pod(*key)
        elif r < 0.55:
            c.upsert_namespace(gen_ns(rng, rng.choice(NAMESPACES)))
        elif r < 0.6:
            c.delete_namespace(rng.choice(NAMESPACES))
        elif r < 0.85:
            c.upsert_policy(gen_policy(rng, rng.randrange(7)))
        else:
            key = rng.choice(sorted(c.policies)) if c.policies else None
            if key:
                c.delete_policy(*key)
        if step % 6 == 5 or step == 59:
            inc = c.desired()
            full = compile(ClusterSnapshot.of(_current_objects(c)), node)
            assert inc == full, f"seed {seed} step {step}"
            assert_well_formed(inc)
            for f in (4, 6):
                assert render_iptables_save(inc, f) == render_iptables_save(full, f)
            assert render_ipset_restore(inc) == render_ipset_restore(full)


def test_remote_pod_label_change_touches_only_the_sets_it_moves_between():
    rng = random.Random(7)
    web = make_pod("web", labels={"app": "web"})
    pol_a = make_policy("pa", pod_selector=sel({"app": "web"}), ingress=[rule([peer(pods=sel({"role": "a"}))])])
    pol_b = make_policy("pb", pod_selector=sel({"app": "web"}), ingress=[rule([peer(pods=sel({"role": "b"}))])])
    pol_c = make_policy("pc", pod_selector=sel({"app": "web"}), ingress=[rule([peer(nss=sel({"team": "z"}))])])
    c = Compiler(node_config())
    for o in [make_ns("default"), web, pol_a, pol_b, pol_c] + [gen_pod(rng, i) for i in range(20, 30)]:
        (c.upsert_pod if o.__class__.__name__ == "Pod" else
         c.upsert_policy if o.__class__.__name__ == "NetworkPolicy" else c.upsert_namespace)(o)
    client = make_pod("client", ips=("10.233.0.99",), labels={"role": "a"}, node="node-2")
    c.upsert_pod(client)
    before = c.desired()
    c.upsert_pod(make_pod("client", ips=("10.233.0.99",), labels={"role": "b"}, node="node-2"))
    after = c.desired()
    changed = {n for n in set(before.ipsets) | set(after.ipsets) if before.ipsets.get(n) != after.ipsets.get(n)}
    assert {before.ipsets[n].origin for n in changed} == {
        "pods matching role=a in namespace default", "pods matching role=b in namespace default"}
    for key, table in after.chains.items():
        for name, chain in table.items():
            assert before.chains[key][name] is chain  # not even rebuilt


def test_namespace_label_change_updates_namespace_selector_sets():
    web = make_pod("web", labels={"app": "web"})
    other = make_pod("o", ns="other", ips=("10.233.0.50",), node="node-2")
    pol = make_policy("p", pod_selector=sel({"app": "web"}), ingress=[rule([peer(nss=sel({"team": "z"}))])])
    c = Compiler(node_config())
    for o in (make_ns("default"), make_ns("other"), web, other, pol):
        (c.upsert_pod if o.__class__.__name__ == "Pod" else
         c.upsert_policy if o.__class__.__name__ == "NetworkPolicy" else c.upsert_namespace)(o)
    assert not allowed(pod_to_pod(c.desired(), other, web))
    c.upsert_namespace(make_ns("other", team="z"))
    assert allowed(pod_to_pod(c.desired(), other, web))
    c.delete_namespace("other")  # back to the implicit name label only
    assert not allowed(pod_to_pod(c.desired(), other, web))


# --- reference semantics -------------------------------------------------------------------


class Reference:
    """NetworkPolicy v1 as the API documents it, with no iptables in sight."""

    def __init__(self, objs):
        self.ns = {o.name: o for o in objs if type(o).__name__ == "Namespace"}
        self.policies = [o for o in objs if type(o).__name__ == "NetworkPolicy"]

    def ns_labels(self, name):
        ns = self.ns.get(name)
        return ns.labels if ns else Labels({"kubernetes.io/metadata.name": name})

    def _peer_ok(self, pol, p, other, other_ip):
        if p.ip_block is not None:
            return p.ip_block.contains(other_ip)
        if other is None or not eligible(other):
            return False
        if p.namespace_selector is None:
            ns_ok = other.namespace == pol.namespace
        else:
            ns_ok = p.namespace_selector.matches(self.ns_labels(other.namespace))
        return ns_ok and (p.pod_selector or MATCH_ALL).matches(other.labels)

    @staticmethod
    def _port_ok(pp, proto, dport, dst_pod):
        if pp.protocol.lower != proto:
            return False
        if pp.port is None:
            return True
        if isinstance(pp.port, int):
            return pp.port <= dport <= (pp.end_port or pp.port)
        return dst_pod is not None and any(
            cp.name == pp.port and cp.protocol == pp.protocol and cp.port == dport for cp in dst_pod.ports)

    def direction_ok(self, target, ptype, other, other_ip, proto, dport, dst_pod):
        pols = [p for p in self.policies if p.namespace == target.namespace and p.governs(ptype)
                and p.pod_selector.matches(target.labels)]
        if not pols:
            return True
        for p in pols:
            for r in p.ingress if ptype is PolicyType.INGRESS else p.egress:
                if r.peers and not any(self._peer_ok(p, x, other, other_ip) for x in r.peers):
                    continue
                if r.ports and not any(self._port_ok(pp, proto, dport, dst_pod) for pp in r.ports):
                    continue
                return True
        return False


PROBES = (("tcp", 80), ("tcp", 81), ("udp", 80), ("sctp", 80))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2**32))
def test_verdicts_agree_with_reference_semantics(seed):
    rng = random.Random(seed)
    objs = gen_cluster(rng, npods=8, npols=rng.randint(1, 5))
    state = compile(ClusterSnapshot.of(objs), node_config())
    assert_well_formed(state)
    again = compile(ClusterSnapshot.of(list(reversed(objs))), node_config())
    assert render_iptables_save(state, 4) + render_iptables_save(state, 6) == \
        render_iptables_save(again, 4) + render_iptables_save(again, 6)
    ref = Reference(objs)
    pods = [o for o in objs if type(o).__name__ == "Pod" and eligible(o)]
    ING, EGR = PolicyType.INGRESS, PolicyType.EGRESS
    checked = 0
    for src in pods:
        for dst in pods:
            if src is dst:
                continue
            src_local, dst_local = src.node_name == NODE, dst.node_name == NODE
            if not (src_local or dst_local):
                continue
            for fam in (4, 6):
                if not (src.ips_of(fam) and dst.ips_of(fam)):
                    continue
                sip, dip = src.ips_of(fam)[0], dst.ips_of(fam)[0]
                for proto, dport in PROBES:
                    want = True
                    if src_local:
                        want &= ref.direction_ok(src, EGR, dst, dip, proto, dport, dst)
                    if dst_local:
                        want &= ref.direction_ok(dst, ING, src, sip, proto, dport, dst)
                    got = allowed(pod_to_pod(state, src, dst, family=fam, proto=proto, dport=dport))
                    assert got == want, (src.ref, dst.ref, fam, proto, dport)
                    checked += 1
        for ext in EXTERNAL:
            import ipaddress

            eip = ipaddress.ip_address(ext)
            if src.node_name != NODE or not src.ips_of(eip.version):
                continue
            for proto, dport in PROBES:
                want_out = ref.direction_ok(src, EGR, None, eip, proto, dport, None)
                assert allowed(pod_to_external(state, src, ext, proto=proto, dport=dport)) == want_out
                want_in = ref.direction_ok(src, ING, None, eip, proto, dport, src)
                assert allowed(external_to_pod(state, ext, src, proto=proto, dport=dport)) == want_in


def test_local_endpoints_set_follows_local_pods():
    """The anti-spoofing set gains and loses (address, interface) pairs as local pods come
    and go; a remote pod or a policy change leaves the very same set object."""
    from policy_agent.shared import naming

    name = naming.ipset_name(4, "e", "local-endpoints")
    c = Compiler(node_config())
    c.upsert_namespace(make_ns("default"))
    assert c.desired().ipsets[name].members == frozenset()
    a = make_pod("a", ips=("10.233.0.1",), labels={"app": "a"})
    c.upsert_pod(a)
    s1 = c.desired().ipsets[name]
    assert s1.members == {f"10.233.0.1/32,{iface_of(a)}"}
    c.upsert_pod(make_pod("r", ips=("10.233.0.2",), node="node-2"))  # remote
    c.upsert_policy(make_policy("p", pod_selector=sel({"app": "a"}), ingress=[]))  # selects a: its chains change
    c.upsert_pod(make_pod("a", ips=("10.233.0.1",), labels={"app": "a", "v": "2"}))  # labels only
    assert c.desired().ipsets[name] is s1
    c.upsert_pod(make_pod("a", ips=("10.233.0.1", "10.233.0.5")))  # a second address
    assert c.desired().ipsets[name].members == {f"10.233.0.1/32,{iface_of(a)}", f"10.233.0.5/32,{iface_of(a)}"}
    c.upsert_pod(make_pod("a", ips=("10.233.0.1",), node="node-2"))  # moved away
    assert c.desired().ipsets[name].members == frozenset()
    c.upsert_pod(a)
    c.delete_pod("default", "a")
    assert c.desired().ipsets[name].members == frozenset()
    assert c.desired() == compile(ClusterSnapshot.of(_current_objects(c)), node_config())
