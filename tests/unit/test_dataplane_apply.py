"""Dataplane apply/refresh/sweep/cleanup against the in-memory fake kernel."""

from __future__ import annotations

import pytest

from policy_agent.lab import specs as s
from policy_agent.dataplane.apply import Dataplane, DataplaneError
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.dataplane.iptables import parse_save
from policy_agent.dataplane.ipsets import parse_ipset_save

A = s.Pod("x", "a", ("10.233.1.1", "fd00:233::1"), frozenset({"app=a"}), local=True)
B = s.Pod("x", "b", ("10.233.1.2", "fd00:233::2"), frozenset({"app=b"}), local=True)
C = s.Pod("x", "c", ("10.233.9.3",), frozenset({"app=b"}))  # remote
ALLOW_B_TO_A = s.Policy("x", "allow-b", "app=a", ingress=(s.PolicyRule(s.Peer("x", "app=b"), (("tcp", 80),)),))
EGRESS_B = s.Policy("x", "b-dns", "app=b", egress=(s.PolicyRule(None, (("udp", 53),)),))

FOREIGN_V4 = """*filter
:KUBE-FOO - [0:0]
-A KUBE-FOO -s 10.9.9.9/32 -j DROP
-A FORWARD -m comment --comment "kube foo" -j KUBE-FOO
COMMIT
"""


def kernel_with_foreign() -> FakeKernel:
    k = FakeKernel()
    k.ipset_restore("create KUBE-SET hash:ip family inet maxelem 65536\nadd KUBE-SET 10.9.9.9\n")
    k.iptables_restore(4, FOREIGN_V4)
    k.restores.clear()
    return k


def ours(k: FakeKernel, family: int = 4) -> dict[str, list[str | None]]:
    t = parse_save(k.iptables_save(family)).get("filter")
    return {n: [r.hash for r in c.rules] for n, c in t.owned().items()} if t else {}


def foreign(k: FakeKernel) -> tuple:
    t = parse_save(k.iptables_save(4))["filter"]
    rules = [(c.name, r.spec) for c in t.chains.values() for r in c.rules if not r.ours]
    return rules, {n: v for n, v in k.sets.items() if not n.startswith("pa")}


def state(*policies, pods=(A, B, C)):
    return s.build(list(pods), list(policies))


def test_apply_from_empty_then_nothing_changed_writes_nothing():
    k = kernel_with_foreign()
    before = foreign(k)
    dp = Dataplane(kernel=k)
    d = state(ALLOW_B_TO_A)
    r = dp.apply(d)
    assert r.changed and r.iptables_lines > 0 and r.ipset_lines > 0
    want = {name: list(c.hashes) for name, c in d.table(4).items()}
    assert ours(k) == want
    assert ours(k, 6) == {name: list(c.hashes) for name, c in d.table(6).items()}
    # hooks at the top of the built-in chains, foreign rule after ours
    fwd = parse_save(k.iptables_save(4))["filter"].chains["FORWARD"].rules
    assert fwd[0].target == "pa-FORWARD" and fwd[1].target == "KUBE-FOO"
    n = len(k.restores)
    r2 = dp.apply(d)
    assert r2.lines_written == 0 and len(k.restores) == n
    assert foreign(k) == before


def test_restart_with_same_state_writes_nothing_and_keeps_counters():
    k = FakeKernel()
    d = state(ALLOW_B_TO_A)
    Dataplane(kernel=k).apply(d)
    k.bump(4, packets=5)
    n = len(k.restores)
    r = Dataplane(kernel=k).apply(d, allow_sweep=True)
    assert r.lines_written == 0 and len(k.restores) == n
    t = parse_save(k.iptables_save(4))["filter"]
    assert all(r.packets == 5 for c in t.owned().values() for r in c.rules)


def test_policy_change_rewrites_only_changed_chains_and_keeps_counters_before_the_change():
    k = FakeKernel()
    dp = Dataplane(kernel=k)
    dp.apply(state(ALLOW_B_TO_A))
    k.bump(4, packets=3)
    r = dp.apply(state(ALLOW_B_TO_A, EGRESS_B))
    b_fw = "pa-fw-" + B.iface
    assert set(r.chains_rewritten) == {f"v4:{b_fw}", f"v6:{b_fw}"}
    assert {"v4:pa-po-x.b-dns", "v6:pa-po-x.b-dns"} <= set(r.chains_created)
    t = parse_save(k.iptables_save(4))["filter"]
    # the leading rule of b's egress chain (clear the accept mark) was not rewritten:
    # its counter survives; "no policy: allow" became jump/return/deny
    assert [x.packets for x in t.chains[b_fw].rules] == [3, 0, 0, 0]
    assert all(x.packets == 3 for x in t.chains["pa-tw-" + A.iface].rules)
    assert ours(k) == {n: list(c.hashes) for n, c in state(ALLOW_B_TO_A, EGRESS_B).table(4).items()}


def test_remote_pod_added_changes_only_ipset_membership():
    k = FakeKernel()
    dp = Dataplane(kernel=k)
    dp.apply(state(ALLOW_B_TO_A, pods=(A, B)))
    r = dp.apply(state(ALLOW_B_TO_A, pods=(A, B, C)))
    assert r.iptables_lines == 0 and r.ipset_lines == 1
    assert any("10.233.9.3" in m for v in k.sets.values() for m in v["members"])


def test_stale_chains_and_sets_go_only_with_sweep_and_sets_after_rules():
    k = kernel_with_foreign()
    before = foreign(k)
    dp = Dataplane(kernel=k)
    dp.apply(state(ALLOW_B_TO_A))
    r = dp.apply(state())  # policy deleted, not yet in sync
    assert r.chains_deleted == [] and "pa-pi-x.allow-b" in ours(k)
    stale = {n for n in k.sets if n.startswith("pa")} - set(state().ipsets)  # the policy's peer sets
    assert stale
    r = dp.sweep()
    assert "v4:pa-pi-x.allow-b" in r.chains_deleted and "pa-pi-x.allow-b" not in ours(k)
    assert sorted(r.ipsets_destroyed) == sorted(stale)
    assert {n for n in k.sets if n.startswith("pa")} == set(state().ipsets)  # the endpoint sets stay
    assert foreign(k) == before
    assert dp.apply(state()).lines_written == 0


def test_refresh_repairs_tampering_and_logs_it():
    from structlog.testing import capture_logs

    k = kernel_with_foreign()
    dp = Dataplane(kernel=k)
    d = state(ALLOW_B_TO_A)
    dp.apply(d, allow_sweep=True)
    tw = "pa-tw-" + A.iface
    sname = next(n for n in d.ipsets if n.startswith("pa4s"))  # the peer set of allow-b
    k.iptables_restore(4, f"*filter\n-D {tw} 4\n-I INPUT 1 -s 10.9.9.9/32 -j ACCEPT\n"
                          f"-I FORWARD 1 -m comment --comment \"pa:5Yrji0R6_7DNSg9r\" -m comment --comment \"policy-agent hook\" -j pa-FORWARD\n"
                          ":pa-junk - [0:0]\nCOMMIT\n")
    k.ipset_restore(f"del {sname} 10.233.1.2\nadd {sname} 10.233.7.7\n")
    assert dp.apply(d).lines_written == 0  # apply trusts its cache; refresh reads back
    with capture_logs() as logs:
        r = dp.refresh()
    assert r.changed
    assert f"v4:{tw}" in r.chains_rewritten and "v4:filter:INPUT" in r.hooks_repaired and "v4:filter:FORWARD" in r.hooks_repaired
    assert "v4:pa-junk" in r.chains_deleted and r.ipsets_updated == {sname: (1, 1)}
    assert any(e["event"] == "dataplane_repaired" for e in logs)
    assert ours(k) == {n: list(c.hashes) for n, c in d.table(4).items()}
    t = parse_save(k.iptables_save(4))["filter"]
    assert [x.target for x in t.chains["FORWARD"].rules] == ["pa-FORWARD", "KUBE-FOO"]
    assert [x.target for x in t.chains["INPUT"].rules] == ["pa-INPUT", "ACCEPT"]  # ours back on top
    assert k.sets[sname]["members"] == {"10.233.1.2", "10.233.9.3"}
    assert dp.refresh().lines_written == 0


def test_write_failures_retry_then_raise_without_half_programmed_tables():
    k = kernel_with_foreign()
    dp = Dataplane(kernel=k, backoff=0.001)
    k.fail_next = 2
    r = dp.apply(state(ALLOW_B_TO_A))
    # attempt 1 fails; isolation's canary fails too (so nothing is blamed on an object
    # and nothing set aside); attempt 2 applies everything.
    assert r.attempts == 2 and ours(k) and not r.set_aside
    snapshot = k.iptables_save(4)
    k.fail_next = 100
    with pytest.raises(DataplaneError):
        dp.apply(state(ALLOW_B_TO_A, EGRESS_B))
    assert k.iptables_save(4) == snapshot


def test_bad_desired_state_is_refused_with_names():
    bad = state(ALLOW_B_TO_A)
    broken = type(bad)(chains=bad.chains, hooks=bad.hooks, ipsets={}, endpoints=bad.endpoints)
    with pytest.raises(ValueError, match="matches ipset pa4[es]-"):
        Dataplane(kernel=FakeKernel()).apply(broken)


def test_cleanup_removes_ours_only():
    k = kernel_with_foreign()
    before_ipt, before_sets = k.iptables_save(4), dict(k.sets)
    dp = Dataplane(kernel=k)
    dp.apply(state(ALLOW_B_TO_A, EGRESS_B))
    dp.cleanup()
    assert k.iptables_save(4) == before_ipt
    assert k.sets.keys() == before_sets.keys()
    assert ours(k, 6) == {}


def test_ipset_metadata_change_rebuilds_by_swap():
    k = FakeKernel()
    d = state(ALLOW_B_TO_A)
    Dataplane(kernel=k, maxelem=1000).apply(d)
    r = Dataplane(kernel=k, maxelem=2000).apply(d)
    assert r.ipsets_swapped and r.iptables_lines == 0
    sets = parse_ipset_save(k.ipset_save())
    assert {x.maxelem for x in sets.values()} == {2000}
    assert not [n for n in sets if n[3] == "t"]  # temp sets gone


def test_a_background_check_waits_while_an_event_is_applied():
    """Dataplane.checks_held: the check's parsing never runs beside an apply (nesting counted)."""
    import time

    from policy_agent.dataplane.apply import _DriftCheck

    dp = Dataplane(kernel=kernel_with_foreign())
    dp.apply(state(ALLOW_B_TO_A))
    with dp.checks_held():
        with dp.checks_held():
            check = _DriftCheck(dp.kernel, dp.families, 1, dp._sets, dp._ipt, threaded=True, pause=dp._pause_check)
        time.sleep(0.3)
        assert not check.done.is_set(), "the check ran while an apply held it"
    assert check.done.wait(5) and check.error is None and not check.differs
