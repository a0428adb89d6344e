"""The node's address pool: ENIs with claimed slots, allocations, cooldown, warm targets.

Plain data plus pure-ish methods; the caller holds the lock and writes the
checkpoint (to_dict) after each change. Times are wall-clock seconds so the
cooldown survives a restart.

Rules:
- An allocation is keyed by (network, container id, ifname), the CNI key; asking
  again for the same key returns the same address (idempotent ADD).
- A freed address cools down for ``cooldown`` seconds before it is handed out again.
- Warm targets follow the AWS ipamd: with WARM_IP_TARGET or MINIMUM_IP_TARGET set,
  short = max(warm - available, minimum - total, 0) and over = max(min(available - warm,
  total - minimum), 0); otherwise keep WARM_ENI_TARGET ENIs' worth of free addresses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import structlog

from cni_shim.ipam.provider import EniInfo, Provider, Slot

log = structlog.get_logger(__name__)

CHECKPOINT_VERSION = "vpcip-ipam/1"

Key = tuple[str, str, str]  # (network, container_id, ifname)


class PoolExhausted(Exception):
    pass


@dataclass(frozen=True)
class Targets:
    warm_ip: int = 0
    minimum_ip: int = 0
    warm_eni: int = 1
    cooldown: float = 30.0


@dataclass
class Allocation:
    network: str
    container_id: str
    ifname: str
    ipv4: str
    ipv6: str
    eni: str
    table: int
    namespace: str = ""
    pod: str = ""
    host_veth: str = ""
    netns: str = ""
    endpoint_dir: str = ""
    state: str = "adding"  # "adding" until plumbing is done, then "ready"
    ts: float = 0.0

    @property
    def key(self) -> Key:
        return (self.network, self.container_id, self.ifname)


@dataclass
class EniState:
    info: EniInfo
    slots: list[Slot] = field(default_factory=list)


@dataclass(frozen=True)
class Stats:
    enis: int
    total: int
    assigned: int
    cooling: int
    available: int
    max_pods: int


class Pool:
    def __init__(self, provider: Provider, targets: Targets) -> None:
        self.provider = provider
        self.targets = targets
        self.enis: dict[str, EniState] = {}
        self.allocations: dict[Key, Allocation] = {}
        self.cooling: dict[str, float] = {}

    # --- queries -------------------------------------------------------------------

    def _assigned(self) -> set[str]:
        return {a.ipv4 for a in self.allocations.values()}

    def _expire(self, now: float) -> None:
        cd = self.targets.cooldown
        for ip in [ip for ip, t in self.cooling.items() if now - t >= cd]:
            del self.cooling[ip]

    def _free(self, now: float) -> list[tuple[EniState, Slot]]:
        self._expire(now)
        used = self._assigned()
        out = []
        for e in sorted(self.enis.values(), key=lambda e: e.info.device):
            for s in e.slots:
                if s.ipv4 not in used and s.ipv4 not in self.cooling:
                    out.append((e, s))
        return out

    def stats(self, now: float) -> Stats:
        self._expire(now)
        total = sum(len(e.slots) for e in self.enis.values())
        assigned = len(self.allocations)
        claimed = {s.ipv4 for e in self.enis.values() for s in e.slots}
        cooling = len([ip for ip in self.cooling if ip in claimed and ip not in self._assigned()])
        return Stats(len(self.enis), total, assigned, cooling, len(self._free(now)), self.provider.limits.max_pods)

    def find(self, key: Key) -> Allocation | None:
        return self.allocations.get(key)

    def by_container(self, container_id: str) -> list[Allocation]:
        return [a for a in self.allocations.values() if a.container_id == container_id]

    # --- changes -------------------------------------------------------------------

    def allocate(self, key: Key, now: float, **meta: str) -> Allocation:
        existing = self.allocations.get(key)
        if existing is not None:
            return existing
        free = self._free(now)
        if not free:
            self._grow(1)
            free = self._free(now)
        if not free:
            st = self.stats(now)
            lim = self.provider.limits
            raise PoolExhausted(
                f"IP address pool exhausted: {st.assigned} of {st.total} addresses assigned, "
                f"{st.cooling} cooling down; this node supports at most {lim.max_pods} pods "
                f"({lim.instance_type}: {lim.max_enis} ENIs x {lim.ips_per_eni} IPs per ENI)"
            )
        eni, slot = free[0]
        alloc = Allocation(
            network=key[0], container_id=key[1], ifname=key[2], ipv4=slot.ipv4, ipv6=slot.ipv6,
            eni=eni.info.id, table=eni.info.table, ts=now, **meta,
        )
        self.allocations[key] = alloc
        return alloc

    def release(self, key: Key, now: float, cool: bool = True) -> Allocation | None:
        """Free an allocation; with cool=False (never handed to a running pod) skip the cooldown."""
        alloc = self.allocations.pop(key, None)
        if alloc is not None and cool:
            self.cooling[alloc.ipv4] = now
        return alloc

    def _grow(self, count: int) -> int:
        """Claim up to ``count`` more slots from the provider; returns how many."""
        got = 0
        for e in sorted(self.enis.values(), key=lambda e: e.info.device):
            if got >= count:
                return got
            new = self.provider.assign_ips(e.info.id, [s.ipv4 for s in e.slots], count - got)
            e.slots.extend(new)
            got += len(new)
        while got < count and len(self.enis) < self.provider.limits.max_enis:
            info = self.provider.attach_eni(list(self.enis))
            if info is None:
                break
            e = EniState(info)
            self.enis[info.id] = e
            log.info("eni_attached", eni=info.id, device=info.device, table=info.table)
            new = self.provider.assign_ips(info.id, [], count - got)
            e.slots.extend(new)
            got += len(new)
        return got

    def _shrink(self, count: int, now: float) -> int:
        released = 0
        for eni, slot in reversed(self._free(now)):
            if released >= count:
                break
            eni.slots.remove(slot)
            self.provider.release_ips(eni.info.id, [slot.ipv4])
            released += 1
        return released

    def reconcile(self, now: float) -> tuple[int, int]:
        """Move the pool towards the warm targets; returns (claimed, released)."""
        if not self.enis:
            info = self.provider.attach_eni([])
            if info is not None:
                self.enis[info.id] = EniState(info)
        st = self.stats(now)
        t = self.targets
        if t.warm_ip > 0 or t.minimum_ip > 0:
            short = max(t.warm_ip - st.available, t.minimum_ip - st.total, 0)
            over = max(min(st.available - t.warm_ip, st.total - t.minimum_ip), 0)
        else:
            short = max(t.warm_eni * self.provider.limits.slots_per_eni - st.available, 0)
            over = 0
        claimed = self._grow(short) if short else 0
        released = self._shrink(over, now) if over and not claimed else 0
        if claimed or released:
            log.info("pool_reconciled", claimed=claimed, released=released, **asdict(self.stats(now)))
        return claimed, released

    # --- checkpoint ----------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "enis": [
                {"id": e.info.id, "slots": [asdict(s) for s in e.slots]}
                for e in sorted(self.enis.values(), key=lambda e: e.info.device)
            ],
            "allocations": [asdict(a) for a in sorted(self.allocations.values(), key=lambda a: a.ipv4)],
            "cooling": dict(sorted(self.cooling.items())),
        }

    def restore(self, data: dict) -> list[Allocation]:
        """Load a checkpoint; returns allocations dropped because their address is gone."""
        if data.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {data.get('version')!r} is not {CHECKPOINT_VERSION!r}")
        self.enis.clear()
        self.allocations.clear()
        for e in data.get("enis", []):
            info = self.provider.eni(e["id"])
            if info is None:
                log.warning("checkpoint_eni_unknown", eni=e["id"])
                continue
            slots = [Slot(s["ipv4"], s.get("ipv6", "")) for s in e.get("slots", [])
                     if self.provider.knows(info.id, s["ipv4"])]
            self.enis[info.id] = EniState(info, slots)
        claimed = {s.ipv4 for e in self.enis.values() for s in e.slots}
        dropped = []
        for a in data.get("allocations", []):
            alloc = Allocation(**a)
            if alloc.ipv4 in claimed and alloc.eni in self.enis:
                self.allocations[alloc.key] = alloc
            else:
                dropped.append(alloc)
        self.cooling = {ip: float(t) for ip, t in data.get("cooling", {}).items()}
        return dropped

    def allocations_list(self) -> Iterable[Allocation]:
        return list(self.allocations.values())
