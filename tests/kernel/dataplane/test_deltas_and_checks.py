"""Set changes written as their difference (IPSet.derived) and background drift checks
(Dataplane.check_start / check_poll), against the real kernel in a private node
namespace, both iptables backends (issue 13: an event costs what changed, and a
refresh never holds the agent's loop for a full read-back)."""

from __future__ import annotations

import time

import pytest
from structlog.testing import capture_logs

from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.kernel import binary
from policy_agent.desired import ACCEPT, Chain, DesiredState, Hook, IPSet, Match, Rule
from policy_agent.lab import netns
from policy_agent.shared.naming import ipset_name

pytestmark = pytest.mark.kernel

FW = "pa-fw-delta"
S4 = ipset_name(4, "s", "delta-v4")
S6 = ipset_name(6, "s", "delta-v6")


@pytest.fixture
def node(bare_node):
    return bare_node


def _state(s4: IPSet, s6: IPSet | None = None) -> DesiredState:
    chains = {(4, "filter"): {FW: Chain(FW, (Rule(Match(src_set=s4.name, protocol="tcp"), ACCEPT),
                                               Rule(Match(protocol="udp"), ACCEPT)))}}
    sets = {s4.name: s4}
    if s6 is not None:
        chains[(6, "filter")] = {FW: Chain(FW, (Rule(Match(src_set=s6.name), ACCEPT),))}
        sets[s6.name] = s6
    return DesiredState(chains=chains, hooks=(Hook("filter", "FORWARD", FW),), ipsets=sets)


def _members(ns: str, name: str) -> set[str]:
    out = netns.run(ns, "ipset", "save", name).stdout
    return {ln.split(" ", 2)[2] for ln in out.splitlines() if ln.startswith("add ")}


def _hosts(n: int, base: str = "10.61") -> frozenset[str]:
    return frozenset(f"{base}.{i // 250}.{i % 250 + 1}/32" for i in range(n))


def test_a_derived_set_is_written_as_its_change_and_ends_equal(node):
    backend, ns = node
    v1 = IPSet(S4, 4, "hash:net", _hosts(3000), "test")
    v6 = IPSet(S6, 6, "hash:net", frozenset({"fd00:61::1/128", "fd00:61::2/128"}), "test")
    dp = Dataplane(netns=ns, backend=backend)
    dp.apply(_state(v1, v6))
    v2 = IPSet.derived(v1, {"10.62.0.1/32", "10.62.0.2/32"}, {"10.61.0.1/32"})
    v6b = IPSet.derived(v6, {"fd00:61::3/128"}, {"fd00:61::1/128"})
    rep = dp.apply(_state(v2, v6b))
    # the change alone: 2 adds + 1 del in v4, 1 + 1 in v6; no swap, no full rewrite
    assert rep.ipsets_updated == {S4: (2, 1), S6: (1, 1)}
    assert rep.ipset_lines == 5 and not rep.ipsets_swapped
    assert _members(ns, S4) == {m[:-3] for m in v2.members}
    assert _members(ns, S6) == {"fd00:61::2", "fd00:61::3"}


def test_a_change_of_a_version_the_kernel_never_got_is_compared_in_full(node):
    """v3 is derived from v2, which was never applied: its base is not what the kernel
    holds, so the whole set is compared (a delta against v1 would lose v2's change)."""
    backend, ns = node
    v1 = IPSet(S4, 4, "hash:net", _hosts(50), "test")
    dp = Dataplane(netns=ns, backend=backend)
    dp.apply(_state(v1))
    v2 = IPSet.derived(v1, {"10.62.0.1/32"}, {"10.61.0.1/32"})
    v3 = IPSet.derived(v2, {"10.62.0.2/32"}, set())
    rep = dp.apply(_state(v3))
    assert rep.ipsets_updated == {S4: (2, 1)}
    assert _members(ns, S4) == {m[:-3] for m in v3.members}


def test_two_spellings_of_one_address_never_lose_it_to_a_change(node):
    """A set holding one address twice (two spellings) is not one to one with its
    kernel form: removing one spelling must keep the address (the full path decides)."""
    backend, ns = node
    v1 = IPSet(S4, 4, "hash:net", frozenset({"10.61.0.1/32", "10.61.0.1", "10.61.0.2/32"}), "test")
    v6 = IPSet(S6, 6, "hash:net", frozenset({"fd00:61::1/128"}), "test")
    dp = Dataplane(netns=ns, backend=backend)
    dp.apply(_state(v1, v6))
    assert _members(ns, S4) == {"10.61.0.1", "10.61.0.2"}
    v2 = IPSet.derived(v1, set(), {"10.61.0.1"})
    v6b = IPSet.derived(v6, {"FD00:61::1/128"}, set())  # the same address, spelled anew
    dp.apply(_state(v2, v6b))
    v6c = IPSet.derived(v6b, set(), {"fd00:61::1/128"})  # one spelling goes, the address stays
    dp.apply(_state(v2, v6c))
    assert _members(ns, S4) == {"10.61.0.1", "10.61.0.2"}
    assert _members(ns, S6) == {"fd00:61::1"}


def test_tampering_between_applies_is_not_hidden_by_a_change(node):
    """Someone deletes a member; our next change is written as a delta (the cache is
    trusted between refreshes), and the next drift check finds and repairs the loss."""
    backend, ns = node
    v1 = IPSet(S4, 4, "hash:net", _hosts(100), "test")
    dp = Dataplane(netns=ns, backend=backend)
    dp.apply(_state(v1), allow_sweep=True)
    netns.run(ns, "ipset", "del", S4, "10.61.0.5")
    v2 = IPSet.derived(v1, {"10.62.0.1/32"}, set())
    dp.apply(_state(v2), allow_sweep=True)
    assert dp.check_start()
    with capture_logs() as logs:
        rep = _poll(dp)
    assert rep.changed and rep.ipsets_updated == {S4: (1, 0)}
    assert any(e["event"] == "dataplane_drift_found" for e in logs)
    assert _members(ns, S4) == {m[:-3] for m in v2.members}


def _poll(dp: Dataplane, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rep = dp.check_poll()
        if rep is not None:
            return rep
        time.sleep(0.01)
    raise AssertionError("drift check did not end")


def test_a_clean_check_writes_nothing_and_our_own_writes_meanwhile_are_not_drift(node):
    backend, ns = node
    v1 = IPSet(S4, 4, "hash:net", _hosts(2000), "test")
    dp = Dataplane(netns=ns, backend=backend)
    dp.apply(_state(v1), allow_sweep=True)
    assert dp.check_start()
    with capture_logs() as logs:
        rep = _poll(dp)
    assert not rep.changed and not any(e["event"] == "dataplane_drift_found" for e in logs)
    # An apply while the check reads: whichever version the check saw, it is ours.
    assert dp.check_start()
    v2 = IPSet.derived(v1, {"10.62.0.1/32"}, {"10.61.0.7/32"})
    state2 = _state(v2)
    chains = dict(state2.chains[(4, "filter")])
    chains[FW] = Chain(FW, chains[FW].rules + (Rule(Match(protocol="icmp"), ACCEPT),))
    state2 = DesiredState(chains={(4, "filter"): chains}, hooks=state2.hooks, ipsets=state2.ipsets)
    assert dp.apply(state2, allow_sweep=True).changed
    with capture_logs() as logs:
        rep = _poll(dp)
    assert not rep.changed and not any(e["event"] == "dataplane_drift_found" for e in logs)


def test_a_check_finds_a_deleted_rule_and_a_foreign_hook_and_the_refresh_repairs_them(node):
    backend, ns = node
    v1 = IPSet(S4, 4, "hash:net", _hosts(10), "test")
    dp = Dataplane(netns=ns, backend=backend)
    state = _state(v1)
    dp.apply(state, allow_sweep=True)
    ipt = f"iptables-{backend}"
    netns.run(ns, ipt, "-D", FW, "2")
    netns.run(ns, ipt, "-I", "FORWARD", "1", "-p", "sctp", "-j", "DROP")  # above our hook
    assert dp.check_start()
    with capture_logs() as logs:
        rep = _poll(dp)
    assert rep.changed and any(e["event"] == "dataplane_drift_found" for e in logs)
    save = netns.run(ns, binary(backend, 4, "save")).stdout
    assert save.count(f"-A {FW} ") == 2
    forward = [ln for ln in save.splitlines() if ln.startswith("-A FORWARD")]
    assert f"-j {FW}" in forward[0]
    # and the next check is clean
    assert dp.check_start()
    assert not _poll(dp).changed


def test_no_background_check_while_something_is_set_aside(node):
    """A refresh retries what the kernel refused: with anything set aside, check_start
    declines and the caller runs the full refresh."""
    backend, ns = node
    bad = IPSet(S4, 4, "hash:net", frozenset({"10.61.0.1/32", "10.61.0.0/0"}), "test")
    dp = Dataplane(netns=ns, backend=backend)
    rep = dp.apply(_state(bad), allow_sweep=True)
    assert rep.degraded
    assert not dp.check_start()
