"""The compiler's caches and indexes for the 50k-pod targets (docs/decisions/compiler-50k-incremental.md)
stay equal to what they cache: after random event sequences (pods local and remote,
namespaces, NetworkPolicy and ClusterNetworkPolicy adds, updates and deletes) the
incremental state equals a full compile, chains come out sorted, earlier desired
states are never modified, and every index equals a recomputation from scratch."""

from __future__ import annotations

import gc
import ipaddress
import random

import pytest
from test_compiler_evaluator import assert_well_formed, make_ns, make_pod, make_policy, node_config, peer, port, rule, sel
from test_compiler_incremental import NAMESPACES, gen_ns, gen_pod, gen_policy

from policy_agent.compiler import Compiler, compile
from policy_agent.compiler.scopes import ScopeDef, _host_member, _ip_text, selector_matches
from policy_agent.desired import render_ipset_restore, render_iptables_save
from policy_agent.model.types import (
    ClusterNetworkPolicy,
    ClusterSnapshot,
    CNPAction,
    CNPPeer,
    CNPPort,
    CNPRule,
    CNPTier,
    LabelSelector,
    Labels,
    Protocol,
)


def gen_cnp(rng: random.Random, i: int) -> ClusterNetworkPolicy:
    """Subject: one namespace (or a team); ingress from a team's pods (named port or
    tcp/80), egress to a team's namespaces: both create namespace-selector scopes."""
    team = LabelSelector(Labels({"team": rng.choice(("x", "y"))}))
    subject = (LabelSelector(Labels({"kubernetes.io/metadata.name": rng.choice(NAMESPACES)}))
               if rng.random() < 0.6 else team)
    pods = LabelSelector(Labels({"app": rng.choice(("a", "b"))}))
    ports = (CNPPort(named_port="http"),) if rng.random() < 0.3 else (CNPPort(Protocol.TCP, 80, 80),)
    return ClusterNetworkPolicy(
        f"cnp{i}", rng.choice((CNPTier.ADMIN, CNPTier.BASELINE)), rng.randrange(5),
        subject_namespaces=subject, subject_pods=LabelSelector(Labels({})),
        ingress=(CNPRule(rng.choice((CNPAction.ACCEPT, CNPAction.DENY, CNPAction.PASS)), "in",
                         (CNPPeer("pods", namespace_selector=team, pod_selector=pods),), ports),),
        egress=(CNPRule(CNPAction.DENY, "out", (CNPPeer("namespaces", namespace_selector=team),)),),
    )


def _objects(c: Compiler):
    return [*c.namespaces.values(), *c.pods.values(), *c.policies.values(), *c.cluster_policies.values()]


def _check_indexes(c: Compiler) -> None:
    """Every cache equals a recomputation from the objects."""
    by_ns: dict = {}
    for key, pod in c.pods.items():
        by_ns.setdefault(pod.namespace, {})[key] = pod.labels.plain()
    assert c._pods_by_ns == by_ns
    assert c._ns_unknown == {n for n in by_ns if n not in c.namespaces}
    for ns, postings in c._postings.items():
        assert ns in by_ns, f"postings kept for {ns}, which has no pod"
        for (k, v), keys in postings.items():
            assert keys == {key for key, labels in by_ns[ns].items() if labels.get(k) == v}, (ns, k, v)
    # every live scope holds exactly the members a scope built now would
    fresh = Compiler(c.node)
    fresh.load(ClusterSnapshot.of(_objects(c)))
    for d, st in c._scopes.items():
        ref = fresh._create_scope(d) if d not in fresh._scopes else fresh._scopes[d]
        assert st.pod_members == ref.pod_members, d.ident
        assert st.counts == ref.counts, d.ident
        # a namespace whose pods all left may stay matched (it adds nothing)
        assert st.matched_ns & by_ns.keys() == ref.matched_ns & by_ns.keys(), d.ident


@pytest.mark.parametrize("seed", range(25))
def test_incremental_caches_equal_full_compile_after_random_changes(seed):
    rng = random.Random(1000 + seed)
    node = node_config()
    c = Compiler(node)
    objs = [gen_ns(rng, n) for n in NAMESPACES if rng.random() < 0.8]
    objs += [gen_pod(rng, i) for i in range(10)] + [gen_policy(rng, i) for i in range(4)]
    if rng.random() < 0.5:
        c.load(ClusterSnapshot.of(objs))  # the bulk path, then events
    else:
        rng.shuffle(objs)
        for o in objs:
            {"Namespace": c.upsert_namespace, "Pod": c.upsert_pod, "NetworkPolicy": c.upsert_policy}[type(o).__name__](o)
    handed_out = []  # (desired state, copies of its tables and sets when it was returned)
    for step in range(70):
        r = rng.random()
        if r < 0.3:
            c.upsert_pod(gen_pod(rng, rng.randrange(14)))
        elif r < 0.4 and c.pods:
            c.delete_pod(*rng.choice(sorted(c.pods)))
        elif r < 0.5:
            c.upsert_namespace(gen_ns(rng, rng.choice(NAMESPACES)))
        elif r < 0.53:
            c.delete_namespace(rng.choice(NAMESPACES))
        elif r < 0.75:
            c.upsert_policy(gen_policy(rng, rng.randrange(6)))  # adds and updates
        elif r < 0.82 and c.policies:
            c.delete_policy(*rng.choice(sorted(c.policies)))
        elif r < 0.95:
            c.upsert_cluster_policy(gen_cnp(rng, rng.randrange(3)))
        elif c.cluster_policies:
            c.delete_cluster_policy(rng.choice(sorted(c.cluster_policies)))
        if step % 5 == 4 or step == 69:
            inc = c.desired()
            full = compile(ClusterSnapshot.of(_objects(c)), node)
            assert inc == full, f"seed {seed} step {step}"
            if not c.cluster_policies:  # with them, pa-cnp-accept/-pass exist even if no rule goes there
                assert_well_formed(inc)
            for f in (4, 6):
                table = inc.table(f)
                assert list(table) == sorted(table), "chains must come out sorted"
                assert render_iptables_save(inc, f) == render_iptables_save(full, f)
            assert render_ipset_restore(inc) == render_ipset_restore(full)
            _check_indexes(c)
            handed_out.append((inc, {k: dict(t) for k, t in inc.chains.items()}, dict(inc.ipsets)))
    for state, tables, sets in handed_out:
        assert {k: dict(t) for k, t in state.chains.items()} == tables, "a handed-out desired state changed"
        assert dict(state.ipsets) == sets


def _team_policy(name: str, team: str, app: str = "a"):
    return make_policy(name, ns="ns0", pod_selector=sel({"app": app}),
                       ingress=[rule([peer(pods=sel({"tier": "a"}), nss=sel({"team": team}))], [port(80, "TCP")])],
                       types=["Ingress"])


def _small_cluster(c: Compiler) -> None:
    for i, team in enumerate(("x", "y", "x")):
        c.upsert_namespace(make_ns(f"ns{i}", team=team))
    for i in range(6):
        c.upsert_pod(make_pod(f"p{i}", ns=f"ns{i % 3}", ips=(f"10.233.0.{i + 1}",),
                              labels={"app": "a", "tier": "a"}, node="node-1" if i < 2 else "node-2"))


def test_policy_update_keeps_a_scope_both_versions_use():
    c = Compiler(node_config())
    _small_cluster(c)
    c.upsert_policy(_team_policy("np", "x"))
    c.desired()
    d = ScopeDef(None, sel({"team": "x"}), sel({"tier": "a"}))
    before = c._scopes[d]
    ipset_before = c.desired().ipsets[d.set_name(4)]
    # same peer, another port: the scope is the same object, and so is its ipset
    upd = make_policy("np", ns="ns0", pod_selector=sel({"app": "a"}),
                      ingress=[rule([peer(pods=sel({"tier": "a"}), nss=sel({"team": "x"}))], [port(81, "TCP")])],
                      types=["Ingress"])
    c.upsert_policy(upd)
    assert c._scopes[d] is before and before.refs == 1
    assert c.desired().ipsets[d.set_name(4)] is ipset_before
    # a different team: the old scope goes, the new one is filled
    c.upsert_policy(_team_policy("np", "y"))
    assert d not in c._scopes
    assert c.desired() == compile(ClusterSnapshot.of(_objects(c)), c.node)


def test_scope_created_again_reads_kept_postings_that_followed_pod_events():
    c = Compiler(node_config())
    _small_cluster(c)
    d = ScopeDef(None, sel({"team": "x"}), sel({"tier": "a"}))
    c.upsert_policy(_team_policy("np", "x"))
    c.delete_policy("ns0", "np")
    assert d not in c._scopes and ("tier", "a") in c._postings["ns2"]
    # pods change while no scope needs the posting: relabelled, added, deleted
    c.upsert_pod(make_pod("p2", ns="ns2", ips=("10.233.0.3",), labels={"app": "a", "tier": "b"}, node="node-2"))
    c.upsert_pod(make_pod("p9", ns="ns2", ips=("10.233.0.10",), labels={"app": "a", "tier": "a"}, node="node-2"))
    c.delete_pod("ns0", "p3")
    c.upsert_policy(_team_policy("np", "x"))
    members = c.desired().ipsets[d.set_name(4)].members
    assert members == {"10.233.0.1/32", "10.233.0.6/32", "10.233.0.10/32"}
    assert c.desired() == compile(ClusterSnapshot.of(_objects(c)), c.node)


def test_member_dicts_stay_tracked_by_the_collector():
    # An untracked dict tracked again by one insert lands in the young generation whole.
    c = Compiler(node_config())
    _small_cluster(c)
    c.upsert_policy(_team_policy("np", "x"))
    c.desired()
    gc.collect()
    assert gc.is_tracked(c._plain_members)
    assert all(gc.is_tracked(st.pod_members) for st in c._scopes.values())


@pytest.mark.parametrize("text", [
    "::", "::1", "1::", "1:0:1:1:1:1:1:1", "1:0:0:1:0:0:1:1", "0:0:1::", "fd00:233::1:2", "::ffff:1.2.3.4",
    "::1.2.3.4", "::ffff:0:1.2.3.4", "64:ff9b::1.2.3.4", "fe80::1%eth0", "1:0:0:0:1:0:0:0", "::1:0:0",
    "2001:db8:0:0:1:0:0:1", "10.0.0.1", "0.0.0.0",
])
def test_host_member_is_the_text_str_gives(text):
    ip = ipaddress.ip_address(text)
    assert _ip_text(ip) == str(ip)
    assert _host_member(ip) == f"{ip}/{ip.max_prefixlen}"


def test_host_member_random_ipv6_addresses():
    rng = random.Random(5)
    for _ in range(20000):
        n = 0
        for _ in range(8):
            n = (n << 16) | rng.choice((0, 0, 0, 1, 0xFFFF, rng.randrange(65536)))
        ip = ipaddress.IPv6Address(n)
        assert _host_member(ip) == f"{ip}/128"


def test_selector_lookup_through_postings_matches_the_selector():
    c = Compiler(node_config())
    _small_cluster(c)
    pods = c._pods_by_ns["ns0"]
    for selector in (sel({"app": "a"}), sel({"app": "a", "tier": "b"}), sel({"app": "a"}, tier=("In", ["a"])),
                     sel(tier=("Exists",)), sel({})):
        got = sorted(c._matching("ns0", selector, pods))
        assert got == sorted(k for k, labels in pods.items() if selector_matches(selector, labels))
