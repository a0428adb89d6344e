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
from dataclasses import dataclass, field
from typing import Iterable, Mapping

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


def _canon_ip(text: str) -> str:
    return str(ipaddress.ip_address(text))


# A canonical dotted quad (no leading zeros) with /32: by far the most common member.
_V4_HOST = re.compile(r"^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)/32$")


# What the kernel accepts as an interface name (IFNAMSIZ 16 with the NUL; dev_valid_name).
_IFACE_RE = re.compile(r"^[^/,:\s]{1,15}$")


def _canon_net(elem: str) -> str:
    net = ipaddress.ip_network(elem, strict=False)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


@lru_cache(maxsize=1 << 18)
def canon_member(set_type: str, text: str) -> str:
    """The form ``ipset save`` prints, so desired and kernel members compare equal."""
    if set_type == "hash:net" and _V4_HOST.match(text):
        return text[:-3]
    if set_type == "hash:net" and text.endswith("/128") and " " not in text:
        # A v6 host: inet_ntop is ~10x cheaper than ipaddress and prints the same
        # compressed form, except for v4-mapped/compatible addresses (dotted tail).
        try:
            short = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text[:-4]))
        except OSError:
            short = "."
        if "." not in short:
            return short
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


def parse_ipset_save(text: str, owned_only: bool = True) -> dict[str, KSet]:
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

    def restore_text(self) -> str:
        return "\n".join(self.lines) + "\n" if self.lines else ""


def _create(name: str, s: IPSet, maxelem: int) -> str:
    return f"create {name} {s.type} family {s.inet} maxelem {maxelem}"


def desired_members(s: IPSet) -> set[str]:
    try:
        return {canon_member(s.type, m) for m in s.members}
    except ValueError as exc:
        raise ValueError(f"ipset {s.name}: bad member: {exc}") from exc


def plan_ipsets(desired: Mapping[str, IPSet], kernel: Mapping[str, KSet], maxelem: int = DEFAULT_MAXELEM) -> IpsetPlan:
    plan = IpsetPlan()
    for name in sorted(desired):
        s = desired[name]
        if not owns_ipset(name):
            raise ValueError(f"desired ipset {name!r} does not carry our prefix")
        want = desired_members(s)
        plan.members[name] = want
        k = kernel.get(name)
        if k is None:
            plan.lines.append(_create(name, s, maxelem))
            plan.lines.extend(f"add {name} {m}" for m in sorted(want))
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
    return plan


def plan_destroy(names: Iterable[str]) -> IpsetPlan:
    plan = IpsetPlan()
    for n in sorted(names):
        if not owns_ipset(n):
            raise ValueError(f"refusing to destroy foreign ipset {n!r}")
        plan.lines.append(f"destroy {n}")
    return plan
