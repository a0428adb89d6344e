"""The node's address pool: ENIs with claimed slots, allocations, cooldown, warm targets.

Plain data plus pure-ish methods. Times are wall-clock seconds so the cooldown
survives a restart. Locking: allocate/release/stats run under the caller's pool lock;
reconcile() takes a ``guard`` (a context manager the caller makes from its pool lock
and checkpoint write) and holds it only around bookkeeping, never across a provider
call, so a slow EC2 never stalls ADD and DEL (docs/decisions/ec2-provider.md).

Rules:
- An allocation is keyed by (network, container id, ifname), the CNI key; asking
  again for the same key returns the same address (idempotent ADD).
- A freed address cools down for ``cooldown`` seconds before it is handed out again.
- allocate() never asks the provider: with no free address it raises PoolShort (the
  pool can still grow: the caller counts the ADD in ``demand`` and has reconcile() run)
  or PoolExhausted (the node is at its limit). reconcile() claims max(warm-target
  shortfall, demand - available), in warm-ENI mode rounded up to whole ENIs.
- Warm targets follow the AWS ipamd (warm.py): with WARM_IP_TARGET or MINIMUM_IP_TARGET set,
  short = max(warm - available, minimum - total, 0) and over = max(min(available - warm,
  total - minimum), 0); in prefix mode WARM_PREFIX_TARGET free /28s; otherwise keep
  WARM_ENI_TARGET ENIs' worth of free addresses, claimed a whole ENI at a time.
- Unused secondary ENIs (no allocation, no cooling address) beyond the target are released;
  the primary ENI never is. The first reconcile adopts what the provider holds that the
  checkpoint does not (Provider.inventory, EC2 only).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import structlog

from cni_shim.ipam import warm
from cni_shim.ipam.provider import EniInfo, Provider, ProviderUnavailable, Slot

log = structlog.get_logger(__name__)

CHECKPOINT_VERSION = "vpcip-ipam/1"

Key = tuple[str, str, str]  # (network, container_id, ifname)


class PoolExhausted(Exception):
    pass


class PoolShort(Exception):
    """No free address right now, but the pool can grow: try again after a reconcile."""


Guard = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class Targets:
    warm_ip: int = 0
    minimum_ip: int = 0
    warm_eni: int = 1
    cooldown: float = 30.0
    warm_prefix: int = 1  # prefix mode only (WARM_PREFIX_TARGET); see warm.py


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
    # What belongs to this container, so DEL/GC of it never touch a newer sandbox
    # of the same pod (the host veth name is derived from namespace/pod only):
    pod_uid: str = ""  # K8S_POD_UID at ADD ("" if the runtime did not pass it)
    host_ifindex: int = 0  # the host veth this ADD created; 0 = not known (yet)
    peer_ifindex: int = 0  # its peer, ifname in the pod netns
    netns_inode: int = 0  # st_ino of the pod netns at ADD (nsfs: unique while it lives)
    status_dir: str = ""

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
        self.grow_error: ProviderUnavailable | None = None  # why the last claim fell short
        self.last_claimed = 0  # addresses the last reconcile claimed
        self.last_wanted = 0  # addresses the last reconcile tried to claim
        self.demand = 0  # ADDs waiting for an address (the caller counts them)
        self._adopted = False  # the first reconcile adopts what the provider holds and we do not
        # Called outside the guard with an ENI the provider just attached (or that was
        # adopted) before its addresses are handed out, and with one just released
        # (the daemon's host plumbing for secondary ENIs, cni_shim/eni.py).
        self.on_eni_attached: Callable[[EniInfo], None] | None = None
        self.on_eni_released: Callable[[EniInfo], None] | None = None

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

    def by_host_veth(self, host_veth: str) -> list[Allocation]:
        """Allocations that claim a host veth of this name (several when sandboxes of one pod overlap)."""
        return [a for a in self.allocations.values() if host_veth and a.host_veth == host_veth]

    # --- changes -------------------------------------------------------------------

    def allocate(self, key: Key, now: float, **meta: str | int) -> Allocation:
        existing = self.allocations.get(key)
        if existing is not None:
            return existing
        free = self._free(now)
        if not free:
            if self.can_grow():
                raise PoolShort("no free address; the pool is growing")
            raise self.exhausted(now)
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

    def can_grow(self) -> bool:
        """Whether the limits leave room for more addresses (an ENI to attach, or room on one)."""
        lim = self.provider.limits
        if len(self.enis) < lim.max_enis:
            return True
        if lim.prefix_delegation:
            return any(len({warm.prefix_of(s.ipv4) for s in e.slots}) < lim.ips_per_eni - 1
                       for e in self.enis.values())
        return any(len(e.slots) < lim.slots_per_eni for e in self.enis.values())

    def exhausted(self, now: float) -> PoolExhausted:
        st = self.stats(now)
        lim = self.provider.limits
        return PoolExhausted(
            f"IP address pool exhausted: {st.assigned} of {st.total} addresses assigned, "
            f"{st.cooling} cooling down; this node supports at most {lim.max_pods} pods "
            f"({lim.instance_type}: {lim.max_enis} ENIs x {lim.ips_per_eni} IPs per ENI)"
        )

    def _demand_short(self, available: int) -> int:
        """Addresses waiting ADDs need beyond what is free: a whole ENI's worth in warm-ENI mode."""
        need = max(self.demand - available, 0)
        t, lim = self.targets, self.provider.limits
        if need and not (t.warm_ip > 0 or t.minimum_ip > 0 or lim.prefix_delegation) and lim.slots_per_eni:
            per = lim.slots_per_eni
            need = -(-need // per) * per
        return need

    def _grow(self, count: int, guard: Guard = nullcontext) -> int:
        """Claim up to ``count`` more slots from the provider; returns how many.

        Provider calls run outside ``guard``; each result is recorded under it at once.
        A provider failure (ProviderUnavailable) ends the claim: what was claimed stays,
        the error is kept in grow_error for the waiting ADDs to report."""
        got = 0
        with guard():
            self.grow_error = None
            held = [(e.info.id, [s.ipv4 for s in e.slots])
                    for e in sorted(self.enis.values(), key=lambda e: e.info.device)]
        try:
            for eid, have in held:
                if got >= count:
                    return got
                new = self.provider.assign_ips(eid, have, count - got)
                with guard():
                    self.enis[eid].slots.extend(new)
                got += len(new)
            while got < count:
                with guard():
                    attached = list(self.enis)
                if len(attached) >= self.provider.limits.max_enis:
                    break
                info = self.provider.attach_eni(attached)
                if info is None:
                    break
                with guard():
                    self.enis[info.id] = EniState(info)  # recorded before anything else can fail
                log.info("eni_attached", eni=info.id, device=info.device, table=info.table)
                self._eni_attached(info)
                new = self.provider.assign_ips(info.id, [], count - got)
                with guard():
                    self.enis[info.id].slots.extend(new)
                got += len(new)
        except ProviderUnavailable as exc:
            with guard():
                self.grow_error = exc
            log.warning("pool_claim_failed", error=str(exc), claimed=got, wanted=count)
        return got

    def _eni_attached(self, info: EniInfo) -> None:
        if self.on_eni_attached is not None and not info.is_primary:
            try:
                self.on_eni_attached(info)
            except Exception as exc:  # noqa: BLE001 - the daemon retries host plumbing at each upkeep
                log.warning("eni_host_setup_failed", eni=info.id, mac=info.mac, error=str(exc))

    def _shrink(self, count: int, now: float, guard: Guard = nullcontext) -> int:
        """Release up to ``count`` free addresses (whole free /28s in prefix mode), highest device first.

        The pool forgets them (under guard) before the provider is asked: if that fails, EC2
        keeps an address nobody hands out (adopted again at the next start), never the reverse."""
        released = 0
        prefix_mode = self.provider.limits.prefix_delegation
        gone: list[tuple[str, list[Slot]]] = []
        with guard():
            for eni, group in warm.release_groups(self.enis.values(), self._free(now), prefix_mode):
                if released + len(group) > count:
                    continue
                for s in group:
                    eni.slots.remove(s)
                gone.append((eni.info.id, group))
                released += len(group)
        for eid, group in gone:
            self.provider.release_ips(eid, group)
        return released

    def _release_enis(self, plan: "warm.Plan", now: float, guard: Guard = nullcontext) -> int:
        """Release whole secondary ENIs that hold no allocation and no cooling address, while the
        free addresses left still meet the target; returns how many addresses went with them.

        The ENI leaves the pool (under guard) before the provider detaches it, so no ADD
        can take one of its addresses meanwhile; if the provider refuses, it comes back."""
        released = 0
        while True:
            with guard():
                pick = None
                used = self._assigned()
                for e in sorted(self.enis.values(), key=lambda e: e.info.device, reverse=True):
                    if e.info.is_primary or any(s.ipv4 in used or s.ipv4 in self.cooling for s in e.slots):
                        continue
                    st = self.stats(now)
                    if st.available - len(e.slots) < plan.keep or st.total - len(e.slots) < plan.minimum:
                        continue
                    if self.demand:
                        continue  # ADDs are waiting: never shrink under them
                    pick = self.enis.pop(e.info.id)
                    break
            if pick is None:
                return released
            if not self.provider.release_eni(pick.info.id):
                with guard():
                    self.enis[pick.info.id] = pick
                return released
            log.info("eni_released", eni=pick.info.id, device=pick.info.device, addresses=len(pick.slots))
            if self.on_eni_released is not None:
                try:
                    self.on_eni_released(pick.info)
                except Exception as exc:  # noqa: BLE001 - the daemon retries at the next upkeep
                    log.warning("eni_host_teardown_failed", eni=pick.info.id, error=str(exc))
            released += max(len(pick.slots), 1)

    def _adopt(self, guard: Guard = nullcontext) -> int:
        """Take in what the provider holds and the checkpoint does not (a crash after a claim)."""
        inventory = getattr(self.provider, "inventory", None)
        if inventory is None:
            return 0
        held = inventory()  # a provider call: outside the guard
        for info, _slots in held:
            self._eni_attached(info)
        with guard():
            return self._merge(held)

    def _merge(self, held: list[tuple[EniInfo, list[Slot]]]) -> int:
        adopted = 0
        for info, slots in held:
            e = self.enis.get(info.id)
            if e is None:
                e = self.enis[info.id] = EniState(info)
                log.warning("eni_adopted_from_provider", eni=info.id, device=info.device)
            have = {s.ipv4 for s in e.slots}
            new = [s for s in slots if s.ipv4 not in have]
            e.slots.extend(new)
            adopted += len(new) + (1 if not have and not new else 0)
            if new:
                log.warning("addresses_adopted_from_provider", eni=info.id, count=len(new))
        return adopted

    def reconcile(self, now: float, guard: Guard = nullcontext) -> tuple[int, int]:
        """Move the pool towards the warm targets and the waiting ADDs; returns (claimed, released).

        ``guard()`` is held only around bookkeeping, never across a provider call; one
        reconcile at a time (the caller serialises them)."""
        adopted = 0
        try:
            if not self._adopted:
                adopted = self._adopt(guard)
                self._adopted = True
            with guard():
                empty = not self.enis
            if empty:
                info = self.provider.attach_eni([])
                if info is not None:
                    with guard():
                        self.enis[info.id] = EniState(info)
        except ProviderUnavailable as exc:
            log.warning("pool_provider_unavailable", error=str(exc))
            with guard():
                self.grow_error, self.last_claimed = exc, adopted
            return adopted, 0
        with guard():
            st = self.stats(now)
            plan = warm.plan(self.targets, self.provider.limits, st.available, st.total)
            short = max(plan.short, self._demand_short(st.available))
            self.last_wanted = short
            if not short:
                self.grow_error = None
        claimed = (self._grow(short, guard) if short else 0) + adopted
        released = self._shrink(plan.over, now, guard) if plan.over and not claimed and not self.demand else 0
        if not claimed:
            released += self._release_enis(plan, now, guard)
        with guard():
            self.last_claimed = claimed
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
        known = set(Allocation.__dataclass_fields__)
        for a in data.get("allocations", []):
            # Fields added later default (0/""); fields this version does not know are dropped.
            alloc = Allocation(**{k: v for k, v in a.items() if k in known})
            if alloc.ipv4 in claimed and alloc.eni in self.enis:
                self.allocations[alloc.key] = alloc
            else:
                dropped.append(alloc)
        self.cooling = {ip: float(t) for ip, t in data.get("cooling", {}).items()}
        return dropped

    def allocations_list(self) -> Iterable[Allocation]:
        return list(self.allocations.values())
