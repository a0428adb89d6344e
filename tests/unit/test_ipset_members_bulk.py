"""desired_members' bulk path (host addresses, v4 address/port pairs) gives exactly what
canon_member gives member by member, and fails on the same bad members."""

from __future__ import annotations

import random

import pytest

from policy_agent.dataplane.ipsets import canon_member, desired_members
from policy_agent.desired import IPSet

EDGE_NET = [
    "10.0.0.1/32", "10.0.0.0/8", "10.1.2.0/24 nomatch", "0.0.0.0/32", "255.255.255.255/32",
    "fd00::1/128", "FD00:0:0::0:2/128", "::ffff:10.0.0.1/128", "::1/128", "fd00::/64",
    "10.0.0.5/24",  # not a network address: ipset stores the network
]
EDGE_IPPORT = ["10.0.0.1,tcp:80", "10.0.0.2,udp:53", "10.0.0.3,sctp:9", "10.0.0.4,TCP:80", "10.0.0.5,tcp:080",
               "10.0.0.6,80", "10.0.0.7,tcp:0", "fd00::1,tcp:443"]


def per_member(s: IPSet) -> set[str]:
    return {canon_member(s.type, m) for m in s.members}


def v4(rng: random.Random) -> str:
    return ".".join(str(rng.randrange(256)) for _ in range(4))


@pytest.mark.parametrize("seed", range(20))
def test_bulk_equals_per_member(seed: int) -> None:
    rng = random.Random(seed)
    hosts4 = {f"{v4(rng)}/32" for _ in range(rng.randrange(1, 300))}
    hosts6 = {f"fd00:233::{rng.randrange(1 << 16):x}:{rng.randrange(1 << 16):x}/128" for _ in range(rng.randrange(1, 300))}
    extra = set(rng.sample(EDGE_NET, rng.randrange(0, 4)))
    for members in (hosts4, hosts6, hosts4 | extra, hosts6 | extra, hosts4 | hosts6 | extra):
        s = IPSet("pa4s-x", 4, "hash:net", frozenset(members))
        assert desired_members(s) == per_member(s)
    pairs = {f"{v4(rng)},{rng.choice(('tcp', 'udp', 'sctp'))}:{rng.randrange(65536)}" for _ in range(200)}
    for members in (pairs, pairs | set(rng.sample(EDGE_IPPORT, 3))):
        s = IPSet("pa4p-x", 4, "hash:ip,port", frozenset(members))
        assert desired_members(s) == per_member(s)


@pytest.mark.parametrize("bad", ["010.0.0.1/32", "10.0.0.256/32", "10.0.0/32", "10.0.0.1 /32", "x/32",
                                 "10.0.0.1/32\nadd pa4s-x 1.2.3.4", "fd00::g/128", "fd00::1%eth0/128"])
def test_bulk_refuses_what_the_parser_refuses(bad: str) -> None:
    s = IPSet("pa4s-x", 4, "hash:net", frozenset({"10.0.0.1/32", "10.0.0.2/32", bad}))
    try:
        expected = per_member(s)
    except ValueError:
        with pytest.raises(ValueError, match="pa4s-x"):
            desired_members(s)
    else:
        assert desired_members(s) == expected


@pytest.mark.parametrize("set_type,members", [
    ("hash:ip,port", {"10.0.0.1,tcp:80", "10.0.0.2,tcp:80\ndestroy pa4s-y"}),
    ("hash:net", {"10.0.0.1/32", "10.0.0.2/32\ndestroy pa4s-y"}),
])
def test_a_newline_in_a_member_never_starts_a_restore_line(set_type: str, members: set[str]) -> None:
    # The bulk path works on lines: a member holding one must fall back to the parser,
    # which refuses it or folds it into one (then kernel-refused) line.
    s = IPSet("pa4p-x", 4, set_type, frozenset(members))
    try:
        got = desired_members(s)
    except ValueError:
        return
    assert got == per_member(s)
    assert not any("\n" in m for m in got)
