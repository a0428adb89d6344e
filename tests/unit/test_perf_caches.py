"""The caches added for issue 13 (scale) give the same answers as no cache.

- dataplane.ipsets: a large IPv4 host set's canonical members are derived from the
  previous version's by difference; the result equals the full canonicalisation.
- model.parse: pods with equal labels share one Labels object (and its strings); pods
  with different labels do not, and a shared object is never changed by a later parse.
"""

from __future__ import annotations

import random

from policy_agent.dataplane import ipsets
from policy_agent.desired import IPSet
from policy_agent.model.parse import parse_pod


def _full(s: IPSet) -> set[str]:
    ipsets._HOST_MEMO.pop(s.name, None)
    out = ipsets.desired_members(s)
    ipsets._HOST_MEMO.pop(s.name, None)
    return out


def test_host_set_by_difference_equals_full_canonicalisation():
    rng = random.Random(7)
    name = "pa4s-" + "a" * 26
    pool = [f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}/32" for _ in range(6000)]
    members = set(pool[:3000])
    ipsets._HOST_MEMO.clear()
    for step in range(60):
        for _ in range(rng.randrange(1, 40)):
            m = rng.choice(pool)
            if m in members:
                members.discard(m)
            else:
                members.add(m)
        if step == 30:  # a member that is not a plain host: the full path must decide
            members.add("10.9.0.0/16")
        if step == 45:
            members.discard("10.9.0.0/16")
        s = IPSet(name, 4, "hash:net", frozenset(members))
        got = ipsets.desired_members(s)
        assert got == _full(s), step
        ipsets.desired_members(s)  # keep the memo warm for the next step, as an apply does
    assert name in ipsets._HOST_MEMO
    # a set no longer desired leaves the memo at the next plan
    ipsets.plan_ipsets({}, {})
    assert name not in ipsets._HOST_MEMO


def test_ipv6_sets_are_never_derived_by_difference():
    name = "pa6s-" + "b" * 26
    members = frozenset(f"fd00::{i:x}/128" for i in range(2000))
    ipsets._HOST_MEMO.clear()
    ipsets.desired_members(IPSet(name, 6, "hash:net", members))
    assert name not in ipsets._HOST_MEMO


def _pod(name: str, labels: dict) -> dict:
    return {"metadata": {"name": name, "namespace": "team-a", "labels": labels},
            "spec": {"nodeName": "node-1"}, "status": {"phase": "Running", "podIP": "10.0.0.1"}}


def test_equal_labels_are_shared_and_different_ones_are_not():
    a = parse_pod(_pod("a", {"app": "web", "pod-template-hash": "x1"}))
    b = parse_pod(_pod("b", {"pod-template-hash": "x1", "app": "web"}))
    c = parse_pod(_pod("c", {"app": "web", "pod-template-hash": "x2"}))
    assert a.labels is b.labels
    assert c.labels is not a.labels
    assert dict(a.labels) == {"app": "web", "pod-template-hash": "x1"}
    assert dict(c.labels) == {"app": "web", "pod-template-hash": "x2"}
    assert a.node_name is b.node_name and a.namespace is c.namespace
