"""Sweeping stale chains/sets that something else still uses (fake kernel + pure planner)."""

from __future__ import annotations

from structlog.testing import capture_logs

from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.dataplane.iptables import parse_save, plan_table
from policy_agent.desired import ACCEPT, Action, Chain, DesiredState, Hook, IPSet, Match, Rule
from policy_agent.shared.naming import ipset_name

S = ipset_name(4, "s", "sweep")


def _state(with_policy: bool) -> DesiredState:
    fw = Chain("pa-fw", (Rule(Match(), Action("JUMP", "pa-po-a")),) if with_policy else (Rule(Match(), ACCEPT),))
    chains = {"pa-fw": fw}
    sets = {}
    if with_policy:
        chains["pa-po-a"] = Chain("pa-po-a", (Rule(Match(src_set=S), Action("JUMP", "pa-po-b")),))
        chains["pa-po-b"] = Chain("pa-po-b", (Rule(Match(protocol="tcp"), ACCEPT),))
        sets = {S: IPSet(S, 4, "hash:net", frozenset({"10.233.0.1/32"}))}
    return DesiredState({(4, "filter"): chains}, (Hook("filter", "FORWARD", "pa-fw"),), sets)


def _chains(k: FakeKernel) -> set[str]:
    return set(parse_save(k.iptables_save(4))["filter"].chains)


def test_planner_keeps_stale_chains_reached_from_surviving_rules_only():
    kernel = parse_save(
        "*filter\n:FORWARD ACCEPT [0:0]\n:KUBE-X - [0:0]\n:pa-a - [0:0]\n:pa-b - [0:0]\n:pa-c - [0:0]\n:pa-d - [0:0]\n"
        '-A FORWARD -m comment --comment "pa:AAAAAAAAAAAAAAAA" -j pa-c\n'  # our stale hook: deleted with it
        "-A KUBE-X -j pa-a\n-A pa-a -j pa-b\n-A pa-c -j pa-d\nCOMMIT\n"
    )["filter"]
    plan = plan_table("filter", {}, (), kernel, sweep=True)
    assert plan.kept_referenced == {"pa-a": ["KUBE-X"], "pa-b": ["pa-a"]}
    assert sorted(plan.deleted) == ["pa-c", "pa-d"]
    assert "-X pa-a" not in plan.lines and "-X pa-c" in plan.lines


def test_foreign_jump_that_appeared_after_the_cache_costs_one_retry_and_keeps_the_chain():
    k = FakeKernel()
    dp = Dataplane(kernel=k, families=(4,), retries=3, backoff=0.0)
    dp.apply(_state(True), allow_sweep=True)
    k.iptables_restore(4, "*filter\n:KUBE-X - [0:0]\n-A KUBE-X -j pa-po-a\nCOMMIT\n")
    with capture_logs() as logs:
        report = dp.apply(_state(False), allow_sweep=True)
    assert report.attempts == 2  # the cache did not know KUBE-X; the re-read does
    assert {"pa-po-a", "pa-po-b", "KUBE-X"} <= _chains(k) and S in k.sets
    kept = {e["chain"]: e.get("referenced_by") for e in logs if e["event"] == "dataplane_stale_chain_kept"}
    assert kept == {"pa-po-a": ["KUBE-X"], "pa-po-b": ["pa-po-a"]}
    assert not [e for e in logs if e["event"] == "dataplane_chain_sweep_deferred"]


def test_failing_chain_delete_is_deferred_until_refresh_and_the_rest_applies():
    k = FakeKernel()
    dp = Dataplane(kernel=k, families=(4,), retries=2, backoff=0.0)
    dp.apply(_state(True), allow_sweep=True)
    dp.invalidate()  # the next plan is made from a fresh read
    k.fail_on = ["-X "]  # something we cannot see makes the chain delete fail
    with capture_logs() as logs:
        dp.apply(_state(False), allow_sweep=True)
    assert any(e["event"] == "dataplane_chain_sweep_deferred" for e in logs)
    rules = parse_save(k.iptables_save(4))["filter"].chains["pa-fw"].rules
    assert [r.target for r in rules] == ["ACCEPT"]  # the change itself is in
    assert {"pa-po-a", "pa-po-b"} <= _chains(k)
    assert dp.apply(_state(False), allow_sweep=True).lines_written == 0  # no retry on every apply
    report = dp.refresh()
    assert sorted(report.chains_deleted) == ["v4:pa-po-a", "v4:pa-po-b"] and report.ipsets_destroyed == [S]
    assert not {"pa-po-a", "pa-po-b"} & _chains(k) and S not in k.sets


def test_failing_set_destroy_never_fails_the_apply():
    k = FakeKernel()
    dp = Dataplane(kernel=k, families=(4,), retries=1, backoff=0.0)
    dp.apply(_state(True), allow_sweep=True)
    k.fail_on = ["destroy", "destroy"]  # the batch, then the one-by-one retry
    with capture_logs() as logs:
        report = dp.apply(_state(False), allow_sweep=True)
    assert report.ipsets_destroyed == [] and S in k.sets
    assert [e["ipset"] for e in logs if e["event"] == "dataplane_stale_ipset_kept"] == [S]
    assert dp.refresh().ipsets_destroyed == [S] and S not in k.sets
