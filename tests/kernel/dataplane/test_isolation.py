"""Failure isolation on the real kernel (both iptables backends): a member, a set or
a chain that ipset/iptables-restore refuses is set aside, everything else reaches
the kernel, and real traffic shows a default-deny elsewhere enforced.

States come from the real compiler; the poison is added by hand (edge validation
keeps it out of the model path). Lab: a node netns, pods x/a, x/b, y/c behind
veths named as the compiler names them; addresses in 10.233.0.0/16, fd00:233::/64.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from helpers.desired_fixtures import ALLOW_WEB, DENY_Y, compile_cluster, pod, set_of, with_members
from helpers.kernel_lab import backends, node_with_pods

from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.iptables import parse_save
from policy_agent.dataplane.ipsets import desired_members, parse_ipset_save
from policy_agent.dataplane.kernel import binary
from policy_agent.desired import Action, Chain, DesiredState, IPSet, Match, Rule
from policy_agent.lab import netns
from policy_agent.model.types import IPBlock, LabelSelector, Labels, NetworkPolicy, Peer, PolicyType
from policy_agent.model.types import Rule as PRule
from policy_agent.shared import naming

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
PODS = {("x", "a"): ("10.233.60.1", "fd00:233::60:1"), ("x", "b"): ("10.233.60.2", "fd00:233::60:2"),
        ("y", "c"): ("10.233.60.3", "fd00:233::60:3")}

BLOCK_B = NetworkPolicy(
    "x", "block-b", LabelSelector(Labels({"app": "b"})), (PolicyType.INGRESS,),
    ingress=(PRule((), (Peer(ip_block=IPBlock(ipaddress.ip_network("10.233.0.0/16"),
                                              (ipaddress.ip_network("10.233.60.3/32"),))),)),),
)


class Node:
    def __init__(self, backend: str, node: str, pods: dict[tuple[str, str], str]):
        self.backend, self.node, self.pods = backend, node, pods

    def can(self, src: str, dst: str, port: int = 80, family: int = 4, timeout: float = 1.0) -> bool:
        (s,) = [k for k in self.pods if k[1] == src]
        (d,) = [k for k in self.pods if k[1] == dst]
        p = netns.Probe(self.pods[s], PODS[d][0 if family == 4 else 1], port, "TCP")
        return netns.probe_many([p], timeout=timeout, attempts=2)[p]

    def chains(self, family: int = 4) -> dict[str, list[str | None]]:
        t = parse_save(netns.run(self.node, binary(self.backend, family, "save")).stdout).get("filter")
        return {n: [r.hash for r in c.rules] for n, c in t.owned().items()} if t else {}

    def sets(self) -> dict:
        return parse_ipset_save(netns.run(self.node, "ipset", "save").stdout)


@pytest.fixture(params=backends())
def node(request):
    pods = {k: netns.unique_name("h2iso", f"{k[0]}{k[1]}") for k in PODS}
    with node_with_pods(netns.unique_name("h2iso", "node"), pods, PODS, lambda k: naming.veth_name("eni", *k),
                        serve=PODS, tcp_ports=(80, 81), server_name=lambda k: k[1]) as (name, pods):
        yield Node(request.param, name, pods)


def compiled(*policies: NetworkPolicy) -> DesiredState:
    return compile_cluster([pod(ns, n, *ips, web=True) for (ns, n), ips in PODS.items()], policies)


def test_poison_member_left_out_default_deny_elsewhere_enforced(node):
    dp = Dataplane(netns=node.node, backend=node.backend)
    dp.apply(compiled(ALLOW_WEB), allow_sweep=True)
    assert node.can("a", "c") and node.can("b", "a") and not node.can("c", "a", timeout=0.5)

    d = compiled(ALLOW_WEB, DENY_Y)
    named = set_of(d, "n")
    r = dp.apply(with_members(d, named, "0.0.0.0,tcp:80"), allow_sweep=True)  # the poison pod
    assert [(x["kind"], x["name"], x["member"]) for x in r.set_aside] == [("member", named.name, "0.0.0.0,tcp:80")]
    assert "Invalid argument" in r.set_aside[0]["error"]
    for family in (4, 6):
        have = node.chains(family)
        assert all(have.get(n) == list(c.hashes) for n, c in d.table(family).items())
    sets = node.sets()
    assert all(sets[n].members == desired_members(s) for n, s in d.ipsets.items())
    # real traffic: the later default-deny in y is enforced; x's policy still works
    assert not node.can("a", "c", timeout=0.5) and not node.can("a", "c", family=6, timeout=0.5)
    assert node.can("b", "a") and not node.can("c", "a", timeout=0.5)
    # remembered, not retried on every apply; a refresh retries it and heals nothing new
    assert dp.apply(with_members(d, named, "0.0.0.0,tcp:80")).lines_written == 0
    assert dp.refresh().set_aside == r.set_aside
    assert not dp.apply(d).set_aside


def test_refused_nomatch_keeps_old_rules_and_refused_chain_is_set_aside(node):
    dp = Dataplane(netns=node.node, backend=node.backend)
    v1 = compiled(BLOCK_B)
    dp.apply(v1, allow_sweep=True)
    assert node.can("a", "b") and not node.can("c", "b", timeout=0.5)  # c is the except
    pol = naming.policy_chain("x", "block-b", "ingress")
    old = node.chains()[pol]

    # v2: the block's set gets an except the kernel refuses (/0) and y goes default-deny.
    v2 = compiled(BLOCK_B, DENY_Y)
    blk = set_of(v2, "b")
    r = dp.apply(with_members(v2, blk, "0.0.0.0/0 nomatch"), allow_sweep=True)
    kinds = {(x["kind"], x["name"]) for x in r.set_aside}
    assert ("ipset", blk.name) in kinds  # the whole set: dropping an except would widen
    assert node.sets()[blk.name].members == desired_members(v1.ipsets[blk.name])  # its old version
    assert node.chains()[pol] == old
    assert not node.can("c", "b", timeout=0.5) and node.can("a", "b")  # b keeps its old rules
    assert not node.can("a", "c", timeout=0.5)  # the default-deny elsewhere landed

    # v3: a chain the kernel refuses (port 70000) in y's policy: it and c's endpoint
    # chain are set aside (kept: c stays default-denied), the rest is applied.
    v3 = compiled(BLOCK_B, DENY_Y, ALLOW_WEB)
    ypol = naming.policy_chain("y", "deny-all", "ingress")
    bad = Chain(ypol, v3.table(4)[ypol].rules + (
        Rule(Match(protocol="tcp", dst_ports=((70000, 70000),)), Action("ACCEPT"), "y/deny-all bad"),))
    r = dp.apply(replace(v3, chains={**v3.chains, (4, "filter"): {**v3.table(4), ypol: bad}}), allow_sweep=True)
    by = {x["name"]: x for x in r.set_aside if x["kind"] == "chain"}
    assert "70000" in by[ypol]["error"]
    assert node.chains()[naming.policy_chain("x", "allow-web", "ingress")] == list(
        v3.table(4)[naming.policy_chain("x", "allow-web", "ingress")].hashes)
    assert not node.can("a", "c", timeout=0.5) and node.can("b", "a") and not node.can("c", "a", timeout=0.5)

    # fixed input: everything heals
    r = dp.apply(v3, allow_sweep=True)
    assert not r.set_aside
    assert all(node.chains().get(n) == list(c.hashes) for n, c in v3.table(4).items())


def test_ipv4_mapped_ipv6_members_are_not_rewritten_by_refresh(node):
    dp = Dataplane(netns=node.node, backend=node.backend)
    d = compiled(ALLOW_WEB)
    extra = {
        naming.ipset_name(6, "s", "h2-mapped-net"): IPSet(naming.ipset_name(6, "s", "h2-mapped-net"), 6, "hash:net",
                                                          frozenset({"::ffff:10.233.60.9/128", "::ffff:10.233.0.0/112",
                                                                     "::10.233.60.9/128", "::ffff:0.0.0.1/128"})),
        naming.ipset_name(6, "n", "h2-mapped-port"): IPSet(naming.ipset_name(6, "n", "h2-mapped-port"), 6,
                                                           "hash:ip,port",
                                                           frozenset({"::ffff:10.233.60.9,tcp:80", "::ffff:a00:2,udp:53"})),
        naming.ipset_name(6, "e", "h2-mapped-iface"): IPSet(naming.ipset_name(6, "e", "h2-mapped-iface"), 6,
                                                            "hash:net,iface",
                                                            frozenset({"::ffff:10.233.60.9/128,eni0000000000a"})),
    }
    d = replace(d, ipsets={**d.ipsets, **extra})
    r = dp.apply(d, allow_sweep=True)
    assert all(n in r.ipsets_created for n in extra)
    kernel = node.sets()
    for n, s in extra.items():
        assert kernel[n].members == desired_members(s)  # our canonical form is what ipset save prints
    r = dp.refresh()
    assert r.lines_written == 0 and r.ipset_lines == 0
