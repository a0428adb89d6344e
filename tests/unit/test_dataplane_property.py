"""Randomized apply sequences through Dataplane over the in-memory FakeKernel.

Whatever happened before (incremental applies with reused or fresh-but-equal objects,
sweeps on or off, refreshes, injected write failures, tampering by someone else), one
final sweep-allowed apply plus a refresh leaves the kernel exactly as a fresh full apply
of the final state into a fresh kernel does; with no failure and no tampering, the final
apply alone does. Foreign chains, rules and sets are never touched.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_agent.lab import specs as s
from policy_agent.dataplane.apply import Dataplane, DataplaneError
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.dataplane.ipsets import parse_ipset_save
from policy_agent.dataplane.iptables import parse_save
from policy_agent.desired import DROP, Chain, DesiredState, IPSet, Match, Rule
from policy_agent.shared.naming import ipset_name

NS = ("x", "y")
POD_NAMES = ("a", "b", "c", "d")
LABELS = ("app=a", "app=b", "role=db")
SPOOF4 = ipset_name(4, "e", "prop")
SPOOF_CHAIN = "pa-as-prop"

FOREIGN_V4 = """*filter
:KUBE-FOO - [0:0]
-A KUBE-FOO -s 10.9.9.9/32 -j DROP
-A FORWARD -m comment --comment "kube foo" -j KUBE-FOO
COMMIT
"""


def _kernel() -> FakeKernel:
    k = FakeKernel()
    k.ipset_restore("create KUBE-SET hash:ip family inet maxelem 65536\nadd KUBE-SET 10.9.9.9\n")
    k.iptables_restore(4, FOREIGN_V4)
    return k


pods = st.builds(
    s.Pod,
    st.sampled_from(NS),
    st.sampled_from(POD_NAMES),
    st.sampled_from([("10.233.1.1",), ("10.233.1.2", "fd00:233::2"), ("10.233.2.3",), ("fd00:233::4",),
                     ("10.233.1.1", "fd00:233::1")]),
    st.frozensets(st.sampled_from(LABELS), max_size=2),
    st.booleans(),
)
peers = st.one_of(st.none(), st.builds(s.Peer, st.one_of(st.none(), st.sampled_from(NS)),
                                       st.one_of(st.none(), st.sampled_from(LABELS))))
rules = st.lists(st.builds(s.PolicyRule, peers, st.lists(st.tuples(st.sampled_from(["tcp", "udp"]),
                                                                   st.sampled_from([53, 80, 443])),
                                                         max_size=2).map(tuple)), max_size=2).map(tuple)
policies = st.builds(
    s.Policy,
    st.sampled_from(NS),
    st.sampled_from(["p1", "p2", "p3"]),
    st.one_of(st.none(), st.sampled_from(LABELS)),
    st.one_of(st.none(), rules),
    st.one_of(st.none(), rules),
)


@st.composite
def states(draw) -> DesiredState:
    ps = {(p.namespace, p.name): p for p in draw(st.lists(pods, max_size=5))}
    pols = {(p.namespace, p.name): p for p in draw(st.lists(policies, max_size=3))}
    d = s.build(list(ps.values()), list(pols.values()))
    if draw(st.booleans()):
        # An anti-spoofing set (hash:net,iface) and a chain using it.
        members = frozenset(f"{ip}/32,{p.iface}" for p in ps.values() if p.local for ip in p.ips if ":" not in ip)
        chains = dict(d.chains)
        chains[(4, "filter")] = {**d.table(4), SPOOF_CHAIN: Chain(SPOOF_CHAIN, (
            Rule(Match(in_iface="eni+", src_iface_set=SPOOF4, src_iface_set_negate=True), DROP, "spoofed"),))}
        d = DesiredState(chains, d.hooks, {**d.ipsets, SPOOF4: IPSet(SPOOF4, 4, "hash:net,iface", members, "prop")},
                         d.endpoints)
    return d


def _reuse(new: DesiredState, old: DesiredState | None) -> DesiredState:
    """As the compiler does: unchanged chains, tables and sets stay the same objects."""
    if old is None:
        return new
    chains = {}
    for key, table in new.chains.items():
        prev = old.chains.get(key, {})
        merged = {n: (prev[n] if n in prev and prev[n] == c else c) for n, c in table.items()}
        chains[key] = prev if merged == prev and prev.keys() == merged.keys() else merged
    sets = {n: (old.ipsets[n] if old.ipsets.get(n) == v else v) for n, v in new.ipsets.items()}
    endpoints = old.endpoints if old.endpoints == new.endpoints else new.endpoints
    return DesiredState(chains, old.hooks if old.hooks == new.hooks else new.hooks, sets, endpoints)


ops = st.one_of(
    st.tuples(st.just("apply"), states(), st.booleans(), st.booleans()),  # state, sweep, reuse objects
    st.tuples(st.just("refresh")),
    st.tuples(st.just("fail"), st.integers(1, 3)),  # the next n restores fail
    # the next restores deleting a chain, destroying a set, replacing a rule... fail
    st.tuples(st.just("fail_on"), st.lists(st.sampled_from(["-X ", "destroy", "-R ", "swap", "-D "]), min_size=1,
                                           max_size=3)),
    st.tuples(st.just("tamper"), st.integers(0, 50)),
)


def _tamper(k: FakeKernel, n: int) -> None:
    """Someone else deletes one of our rules, or one member of one of our sets."""
    ours = [(fam, t, c, i) for fam in (4, 6) for t, chains in k.tables[fam].items()
            for c, (_p, rs) in chains.items() if c.startswith("pa-") for i in range(len(rs))]
    if ours:
        fam, t, c, i = ours[n % len(ours)]
        del k.tables[fam][t][c][1][i]
    sets = [(name, m) for name, v in sorted(k.sets.items()) if name.startswith("pa") for m in sorted(v["members"])]
    if sets and n % 2:
        name, m = sets[n % len(sets)]
        k.sets[name]["members"].discard(m)


def _view(k: FakeKernel) -> tuple:
    """Chains with their rules in order, sets with members; not the order chains or sets
    were created in (the fake, like nft, lists them in creation order)."""
    tables = {
        (fam, t.name): {c.name: (c.policy, [r.spec for r in c.rules]) for c in t.chains.values()}
        for fam in (4, 6)
        for t in parse_save(k.iptables_save(fam)).values()
    }
    sets = {n: (v.type, v.family, v.maxelem, sorted(v.members))
            for n, v in parse_ipset_save(k.ipset_save(), owned_only=False).items()}
    return tables, sets


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(ops, min_size=1, max_size=10), states())
def test_random_apply_sequences_converge_to_a_fresh_full_apply(sequence, final):
    k = _kernel()
    dp = Dataplane(kernel=k, retries=2, backoff=0.0)
    prev: DesiredState | None = None
    disturbed = False
    for op in sequence:
        if op[0] == "apply":
            _, d, sweep, reuse = op
            d = _reuse(d, prev) if reuse else d
            try:
                dp.apply(d, allow_sweep=sweep)
                prev = d
            except DataplaneError:
                disturbed = True
        elif op[0] == "refresh":
            try:
                dp.refresh()
            except DataplaneError:
                disturbed = True
        elif op[0] == "fail":
            k.fail_next = op[1]
            disturbed = True
        elif op[0] == "fail_on":
            k.fail_on = list(op[1])
            disturbed = True
        else:
            _tamper(k, op[1])
            disturbed = True
    k.fail_next, k.fail_on = 0, []

    fresh = _kernel()
    Dataplane(kernel=fresh).apply(final, allow_sweep=True)
    want = _view(fresh)

    dp.apply(_reuse(final, prev), allow_sweep=True)  # must not raise once the kernel takes writes
    if not disturbed:
        assert _view(k) == want
    dp.refresh()
    assert _view(k) == want
    assert dp.refresh().lines_written == 0
