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


def _apply_plan(kernel: dict, plan: "ipsets.IpsetPlan", desired: dict) -> None:
    """What Dataplane does with a committed plan: the kernel model afterwards."""
    for name, members in plan.members.items():
        s = desired[name]
        kernel[name] = ipsets.KSet(name, s.type, s.family, ipsets.DEFAULT_MAXELEM, set(members))
    for name, (adds, dels) in plan.changes.items():
        k = kernel[name]
        kernel[name] = ipsets.KSet(name, k.type, k.family, k.maxelem, (k.members - set(dels)) | set(adds))


def test_derived_sets_planned_as_changes_end_equal_to_the_full_plan():
    """Random versions, each IPSet.derived from the last, some never applied, some with
    odd spellings (v6 upper case, a v4 host without /32, a net): planning with sources
    (the change alone where provable) always leaves the kernel model equal to the
    canonical form of the desired set; and the change path is really taken."""
    rng = random.Random(11)
    for family, pool in (
        (4, [f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(1, 255)}/32" for _ in range(3000)]
            + ["10.9.0.0/16", "10.1.2.3", "10.1.2.3/32"]),
        (6, [f"fd00::{rng.randrange(1 << 16):x}/128" for _ in range(3000)] + ["FD00::1/128", "fd00::1/128"]),
    ):
        name = f"pa{family}s-" + "c" * 26
        twins = pool[-2:]  # one address, two spellings: removing either must keep it
        cur = IPSet(name, family, "hash:net", frozenset(pool[:1500] + twins))
        kernel: dict = {}
        sources: dict = {}
        changes_taken = 0
        for step in range(80):
            add = {rng.choice(pool) for _ in range(rng.randrange(0, 6))}
            rem = {rng.choice(sorted(cur.members)) for _ in range(rng.randrange(0, 6))}
            if step % 10 == 5:  # one twin goes, or comes back
                (rem if twins[step // 10 % 2] in cur.members else add).add(twins[step // 10 % 2])
            cur = IPSet.derived(cur, add, rem)
            assert cur.members == (cur.base - cur.removed) | cur.added
            if step % 7 == 3:
                continue  # a version the kernel never gets: the next one's base is unknown to it
            plan = ipsets.plan_ipsets({name: cur}, kernel, sources=sources)
            changes_taken += name in plan.changes
            _apply_plan(kernel, plan, {name: cur})
            for n in [*plan.members, *plan.changes]:
                sources.pop(n, None)
            sources.update(plan.sources)
            assert kernel[name].members == _full(cur), (family, step)
        assert changes_taken > 30, changes_taken


def test_bulk_ipset_save_reader_equals_the_line_reader():
    """parse_ipset_save takes ``ipset save`` text apart block by block; anything not
    shaped as ipset prints it falls back to the line reader. Both agree on every text."""
    from policy_agent.shared.naming import ipset_name

    rng = random.Random(5)
    blocks = []
    for k in range(12):
        name = ipset_name(4 if k % 3 else 6, "s", f"t{k}")
        fam = "inet" if k % 3 else "inet6"
        blocks.append([f"create {name} hash:net family {fam} hashsize 1024 maxelem {1 << 20} bucketsize 12"]
                      + [f"add {name} 10.{k}.0.{i}" + (" nomatch" if i % 17 == 0 else "") for i in range(rng.randrange(0, 40))])
    blocks.append(["create foreign hash:ip family inet hashsize 64 maxelem 65536", "add foreign 192.0.2.1"])
    odd_lines = ["", "add foreign 192.0.2.9", "add  x", "junk", "add pa4s-zzzzzzzzzzzzzzzzzzzzzzzzzz 10.9.9.9",
                 " add x y", "create", "\t", "add pa4s-x 1.2.3.4 "]
    for trial in range(200):
        lines = [ln for b in rng.sample(blocks, len(blocks)) for ln in b]
        if trial % 2:
            for _ in range(rng.randrange(1, 3)):
                lines.insert(rng.randrange(len(lines) + 1), rng.choice(odd_lines))
        text = "\n".join(lines) + rng.choice(["\n", "", "\n\n"])
        for owned in (True, False):
            fast = ipsets.parse_ipset_save(text, owned)
            slow = ipsets._parse_ipset_save_lines(text, owned)
            assert {n: (k.type, k.family, k.maxelem, k.members) for n, k in fast.items()} == \
                   {n: (k.type, k.family, k.maxelem, k.members) for n, k in slow.items()}, (trial, text)


def test_members_read_exactly_like_the_frozenset_they_stand_for():
    """IPSet.derived's Members (a shared base and a change) against a plain frozenset
    kept alongside, through random changes, compactions included."""
    import pickle

    rng = random.Random(3)
    pool = [f"10.7.{i // 250}.{i % 250}/32" for i in range(4000)]
    cur = IPSet("pa4s-" + "d" * 26, 4, "hash:net", frozenset(pool[:1000]))
    truth = set(cur.members)
    kinds = set()
    for step in range(300):
        add = {rng.choice(pool) for _ in range(rng.randrange(0, 30))}
        rem = set(rng.sample(sorted(truth), min(len(truth), rng.randrange(0, 30)))) - add  # disjoint, as the compiler's
        nxt = IPSet.derived(cur, add, rem)
        truth = (truth - rem) | add
        m = nxt.members
        kinds.add(type(m).__name__)
        f = frozenset(truth)
        probe = rng.sample(pool, 300)
        assert len(m) == len(f) and [x in m for x in probe] == [x in f for x in probe]
        assert nxt.added == frozenset(add - cur.members) and nxt.removed == frozenset(rem & cur.members)
        if step % 7:
            cur = nxt  # read by membership only: the change keeps growing until a compaction
            continue
        assert m == f and f == m and not (m != f)
        assert set(m) == f and sorted(m) == sorted(f)
        other = frozenset(rng.sample(pool, 50))
        assert m - other == f - other and other - m == other - f
        assert m | other == f | other and other | m == other | f and m & other == f & other
        assert (m <= f) and (f <= m) and hash(m) == hash(f) and m.isdisjoint(other) == f.isdisjoint(other)
        assert pickle.loads(pickle.dumps(nxt)).members == f
        assert nxt == IPSet(nxt.name, 4, "hash:net", f)  # equal values, whatever the representation
        cur = nxt  # read whole just now: the next version starts from that copy
    assert kinds == {"Members", "frozenset"}, kinds  # shared bases, and compactions
