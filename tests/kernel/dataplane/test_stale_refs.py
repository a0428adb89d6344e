"""Sweeping stale chains and sets that something else still uses, and hash:net,iface sets,
against the real kernel in a private node namespace (both iptables backends)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.kernel import binary, legacy_available
from policy_agent.desired import ACCEPT, DROP, Action, Chain, DesiredState, Hook, IPSet, Match, Rule
from policy_agent.lab import netns
from policy_agent.shared.naming import ipset_name

pytestmark = pytest.mark.kernel

FW = "pa-fw-test"
A = "pa-po-x.a"
B = "pa-po-x.b"
S = ipset_name(4, "s", "stale-a")
S2 = ipset_name(4, "s", "stale-b")
E4 = ipset_name(4, "e", "anti-spoof")
E6 = ipset_name(6, "e", "anti-spoof")


@pytest.fixture
def node(bare_node):
    return bare_node


def _state(chains: dict[str, Chain], sets: dict[str, IPSet], family: int = 4) -> DesiredState:
    return DesiredState(chains={(family, "filter"): chains}, hooks=(Hook("filter", "FORWARD", FW),), ipsets=sets)


def _set(name: str, *members: str, family: int = 4, type: str = "hash:net") -> IPSet:
    return IPSet(name, family, type, frozenset(members), origin="test")


def _full() -> DesiredState:
    """FORWARD -> pa-fw-test -> A -> B (B matches set S); S2 unused by rules."""
    return _state(
        {
            FW: Chain(FW, (Rule(Match(), Action("JUMP", A)),)),
            A: Chain(A, (Rule(Match(protocol="tcp"), Action("JUMP", B)),)),
            B: Chain(B, (Rule(Match(src_set=S), DROP),)),
        },
        {S: _set(S, "10.233.90.1/32"), S2: _set(S2, "10.233.90.2/32")},
    )


def _small() -> DesiredState:
    return _state({FW: Chain(FW, (Rule(Match(protocol="udp"), ACCEPT),))}, {})


def _save(backend: str, ns: str) -> str:
    return netns.run(ns, binary(backend, 4, "save")).stdout


def _sets(ns: str) -> str:
    return netns.run(ns, "ipset", "list", "-n").stdout


def test_stale_chain_reached_through_a_foreign_chain_is_kept_with_what_it_jumps_to(node):
    backend, ns = node
    dp = Dataplane(netns=ns, backend=backend, families=(4,), retries=2, backoff=0.01)
    dp.apply(_full(), allow_sweep=True)
    netns.run(ns, binary(backend, 4, "restore"), "--noflush",
              input=f"*filter\n:KUBE-X - [0:0]\n-A KUBE-X -j {A}\nCOMMIT\n")
    with capture_logs() as logs:
        report = dp.apply(_small(), allow_sweep=True)  # must not raise
    save = _save(backend, ns)
    assert "-A pa-fw-test -p udp" in save  # the rest of the change is applied
    assert f":{A} " in save and f":{B} " in save  # A (foreign jump) and B (A jumps to it) stay
    assert f"-A KUBE-X -j {A}" in save
    names = _sets(ns).split()
    assert S in names and S2 not in names  # B still matches S; S2 is unused and goes
    assert report.ipsets_destroyed == [S2]
    kept = {e["chain"]: e["referenced_by"] for e in logs if e["event"] == "dataplane_stale_chain_kept"}
    assert kept == {A: ["KUBE-X"], B: [A]}
    with capture_logs() as logs:
        assert dp.apply(_small(), allow_sweep=True).lines_written == 0  # logged once, nothing rewritten
    assert not [e for e in logs if e["event"] == "dataplane_stale_chain_kept"]

    # The foreign jump goes: the next refresh sweeps both chains, then the set.
    netns.run(ns, binary(backend, 4, "restore"), "--noflush", input=f"*filter\n-D KUBE-X -j {A}\nCOMMIT\n")
    report = dp.refresh()
    save = _save(backend, ns)
    assert f":{A} " not in save and f":{B} " not in save and ":KUBE-X " in save
    assert S not in _sets(ns).split()
    assert sorted(report.chains_deleted) == [f"v4:{A}", f"v4:{B}"]


def test_stale_set_in_use_elsewhere_does_not_fail_the_apply_and_is_retried_on_refresh(node):
    backend, ns = node
    dp = Dataplane(netns=ns, backend=backend, families=(4,), retries=2, backoff=0.01)
    dp.apply(_full(), allow_sweep=True)
    # Something we cannot see from iptables uses S (a list:set here; a rule in the other
    # backend does the same): destroying S fails, and ipset restore stops at that line.
    netns.run(ns, "ipset", "restore", input=f"create KUBE-LIST list:set\nadd KUBE-LIST {S}\n")
    stale_later = ipset_name(4, "s", "zz-after")  # sorted after S in the destroy batch
    d = _full()
    dp.apply(DesiredState(d.chains, d.hooks, {**d.ipsets, stale_later: _set(stale_later, "10.233.90.3/32")}),
             allow_sweep=True)
    with capture_logs() as logs:
        report = dp.apply(_small(), allow_sweep=True)  # must not raise
    names = _sets(ns).split()
    assert S in names and S2 not in names and stale_later not in names
    assert sorted(report.ipsets_destroyed) == sorted([S2, stale_later])
    assert any(e["event"] == "dataplane_stale_ipset_kept" and e["ipset"] == S for e in logs)
    assert "-A pa-fw-test -p udp" in _save(backend, ns)
    assert f":{A} " not in _save(backend, ns)

    netns.run(ns, "ipset", "del", "KUBE-LIST", S)
    assert dp.apply(_small(), allow_sweep=True).ipset_lines == 0  # not retried on every apply
    report = dp.refresh()
    assert report.ipsets_destroyed == [S] and S not in _sets(ns).split()
    assert "KUBE-LIST" in _sets(ns).split()


@pytest.mark.skipif(not legacy_available(), reason="no legacy iptables")
def test_stale_set_used_by_a_rule_in_the_other_backend_does_not_fail_the_apply():
    ns = netns.unique_name("dpst", "node")
    netns.create(ns)
    try:
        dp = Dataplane(netns=ns, backend="nft", families=(4,), retries=2, backoff=0.01)
        dp.apply(_full(), allow_sweep=True)
        netns.run(ns, "iptables-legacy-restore", "--noflush",
                  input=f"*filter\n:KUBE-Y - [0:0]\n-A KUBE-Y -m set --match-set {S} src -j DROP\nCOMMIT\n")
        dp.apply(_small(), allow_sweep=True)
        assert S in _sets(ns).split() and S2 not in _sets(ns).split()
        assert "-A pa-fw-test -p udp" in _save("nft", ns)
    finally:
        netns.delete(ns)


def test_hash_net_iface_sets_apply_match_refresh_and_update(node):
    backend, ns = node
    dp = Dataplane(netns=ns, backend=backend, families=(4, 6), retries=2, backoff=0.01)

    def state(m4: tuple[str, ...], m6: tuple[str, ...]) -> DesiredState:
        def chain(name: str) -> Chain:
            return Chain(FW, (Rule(Match(in_iface="eni+", src_iface_set=name, src_iface_set_negate=True), DROP,
                                   comment="anti-spoofing"),))

        return DesiredState(
            chains={(4, "filter"): {FW: chain(E4)}, (6, "filter"): {FW: chain(E6)}},
            hooks=(Hook("filter", "FORWARD", FW),),
            ipsets={E4: _set(E4, *m4, type="hash:net,iface"), E6: _set(E6, *m6, family=6, type="hash:net,iface")},
        )

    d = state(("10.233.1.5/32,eni1234567890a", "10.233.2.0/24,eni1"), ("fd00:233::0005/128,eni1234567890a",))
    report = dp.apply(d, allow_sweep=True)
    assert sorted(report.ipsets_created) == sorted([E4, E6])
    assert f"--match-set {E4} src,src" in _save(backend, ns)

    def member(name: str, m: str) -> bool:
        return netns.run(ns, "ipset", "test", name, m, check=False).returncode == 0

    assert member(E4, "10.233.1.5,eni1234567890a") and member(E4, "10.233.2.7,eni1")
    assert not member(E4, "10.233.1.5,eni1") and not member(E4, "10.233.1.5,ENI1234567890A")
    assert member(E6, "fd00:233::5,eni1234567890a")
    # What ipset save prints ("10.233.1.5,eni...", "fd00:233::5,eni...") reads back equal.
    assert dp.refresh().lines_written == 0

    d2 = state(("10.233.1.6/32,eni1234567890a", "10.233.2.0/24,eni1"), ("fd00:233::5/128,eni1234567890a",))
    report = dp.apply(d2, allow_sweep=True)
    assert report.ipsets_updated == {E4: (1, 1)} and report.iptables_lines == 0
    assert member(E4, "10.233.1.6,eni1234567890a") and not member(E4, "10.233.1.5,eni1234567890a")
    assert dp.refresh().lines_written == 0

    # A member we cannot even parse no longer fails the apply (that wedged the node): it
    # is set aside and reported; the set is written without it (anti-spoofing: fail closed).
    r = dp.apply(state(("10.233.1.6/32,this-name-is-too-long",), ()), allow_sweep=True)
    assert [(x["kind"], x["member"]) for x in r.set_aside] == [("member", "10.233.1.6/32,this-name-is-too-long")]
    assert "interface" in r.set_aside[0]["error"]
    assert not member(E4, "10.233.1.6,eni1234567890a")
