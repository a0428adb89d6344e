"""Failure isolation against the fake kernel: one object the kernel refuses is set
aside, everything else is applied, nothing is widened, and it heals.

States come from the real compiler; the poison (a member, a set, a chain the kernel
refuses) is put in by hand, as edge validation keeps it out of the model path.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import replace

import pytest
from helpers.desired_fixtures import ALLOW_WEB, DENY_Y, compile_cluster, pod, set_of, with_members, with_set
from structlog.testing import capture_logs

from policy_agent.dataplane.apply import Dataplane, DataplaneError
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.dataplane.ipsets import desired_members
from policy_agent.dataplane.iptables import parse_save
from policy_agent.desired import Action, Chain, DesiredState, Match, Rule
from policy_agent.model.types import (
    IPBlock,
    LabelSelector,
    Labels,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyType,
)
from policy_agent.model.types import Rule as PRule
from policy_agent.shared import naming

PODS = [
    pod("x", "a", "10.233.1.1", "fd00:233::1", web=True),
    pod("x", "b", "10.233.1.2", "fd00:233::2"),
    pod("y", "c", "10.233.1.3", "fd00:233::3"),
    pod("y", "d", "10.233.9.4", node="node-2"),
]


def block(*excepts: str) -> NetworkPolicy:
    return NetworkPolicy(
        "x", "allow-block", LabelSelector(Labels({"app": "b"})), (PolicyType.INGRESS,),
        ingress=(PRule((), (Peer(ip_block=IPBlock(ipaddress.ip_network("10.0.0.0/8"),
                                                  tuple(ipaddress.ip_network(e) for e in excepts))),)),),
    )


def compiled(*policies: NetworkPolicy, pods=PODS) -> DesiredState:
    return compile_cluster(pods, policies)


def kernel_chains(k: FakeKernel, family: int = 4) -> dict[str, list[str]]:
    t = parse_save(k.iptables_save(family)).get("filter")
    return {n: [r.hash for r in c.rules] for n, c in t.owned().items()} if t else {}


def assert_programmed(k: FakeKernel, d: DesiredState, except_chains=(), family: int = 4) -> None:
    have = kernel_chains(k, family)
    for name, c in d.table(family).items():
        if name not in except_chains:
            assert have.get(name) == list(c.hashes), name


def tw(p: Pod) -> str:
    return naming.to_workload_chain(naming.veth_name("eni", p.namespace, p.name))


def test_no_failure_keeps_the_fast_path():
    k = FakeKernel()
    r = Dataplane(kernel=k).apply(compiled(ALLOW_WEB, DENY_Y))
    assert [kind for kind, _ in k.restores] == ["ipset", "iptables", "iptables"] and not k.failed
    assert r.restore_calls == 3 and not r.set_aside and not r.degraded and r.isolation_restores == 0


def test_poison_member_is_left_out_and_everything_else_applies():
    k = FakeKernel()
    dp = Dataplane(kernel=k)
    dp.apply(compiled(ALLOW_WEB), allow_sweep=True)
    d = compiled(ALLOW_WEB, DENY_Y)  # a later default-deny in another namespace
    named = set_of(d, "n")
    poisoned = with_members(d, named, "0.0.0.0,tcp:80")
    with capture_logs() as logs:
        r = dp.apply(poisoned, allow_sweep=True)
    assert r.degraded
    assert r.set_aside == [{"kind": "member", "name": named.name, "member": "0.0.0.0,tcp:80", "family": 4,
                            "origin": named.origin, "error": r.set_aside[0]["error"]}]
    assert "Invalid argument" in r.set_aside[0]["error"] or "zero address" in r.set_aside[0]["error"]
    assert [e for e in logs if e["event"] == "dataplane_set_aside"][0]["name"] == named.name
    assert_programmed(k, d)
    assert_programmed(k, d, family=6)
    assert tw(PODS[2]) in kernel_chains(k) and naming.policy_chain("y", "deny-all", "ingress") in kernel_chains(k)
    assert k.sets[named.name]["members"] == desired_members(named)  # every other member, not the poison
    assert all(k.sets[n]["members"] == desired_members(s) for n, s in d.ipsets.items())
    # bisection: a handful of restores, not one per member
    assert r.isolation_restores <= 12

    # Remembered: the same state again runs no process and fails nothing.
    n_ok, n_failed = len(k.restores), len(k.failed)
    with capture_logs() as logs:
        r2 = dp.apply(poisoned, allow_sweep=True)
    assert r2.lines_written == 0 and len(k.restores) == n_ok and len(k.failed) == n_failed
    assert r2.set_aside == r.set_aside
    assert not [e for e in logs if e["event"] == "dataplane_set_aside"]  # logged once per (name, error)

    # A refresh retries it (still refused), then the fixed input heals.
    assert dp.refresh().set_aside == r.set_aside and len(k.failed) > n_failed
    healed = dp.apply(d, allow_sweep=True)
    assert not healed.set_aside and not healed.degraded
    assert dp.apply(d).lines_written == 0


def test_unparseable_member_is_set_aside_too():
    k = FakeKernel()
    d = compiled(ALLOW_WEB)
    peers = set_of(d, "s")
    r = Dataplane(kernel=k).apply(with_members(d, peers, "10.0.0.300/32"))
    assert [(x["kind"], x["member"]) for x in r.set_aside] == [("member", "10.0.0.300/32")]
    assert "cannot parse" in r.set_aside[0]["error"]
    assert_programmed(k, d)


def test_anti_spoofing_member_refused_fails_closed():
    k = FakeKernel()
    d = compiled(ALLOW_WEB)
    local = set_of(d, "e")
    r = Dataplane(kernel=k).apply(with_members(d, local, "0.0.0.0/32,eni456b416f2bf"))
    assert [x["kind"] for x in r.set_aside] == ["member"]
    # The address is not in the anti-spoofing set: what it sends is dropped as spoofed.
    assert k.sets[local.name]["members"] == desired_members(local)
    assert_programmed(k, d)


def test_refused_nomatch_sets_the_whole_set_aside_and_keeps_the_old_rules():
    k = FakeKernel()
    dp = Dataplane(kernel=k)
    v1 = compiled(ALLOW_WEB, block("10.1.0.0/16"))
    dp.apply(v1, allow_sweep=True)
    old_blk = set(k.sets[set_of(v1, "b").name]["members"])
    pol = naming.policy_chain("x", "allow-block", "ingress")
    b_tw = tw(PODS[1])
    # v2 changes the block and adds a default-deny elsewhere; one except is refused.
    v2 = compiled(ALLOW_WEB, DENY_Y, block("10.2.0.0/16"))
    blk = set_of(v2, "b")
    poisoned = with_members(v2, blk, "0.0.0.0/0 nomatch")
    r = dp.apply(poisoned, allow_sweep=True)
    kinds = {(x["kind"], x["name"]) for x in r.set_aside}
    assert ("ipset", blk.name) in kinds and ("member", blk.name) not in kinds
    assert "10.2.0.0/16" in blk.origin or blk.origin  # origin names the policy's block
    # Never widened: a refused except is not dropped; the set keeps its old version...
    if blk.name == set_of(v1, "b").name:
        assert k.sets[blk.name]["members"] == old_blk
    else:
        assert blk.name not in k.sets
    # ...and so do the chains that reference it (the policy chain; the pod's tw chain
    # only if it changed), with the old rules still enforcing.
    assert kernel_chains(k)[pol] == list(v1.table(4)[pol].hashes)
    assert ("chain", pol) in kinds
    # everything else is applied: the default-deny in y lands
    assert_programmed(k, v2, except_chains={pol, b_tw})
    assert naming.policy_chain("y", "deny-all", "ingress") in kernel_chains(k)
    # the sweep did not remove what is set aside
    assert pol in kernel_chains(k)
    # heal
    r = dp.apply(v2, allow_sweep=True)
    assert not r.set_aside
    assert_programmed(k, v2)
    assert k.sets[blk.name]["members"] == desired_members(blk)


def kernel_targets(k: FakeKernel, chain: str, family: int = 4) -> list[str]:
    return [r.target for r in parse_save(k.iptables_save(family))["filter"].chains[chain].rules]


def test_pods_behind_a_set_aside_policy_are_isolated_with_nothing_from_it():
    """Review finding: endpoint chains used to be set aside with the policy, keeping an old
    (possibly open) version and holding back every other change of the pod. Now they are
    written without the jump: the policy allows nothing, the pod stays isolated by it."""
    k = FakeKernel()
    dp = Dataplane(kernel=k)
    dp.apply(compiled(DENY_Y), allow_sweep=True)
    newpod = pod("x", "e", "10.233.1.5", web=False)
    d = compiled(DENY_Y, block("10.3.0.0/16"), pods=[*PODS, replace(newpod, labels=Labels({"app": "b"}))])
    blk = set_of(d, "b")
    pol = naming.policy_chain("x", "allow-block", "ingress")
    r = dp.apply(with_members(d, blk, "10.0.0.0/0 nomatch"), allow_sweep=True)
    e_tw = naming.to_workload_chain(naming.veth_name("eni", "x", "e"))
    b_tw = tw(PODS[1])
    aside = {x["name"] for x in r.set_aside if x["kind"] == "chain"}
    assert aside == {pol}
    for ch in (e_tw, b_tw):
        targets = kernel_targets(k, ch)
        assert pol not in targets and targets[-1] == "DROP", (ch, targets)  # isolated, nothing allowed
    disp = parse_save(k.iptables_save(4))["filter"].chains
    targets = {r.target for c in disp.values() if c.name.startswith("pa-to-wl-dispatch") for r in c.rules}
    assert e_tw in targets and b_tw in targets
    assert_programmed(k, d, except_chains={pol, e_tw, b_tw})


def test_poison_chain_is_set_aside_its_pods_stay_isolated_and_it_heals():
    k = FakeKernel()
    dp = Dataplane(kernel=k)
    d = compiled(ALLOW_WEB, DENY_Y)
    pol = naming.policy_chain("x", "allow-web", "ingress")
    c = d.table(4)[pol]
    bad = Chain(pol, c.rules + (Rule(Match(protocol="tcp", dst_ports=((70000, 70000),)), Action("ACCEPT"), "x/allow-web bad"),))
    chains = {**d.chains, (4, "filter"): {**d.table(4), pol: bad}}
    r = dp.apply(replace(d, chains=chains), allow_sweep=True)
    by = {x["name"]: x for x in r.set_aside}
    assert by[pol]["kind"] == "chain" and "port" in by[pol]["error"] and by[pol]["origin"].startswith("x/allow-web")
    a_tw = tw(PODS[0])
    assert a_tw not in by  # rewritten, not held back
    have = kernel_chains(k)
    assert pol not in have and a_tw in have
    targets = kernel_targets(k, a_tw)
    assert pol not in targets and targets[-1] == "DROP"
    assert_programmed(k, d, except_chains={pol, a_tw})
    assert_programmed(k, d, family=6)
    r = dp.apply(d, allow_sweep=True)
    assert not r.set_aside
    assert_programmed(k, d)


def test_a_set_aside_admin_tier_chain_becomes_a_drop_never_a_skip():
    """A ClusterNetworkPolicy tier chain may deny: leaving its jump out would widen."""
    k = FakeKernel()
    dp = Dataplane(kernel=k)
    d = compiled(ALLOW_WEB, DENY_Y)
    a_tw = tw(PODS[0])
    ep = d.table(4)[a_tw]
    tier = "pa-ai-guard"
    tier_chain = Chain(tier, (Rule(Match(protocol="tcp", dst_ports=((70000, 70000),)), Action("DROP"), "admin tier guard"),))
    ep2 = Chain(a_tw, ep.rules[:1] + (Rule(Match(), Action("JUMP", tier), "admin tier guard"),) + ep.rules[1:])
    chains = {**d.chains, (4, "filter"): {**d.table(4), a_tw: ep2, tier: tier_chain}}
    r = dp.apply(replace(d, chains=chains), allow_sweep=True)
    assert {x["name"] for x in r.set_aside if x["kind"] == "chain"} == {tier}
    targets = kernel_targets(k, a_tw)
    assert tier not in targets and targets[1] == "DROP"


def test_systemic_failure_is_not_blamed_on_objects():
    k = FakeKernel()
    dp = Dataplane(kernel=k, backoff=0.001, retries=3)
    k.fail_next = 1000
    with pytest.raises(DataplaneError):
        dp.apply(compiled(ALLOW_WEB))
    assert not dp._aside_sets and not dp._aside_members and not dp._aside_chains


def test_bisection_cost_is_logarithmic():
    k = FakeKernel()
    d = compiled(ALLOW_WEB)
    peers = set_of(d, "s")
    many = replace(peers, members=frozenset(f"10.234.{i // 250}.{i % 250 + 1}/32" for i in range(2000)) | {"0.0.0.0/0"})
    r = Dataplane(kernel=k).apply(with_set(d, many))
    assert [x["member"] for x in r.set_aside] == ["0.0.0.0/0"]
    assert len(k.sets[peers.name]["members"]) == 2000
    assert r.isolation_restores <= 2 * math.ceil(math.log2(2001)) + 10


def test_state_file_uses_the_shared_atomic_write(tmp_path):
    import json
    import os

    path = tmp_path / "dataplane.json"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    # The old writer used "<path>.tmp<pid>": a symlink planted there must not be followed.
    os.symlink(victim, f"{path}.tmp{os.getpid()}")
    Dataplane(kernel=FakeKernel(), state_path=str(path)).apply(compiled(ALLOW_WEB))
    assert victim.read_text() == "keep"
    doc = json.loads(path.read_text())
    assert set(doc["ipsets"]) == set(compiled(ALLOW_WEB).ipsets)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_refused_member_of_a_set_a_deny_rule_matches_sets_the_whole_set_aside():
    """Review finding: peer sets are shared with ClusterNetworkPolicy Deny rules, where one
    member fewer lets more through. Such a set is set aside whole, never thinned."""
    k = FakeKernel()
    dp = Dataplane(kernel=k)
    d = compiled(ALLOW_WEB, DENY_Y)
    named = set_of(d, "n")
    a_tw = tw(PODS[0])
    tier = "pa-ai-guard"
    guard = Chain(tier, (Rule(Match(dst_ipport_set=named.name), Action("DROP"), "admin tier guard: Deny"),))
    ep = d.table(4)[a_tw]
    ep2 = Chain(a_tw, ep.rules[:1] + (Rule(Match(), Action("JUMP", tier), "admin tier guard"),) + ep.rules[1:])
    d = replace(d, chains={**d.chains, (4, "filter"): {**d.table(4), a_tw: ep2, tier: guard}})
    r = dp.apply(with_members(d, named, "0.0.0.0,tcp:80"), allow_sweep=True)
    kinds = {(x["kind"], x["name"]) for x in r.set_aside}
    assert ("ipset", named.name) in kinds and ("member", named.name) not in kinds
    assert ("chain", tier) in kinds  # it matches the set-aside set
    assert kernel_targets(k, a_tw)[1] == "DROP"  # the absent deny tier fails closed
