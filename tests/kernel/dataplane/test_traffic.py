"""Policies enforced on real TCP/UDP traffic, on both backends; foreign state survives."""

from __future__ import annotations

import pytest

from policy_agent.lab import specs as s
from policy_agent.dataplane.apply import Dataplane

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def allow_to_a(*peers: str) -> s.Policy:
    rules = tuple(s.PolicyRule(s.Peer("x", f"app={p}"), (("tcp", 80), ("udp", 81))) for p in peers)
    return s.Policy("x", "allow-to-a", "app=a", ingress=rules)


def test_apply_update_delete_with_real_traffic(lab, tmp_path):
    foreign = lab.foreign()
    assert lab.can("c", "a", 80) and lab.can("b", "a", 81, "UDP")  # open before any policy
    dp = Dataplane(netns=lab.node, backend=lab.backend, state_path=str(tmp_path / "state.json"))

    r = dp.apply(s.build(lab.all_pods(), [allow_to_a("b")]))
    assert r.changed
    assert lab.can("b", "a", 80)
    assert lab.can("b", "a", 81, "UDP")
    assert not lab.can("b", "a", 81, timeout=0.5)
    assert not lab.can("b", "a", 80, "UDP", timeout=0.5)
    assert not lab.can("c", "a", 80, timeout=0.5)
    assert lab.can("b", "a", 80, family=6)
    assert not lab.can("c", "a", 80, family=6, timeout=0.5)
    assert lab.can("a", "c", 81)  # c is not isolated; replies to a flow through conntrack
    assert lab.foreign() == foreign

    # update: c joins the allowed peers
    r = dp.apply(s.build(lab.all_pods(), [allow_to_a("b", "c")]))
    assert r.changed and r.ipset_lines > 0
    assert lab.can("c", "a", 80) and lab.can("c", "a", 80, family=6)
    assert not lab.can("c", "a", 81, timeout=0.5)
    assert lab.foreign() == foreign

    # delete: the policy goes; stale chain and sets are swept once "in sync"
    r = dp.apply(s.build(lab.all_pods(), []), allow_sweep=True)
    assert "v4:pa-pi-x.allow-to-a" in r.chains_deleted and r.ipsets_destroyed
    assert lab.can("c", "a", 81) and lab.can("b", "a", 80, "UDP")
    assert "pa-pi-" not in lab.save(4) and "pa4s-" not in lab.ipset_save()
    assert lab.foreign() == foreign
    assert dp.apply(s.build(lab.all_pods(), [])).lines_written == 0


def test_tampering_is_repaired_by_refresh(lab):
    dp = Dataplane(netns=lab.node, backend=lab.backend)
    d = s.build(lab.all_pods(), [allow_to_a("b")])
    dp.apply(d, allow_sweep=True)
    assert lab.can("b", "a", 80) and not lab.can("c", "a", 80, timeout=0.5)
    from policy_agent.lab import netns

    peer_set = next(n for n, x in d.ipsets.items() if x.family == 4 and n.startswith("pa4s"))  # allow-to-a's peers
    tw = "pa-tw-" + lab.pod("a").iface
    netns.run(lab.node, "ipset", "del", peer_set, lab.ips["b"][0])
    assert not lab.can("b", "a", 80, timeout=0.5)  # the tampering took effect
    r = dp.refresh()
    assert r.ipsets_updated == {peer_set: (1, 0)} and r.iptables_lines == 0
    assert lab.can("b", "a", 80)

    restore = "ip" + "tables-" + lab.backend + "-restore"
    netns.run(lab.node, restore, "--noflush", input=f"*filter\n-F {tw}\n-D INPUT 1\n-A INPUT -j pa-INPUT\nCOMMIT\n")
    assert lab.can("c", "a", 80)  # the tampering opened a hole
    r = dp.refresh()
    assert f"v4:{tw}" in r.chains_rewritten and "v4:filter:INPUT" in r.hooks_repaired and r.ipset_lines == 0
    assert lab.can("b", "a", 80) and not lab.can("c", "a", 80, timeout=0.5)
    assert lab.save(4).count("-j pa-INPUT") == 1
    assert dp.refresh().lines_written == 0


def test_cleanup_leaves_tables_as_found(lab):
    before = lab.snapshot()
    dp = Dataplane(netns=lab.node, backend=lab.backend)
    dp.apply(s.build(lab.all_pods(), [allow_to_a("b", "c")]), allow_sweep=True)
    assert lab.snapshot() != before
    dp.cleanup()
    assert lab.snapshot() == before
    assert lab.can("c", "a", 81)
