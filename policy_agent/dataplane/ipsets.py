"""Pure ipset logic: parse ``ipset save``, canonicalise members, plan one restore batch.

Unchanged sets are not touched. A set whose type/family/maxelem differs from the
desired one is rebuilt in a temporary set and swapped in (swap needs equal
types, and keeps references from rules valid). Otherwise only the member delta
is written as ``add``/``del`` lines, unless the delta is larger than a rebuild,
in which case the set is rebuilt and swapped too. Destroys are planned
separately: they run only after no rule references the set any more.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from itertools import repeat
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Callable, Iterable, Mapping

from policy_agent.desired import IPSet
from functools import lru_cache

from policy_agent.shared.naming import owns_ipset, temp_ipset_name

DEFAULT_MAXELEM = 1048576


@dataclass
class KSet:
    name: str
    type: str
    family: int
    maxelem: int = DEFAULT_MAXELEM
    members: set[str] = field(default_factory=set)


def _ntop6(addr: ipaddress.IPv6Address) -> str:
    # ``ipset save`` prints IPv6 with the C library's inet_ntop, which keeps the dotted
    # tail of IPv4-mapped/compatible addresses ("::ffff:10.0.0.1") where Python's
    # ipaddress prints hex ("::ffff:a00:1"); socket.inet_ntop is that same libc call.
    return socket.inet_ntop(socket.AF_INET6, addr.packed)


def _canon_ip(text: str) -> str:
    a = ipaddress.ip_address(text)
    return _ntop6(a) if a.version == 6 else str(a)


# A canonical dotted quad (no leading zeros) with /32: by far the most common member.
_V4_HOST = re.compile(r"^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)/32$")


# What the kernel accepts as an interface name (IFNAMSIZ 16 with the NUL; dev_valid_name).
_IFACE_RE = re.compile(r"^[^/,:\s]{1,15}$")


def _canon_net(elem: str) -> str:
    net = ipaddress.ip_network(elem, strict=False)
    addr = _ntop6(net.network_address) if net.version == 6 else str(net.network_address)
    return addr if net.prefixlen == net.max_prefixlen else f"{addr}/{net.prefixlen}"


@lru_cache(maxsize=1 << 18)
def canon_member(set_type: str, text: str) -> str:
    """The form ``ipset save`` prints, so desired and kernel members compare equal."""
    if set_type == "hash:net" and _V4_HOST.match(text):
        return text[:-3]
    if set_type == "hash:net" and text.endswith("/128") and " " not in text:
        # A v6 host: inet_ntop is ~10x cheaper than ipaddress and prints exactly what
        # ``ipset save`` prints (the same libc call), v4-mapped dotted tails included.
        try:
            return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text[:-4]))
        except OSError:
            pass  # not a plain address (scope id, garbage): the full parser says why
    elem, *flags = text.split()
    if set_type == "hash:net":
        elem = _canon_net(elem)
    elif set_type == "hash:net,iface":
        # "10.233.1.5/32,eni1234567890a" -> "10.233.1.5,eni1234567890a" (anti-spoofing:
        # this source address only from this interface). Interface names are case-sensitive.
        net, sep, iface = elem.rpartition(",")
        if not sep:
            raise ValueError(f"hash:net,iface member {text!r} needs <net>,<interface>")
        name = iface[len("physdev:"):] if iface.startswith("physdev:") else iface
        if not _IFACE_RE.match(name):
            raise ValueError(f"bad interface name {iface!r} in member {text!r} (1-15 characters, no '/', ',' or spaces)")
        elem = f"{_canon_net(net)},{iface}"
    elif set_type == "hash:ip":
        elem = _canon_ip(elem)
    elif set_type == "hash:ip,port":
        ip, port = elem.split(",", 1)
        proto, _, num = port.rpartition(":")
        elem = f"{_canon_ip(ip)},{(proto or 'tcp').lower()}:{int(num)}"
    else:
        raise ValueError(f"unsupported ipset type {set_type!r} (member {text!r})")
    return " ".join([elem, *flags])


def parse_ipset_save(text: str, owned_only: bool = True, pause: Callable[[], Any] | None = None) -> dict[str, KSet]:
    """``ipset save`` text -> sets (ours only, unless ``owned_only`` is off).

    ``ipset save`` prints each set's ``create`` line followed by all of its ``add``
    lines; each such block is taken apart with whole-string operations (no Python step
    per member), which is what a drift check or a refresh pays for every member of
    every set (issue 13). Text of any other shape goes through the line-by-line reader.
    ``pause`` is called before each block (a background check yields to applies there)."""
    if not text.startswith("create ") or "\r" in text or "\t" in text or "  " in text:
        return _parse_ipset_save_lines(text, owned_only)
    sets: dict[str, KSet] = {}
    for block in text.split("\ncreate "):
        if pause is not None:
            pause()
        first, _, rest = block.partition("\n")
        parts = first.split()
        if first.startswith("create "):
            parts = parts[1:]
        if len(parts) < 2:
            return _parse_ipset_save_lines(text, owned_only)
        name = parts[0]
        if owned_only and not owns_ipset(name):
            continue
        rest = rest.rstrip("\n")
        head = f"add {name} "
        nlines = rest.count("\n") + 1 if rest else 0
        if rest and (rest.count(head) != nlines or not rest.startswith(head) or "\n\n" in rest
                     or " \n" in rest or rest.endswith(" ")):
            return _parse_ipset_save_lines(text, owned_only)  # an unexpected line: the careful way
        members = set(rest[len(head):].split("\n" + head)) if rest else set()
        if len(members) != nlines:
            return _parse_ipset_save_lines(text, owned_only)
        opts = dict(zip(parts[2::2], parts[3::2]))
        sets[name] = KSet(name, parts[1], 6 if opts.get("family") == "inet6" else 4,
                          int(opts.get("maxelem", DEFAULT_MAXELEM)), members)
    return sets


def _parse_ipset_save_lines(text: str, owned_only: bool) -> dict[str, KSet]:
    sets: dict[str, KSet] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "create" and len(parts) >= 3:
            name, stype = parts[1], parts[2]
            if owned_only and not owns_ipset(name):
                continue
            opts = dict(zip(parts[3::2], parts[4::2]))
            sets[name] = KSet(
                name, stype, 6 if opts.get("family") == "inet6" else 4, int(opts.get("maxelem", DEFAULT_MAXELEM))
            )
        elif parts[0] == "add" and len(parts) >= 3 and parts[1] in sets:
            sets[parts[1]].members.add(" ".join(parts[2:]))
    return sets


@dataclass
class IpsetPlan:
    lines: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    updated: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (added, removed)
    swapped: list[str] = field(default_factory=list)
    members: dict[str, set[str]] = field(default_factory=dict)  # canonical members of every set written
    # sets written as a change of the kernel's version: name -> (canonical adds, dels)
    changes: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    # name -> the desired members object the kernel now holds, for sets whose canonical
    # form is one to one with it (the next version may be written as a change of it)
    sources: dict[str, AbstractSet[str]] = field(default_factory=dict)

    def restore_text(self) -> str:
        return "\n".join(self.lines) + "\n" if self.lines else ""


def _create(name: str, s: IPSet, maxelem: int) -> str:
    return f"create {name} {s.type} family {s.inet} maxelem {maxelem}"


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# v4 (address, port) pairs already in canonical form, checked by one regex over the
# joined list (a member holding a newline never passes: lines are the unit).
_IPPORT_LINES = re.compile(rf"(?:(?:{_OCTET}\.){{3}}{_OCTET},(?:tcp|udp|sctp):(?:[1-9]\d{{0,4}}|0)\n)*")


def _bulk_hosts(members: list[str] | frozenset[str], suffix: str, af: int) -> list[str] | None:
    """Canonical addresses of host members ("<addr>/32" or "/128"), with no Python call
    per member, or None if any is not a plain address with exactly that suffix.
    glibc's inet_pton takes only canonical-shaped dotted quads (no leading zeros, four
    parts) and inet_ntop prints what ``ipset save`` prints (see canon_member)."""
    text = "\n".join(members) + "\n"
    tail = suffix + "\n"
    if text.count(tail) != len(members):
        return None
    addrs = text.replace(tail, "\n").split("\n")
    addrs.pop()
    if len(addrs) != len(members):
        return None
    try:
        packed = list(map(socket.inet_pton, repeat(af), addrs))
    except OSError:
        return None
    return addrs if af == socket.AF_INET else list(map(socket.inet_ntop, repeat(af), packed))


# Canonical members of the last version of each large hash:net set of IPv4 host
# addresses, by set name: the next version (one pod more or less) costs its
# difference, not a canonicalisation of every member (issue 13: a remote pod event at
# 50k pods changes sets of ~17k members). A pure function cache: (raw, canonical) pairs.
# IPv4 only: there the canonical text is the member minus "/32" (one to one), where two
# spellings of one IPv6 address would collapse and a removal could take the other's entry.
_HOST_MEMO: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
HOST_MEMO_MIN = 1024


def _host_delta(s: IPSet) -> set[str] | None:
    memo = _HOST_MEMO.get(s.name)
    if memo is None or s.family != 4:
        return None
    raw, canon = memo
    if raw is s.members:
        return set(canon)
    added, removed = s.members - raw, raw - s.members
    if len(added) + len(removed) > len(raw) // 4:
        return None
    got_added = _bulk_hosts(list(added), "/32", socket.AF_INET) if added else []
    got_removed = _bulk_hosts(list(removed), "/32", socket.AF_INET) if removed else []
    if got_added is None or got_removed is None:
        return None  # not all plain hosts of the family: the full path decides
    out = set(canon)
    out.difference_update(got_removed)
    out.update(got_added)
    return out


def desired_members(s: IPSet, memo: bool = True) -> set[str]:
    """Canonical members (``canon_member`` of each). The common shapes (host addresses
    of a hash:net, v4 (address, port) pairs) are done in bulk: several times faster
    cold, which is what the first apply of a fresh process pays for 10^4-10^5 members."""
    members = s.members
    try:
        if s.type == "hash:net" and members:
            if memo and (hit := _host_delta(s)) is not None:
                if len(members) >= HOST_MEMO_MIN:
                    _HOST_MEMO[s.name] = (members, frozenset(hit))
                return hit
            out: set[str] = set()
            rest = set(members)
            for suffix, af in (("/32", socket.AF_INET), ("/128", socket.AF_INET6)):
                if not rest:
                    break
                got = _bulk_hosts(list(rest), suffix, af)  # the common case: all hosts of one family
                if got is not None:
                    out.update(got)
                    rest.clear()
                    if memo and len(members) >= HOST_MEMO_MIN and af == socket.AF_INET and s.family == 4:
                        _HOST_MEMO[s.name] = (members, frozenset(out))
                    break
                hosts = [m for m in rest if m.endswith(suffix)]  # a mixed set: its hosts in bulk
                if hosts and (got := _bulk_hosts(hosts, suffix, af)) is not None:
                    out.update(got)
                    rest.difference_update(hosts)
            out.update(canon_member(s.type, m) for m in rest)
            return out
        if s.type == "hash:ip,port" and members and _IPPORT_LINES.fullmatch("\n".join(members) + "\n"):
            return set(members)
        return {canon_member(s.type, m) for m in members}
    except ValueError as exc:
        raise ValueError(f"ipset {s.name}: bad member: {exc}") from exc


def _change_of(s: IPSet, k: KSet) -> tuple[list[str], list[str]] | None:
    """Canonical (adds, dels) taking the kernel's ``k`` (known to be the one-to-one
    canonical form of ``s.base``) to ``s``, in O(change); None if that cannot be shown
    cheaply (the full comparison decides then)."""
    base = s.base
    assert base is not None
    if any(m in base for m in s.added) or not all(m in base for m in s.removed):
        return None  # not a change of base as IPSet.derived makes them
    # memo=False: the memo under this name holds the whole set, not these few members
    adds = sorted(desired_members(IPSet(s.name, s.family, s.type, s.added), memo=False)) if s.added else []
    dels = sorted(desired_members(IPSet(s.name, s.family, s.type, s.removed), memo=False)) if s.removed else []
    # One to one still: every removed member was in the kernel, no added one is (an
    # added spelling of a present address would collapse with it), and none collide.
    if len(adds) != len(s.added) or len(dels) != len(s.removed):
        return None
    if any(m in k.members for m in adds) or not all(m in k.members for m in dels):
        return None
    return adds, dels


def plan_ipsets(desired: Mapping[str, IPSet], kernel: Mapping[str, KSet], maxelem: int = DEFAULT_MAXELEM,
                emit: Callable[[str], None] | None = None,
                sources: Mapping[str, AbstractSet[str]] | None = None) -> IpsetPlan:
    """``emit``: called with each set's restore text as soon as that set is planned
    (the caller streams it to a running ``ipset restore``); the plan holds it too.
    ``sources``: the desired members object each kernel set was last written from
    (``IpsetPlan.sources`` of earlier plans, while nobody else wrote): a set derived
    from that very object is written as its change alone."""
    plan = IpsetPlan()
    sources = sources or {}
    done = 0
    for name in [n for n in _HOST_MEMO if n not in desired]:
        del _HOST_MEMO[name]
    for name in sorted(desired):
        if emit is not None and len(plan.lines) > done:
            emit("\n".join(plan.lines[done:]) + "\n")
            done = len(plan.lines)
        s = desired[name]
        if not owns_ipset(name):
            raise ValueError(f"desired ipset {name!r} does not carry our prefix")
        k = kernel.get(name)
        if (s.base is not None and k is not None and sources.get(name) is s.base
                and (k.type, k.family, k.maxelem) == (s.type, s.family, maxelem)):
            try:
                change = _change_of(s, k)
            except ValueError as exc:
                raise ValueError(f"ipset {name}: bad member: {exc}") from exc
            if change is not None:
                adds, dels = change
                plan.lines.extend(f"del {name} {m} -exist" for m in dels)
                plan.lines.extend(f"add {name} {m} -exist" for m in adds)
                if adds or dels:
                    plan.updated[name] = (len(adds), len(dels))
                    plan.changes[name] = change
                plan.sources[name] = s.members
                continue
        want = desired_members(s)
        plan.members[name] = want
        if len(want) == len(s.members):
            plan.sources[name] = s.members
        if k is None:
            plan.lines.append(_create(name, s, maxelem))
            plan.lines.extend(map(f"add {name} ".__add__, sorted(want)))
            plan.created.append(name)
            continue
        same_meta = (k.type, k.family, k.maxelem) == (s.type, s.family, maxelem)
        adds, dels = sorted(want - k.members), sorted(k.members - want)
        if same_meta and not adds and not dels:
            del plan.members[name]
            continue
        if same_meta and len(adds) + len(dels) <= len(want) + 3:
            plan.lines.extend(f"del {name} {m} -exist" for m in dels)
            plan.lines.extend(f"add {name} {m} -exist" for m in adds)
            plan.updated[name] = (len(adds), len(dels))
            continue
        if (k.type, k.family) != (s.type, s.family):
            # Only tampering gets here (the kind letter in the name fixes the type) and
            # swap needs equal types: recreate. Fails loudly if a rule still uses it.
            plan.lines += [f"destroy {name}", _create(name, s, maxelem)]
            plan.lines.extend(f"add {name} {m}" for m in sorted(want))
            plan.swapped.append(name)
            continue
        tmp = temp_ipset_name(name)
        if tmp in kernel:
            plan.lines.append(f"destroy {tmp}")
        plan.lines.append(_create(tmp, s, maxelem))
        plan.lines.extend(f"add {tmp} {m}" for m in sorted(want))
        plan.lines += [f"swap {tmp} {name}", f"destroy {tmp}"]
        plan.swapped.append(name)
    if emit is not None and len(plan.lines) > done:
        emit("\n".join(plan.lines[done:]) + "\n")
    return plan


def plan_destroy(names: Iterable[str]) -> IpsetPlan:
    plan = IpsetPlan()
    for n in sorted(names):
        if not owns_ipset(n):
            raise ValueError(f"refusing to destroy foreign ipset {n!r}")
        plan.lines.append(f"destroy {n}")
    return plan
