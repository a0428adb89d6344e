"""Warm-pool targets with the AWS ipamd's meaning: pure arithmetic, the pool applies it.

Modes (pkg/ipamd/ipamd.go datastoreTargetState / isDatastorePoolTooLow, docs/prefix-and-ip-target.md):
- WARM_IP_TARGET or MINIMUM_IP_TARGET set (either mode): short = max(warm - available,
  minimum - total, 0), over = max(min(available - warm, total - minimum), 0). In prefix
  mode the claim rounds up to whole /28s and only whole free /28s are released.
- prefix mode otherwise: keep WARM_PREFIX_TARGET (at least 1; AWS does not support 0)
  whole prefixes' worth of free addresses; release free /28s beyond that.
- IP mode otherwise: keep WARM_ENI_TARGET ENIs' worth of free addresses, claimed a whole
  ENI at a time (as ipamd fills each ENI it attaches); no single address is released,
  whole unused ENIs are (see Pool._release_enis).
"""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from cni_shim.ipam.limits import IPS_PER_PREFIX
from cni_shim.ipam.provider import Limits, Slot

if TYPE_CHECKING:
    from cni_shim.ipam.pool import EniState, Targets


@dataclass(frozen=True)
class Plan:
    short: int  # addresses to claim
    over: int  # addresses that may be released
    keep: int  # free addresses to keep (an unused ENI goes only if this still holds without it)
    minimum: int  # total addresses to keep


def plan(t: "Targets", limits: Limits, available: int, total: int) -> Plan:
    if t.warm_ip > 0 or t.minimum_ip > 0:
        short = max(t.warm_ip - available, t.minimum_ip - total, 0)
        over = max(min(available - t.warm_ip, total - t.minimum_ip), 0)
        return Plan(short, over, t.warm_ip, t.minimum_ip)
    if limits.prefix_delegation:
        keep = max(t.warm_prefix, 1) * IPS_PER_PREFIX
        return Plan(max(keep - available, 0), max(available - keep, 0), keep, 0)
    per = limits.slots_per_eni
    keep = t.warm_eni * per
    need = max(keep - available, 0)
    return Plan(-(-need // per) * per if per else 0, 0, keep, 0)


def prefix_of(ipv4: str) -> str:
    return str(ipaddress.ip_network(f"{ipv4}/28", strict=False))


def release_groups(enis: Iterable["EniState"], free: list[tuple["EniState", Slot]],
                   prefix_mode: bool) -> list[tuple["EniState", list[Slot]]]:
    """What may go back, highest device first: single free slots, or whole free /28s."""
    if not prefix_mode:
        return [(e, [s]) for e, s in reversed(free)]
    free_by: dict[tuple[str, str], list[Slot]] = defaultdict(list)
    for e, s in free:
        free_by[(e.info.id, prefix_of(s.ipv4))].append(s)
    out = []
    for e in sorted(enis, key=lambda e: e.info.device, reverse=True):
        held = Counter(prefix_of(s.ipv4) for s in e.slots)
        for p, n in sorted(held.items(), reverse=True):
            f = free_by.get((e.info.id, p), [])
            if len(f) == n:  # every address of the /28 is free and not cooling
                out.append((e, f))
    return out
