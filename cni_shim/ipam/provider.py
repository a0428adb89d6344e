"""Where the node's ENIs and addresses come from: a static file here, EC2 in ec2.py.

The pool asks a provider to attach ENIs and to assign or release secondary
addresses; it passes in what it already holds, so a provider need keep no state
of its own (the checkpoint is the pool's). The EC2 provider (ec2.py) implements
the same calls with Create/AttachNetworkInterface, AssignPrivateIpAddresses and
UnassignPrivateIpAddresses.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Collection, Protocol

import structlog

from cni_shim.ipam.limits import ENI_LIMITS, IPS_PER_PREFIX, max_pods, max_pods_prefix

log = structlog.get_logger(__name__)

MAIN_TABLE = 254


@dataclass(frozen=True)
class Slot:
    """One pod address: an IPv4 secondary address and, optionally, its IPv6 partner."""

    ipv4: str
    ipv6: str = ""


@dataclass(frozen=True)
class EniInfo:
    id: str
    device: int
    primary_ip: str
    table: int
    # Known to the EC2 provider (for the secondary-ENI plumbing); "" from the pool file.
    mac: str = ""
    subnet_cidr: str = ""

    @property
    def is_primary(self) -> bool:
        return self.device == 0


@dataclass(frozen=True)
class Limits:
    instance_type: str
    max_enis: int
    ips_per_eni: int  # including the ENI's own primary address
    prefix_delegation: bool = False  # each secondary-IP slot holds a /28 (16 pod addresses)
    vcpus: int = 0  # for the prefix-mode max-pods cap; 0 = unknown

    @property
    def max_pods(self) -> int:
        if self.prefix_delegation:
            return max_pods_prefix(self.max_enis, self.ips_per_eni, self.vcpus)
        return max_pods(self.max_enis, self.ips_per_eni)

    @property
    def slots_per_eni(self) -> int:
        """Pod addresses one ENI can hold."""
        return (self.ips_per_eni - 1) * (IPS_PER_PREFIX if self.prefix_delegation else 1)


class Provider(Protocol):
    limits: Limits

    def attach_eni(self, attached: Collection[str]) -> EniInfo | None:
        """Attach one more ENI (None when none can be attached); device 0 comes first."""

    def assign_ips(self, eni_id: str, have: Collection[str], count: int) -> list[Slot]:
        """Assign up to ``count`` more addresses on the ENI (``have``: IPv4s it holds already)."""

    def release_ips(self, eni_id: str, slots: Collection[Slot]) -> None:
        """Give addresses back (in prefix mode: whole /28s, all 16 slots of each)."""

    def release_eni(self, eni_id: str) -> bool:
        """Detach and delete a secondary ENI the pool no longer needs; False if the provider cannot."""

    def eni(self, eni_id: str) -> EniInfo | None:
        """What the provider knows about an ENI the pool holds."""

    def knows(self, eni_id: str, ipv4: str) -> bool:
        """Whether the address still belongs to the ENI (on restore)."""


class PoolFileError(ValueError):
    pass


class ProviderUnavailable(Exception):
    """The provider cannot give addresses right now (EC2 throttling, outage): try again later."""


class SubnetExhausted(ProviderUnavailable):
    """The subnet (or the ENI) has no free address; the message names the subnet."""


class StaticProvider:
    """ENIs and addresses listed in a JSON file (labs, on-prem nodes). Format in docs/cni.md."""

    def __init__(self, limits: Limits, enis: list[EniInfo], slots: dict[str, list[Slot]]) -> None:
        self.limits = limits
        self._enis = sorted(enis, key=lambda e: e.device)
        self._by_id = {e.id: e for e in self._enis}
        self._slots = slots

    @classmethod
    def from_file(cls, path: str) -> "StaticProvider":
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as exc:
            raise PoolFileError(f"pool file {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise PoolFileError(f"pool file {path}: not valid JSON: {exc}") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: object, path: str = "<pool>") -> "StaticProvider":
        def bad(msg: str) -> PoolFileError:
            return PoolFileError(f"pool file {path}: {msg}")

        if not isinstance(data, dict):
            raise bad("top level must be an object")
        itype = data.get("instanceType", "")
        if not isinstance(itype, str):
            raise bad("field 'instanceType' must be a string")
        lim = data.get("limits")
        if lim is not None:
            if not isinstance(lim, dict):
                raise bad("field 'limits' must be an object")
            try:
                max_enis, ips = int(lim["maxENIs"]), int(lim["ipsPerENI"])
            except (KeyError, TypeError, ValueError):
                raise bad("field 'limits' needs integers 'maxENIs' and 'ipsPerENI'") from None
            if max_enis < 1 or ips < 2:
                raise bad("field 'limits': maxENIs must be >= 1 and ipsPerENI >= 2")
        elif itype in ENI_LIMITS:
            max_enis, ips = ENI_LIMITS[itype]
        elif itype:
            raise bad(f"field 'instanceType': unknown type {itype!r} (give 'limits')")
        else:
            raise bad("field 'instanceType' or 'limits' is required")
        limits = Limits(itype or "custom", max_enis, ips)
        raw = data.get("enis")
        if not isinstance(raw, list) or not raw:
            raise bad("field 'enis' must be a non-empty list")
        enis: list[EniInfo] = []
        slots: dict[str, list[Slot]] = {}
        seen_ips: set[str] = set()
        for i, e in enumerate(raw):
            where = f"enis[{i}]"
            if not isinstance(e, dict):
                raise bad(f"{where} must be an object")
            eid = e.get("id")
            if not isinstance(eid, str) or not eid:
                raise bad(f"{where}.id must be a non-empty string")
            if eid in slots:
                raise bad(f"{where}.id {eid!r} is duplicated")
            dev = e.get("deviceNumber")
            if isinstance(dev, bool) or not isinstance(dev, int) or dev < 0:
                raise bad(f"{where}.deviceNumber must be an integer >= 0")
            if any(x.device == dev for x in enis):
                raise bad(f"{where}.deviceNumber {dev} is duplicated")
            table = e.get("routeTable", MAIN_TABLE if dev == 0 else dev + 1)
            if isinstance(table, bool) or not isinstance(table, int) or not 1 <= table < 2**32:
                raise bad(f"{where}.routeTable must be a positive integer")
            primary = _v4(e.get("primaryIP"), f"{where}.primaryIP", bad)
            v4s = e.get("secondaryIPs", [])
            if not isinstance(v4s, list):
                raise bad(f"{where}.secondaryIPs must be a list")
            v6s = e.get("secondaryIPv6")
            if v6s is not None and (not isinstance(v6s, list) or len(v6s) != len(v4s)):
                raise bad(f"{where}.secondaryIPv6 must be a list as long as secondaryIPs")
            eslots = []
            for j, a in enumerate(v4s):
                ip4 = _v4(a, f"{where}.secondaryIPs[{j}]", bad)
                ip6 = ""
                if v6s is not None:
                    try:
                        ip6 = str(ipaddress.IPv6Address(v6s[j]))
                    except (ValueError, TypeError):
                        raise bad(f"{where}.secondaryIPv6[{j}] {v6s[j]!r} is not an IPv6 address") from None
                for ip in (ip4, ip6):
                    if ip and ip in seen_ips:
                        raise bad(f"{where}: address {ip} is listed twice")
                    seen_ips.add(ip)
                eslots.append(Slot(ip4, ip6))
            if primary in seen_ips:
                raise bad(f"{where}.primaryIP {primary} is also a secondary address")
            seen_ips.add(primary)
            enis.append(EniInfo(eid, dev, primary, table))
            slots[eid] = eslots
        enis.sort(key=lambda x: x.device)
        if enis[0].device != 0:
            raise bad("no ENI with deviceNumber 0 (the primary ENI)")
        if len(enis) > limits.max_enis:
            log.warning("pool_file_extra_enis_ignored", path=path, max_enis=limits.max_enis,
                        ignored=[x.id for x in enis[limits.max_enis:]])
            for x in enis[limits.max_enis:]:
                del slots[x.id]
            enis = enis[: limits.max_enis]
        return cls(limits, enis, slots)

    def attach_eni(self, attached: Collection[str]) -> EniInfo | None:
        for e in self._enis:
            if e.id not in attached:
                return e
        return None

    def assign_ips(self, eni_id: str, have: Collection[str], count: int) -> list[Slot]:
        room = self.limits.slots_per_eni - len(have)
        out = []
        for s in self._slots.get(eni_id, []):
            if len(out) >= min(count, room):
                break
            if s.ipv4 not in have:
                out.append(s)
        return out

    def release_ips(self, eni_id: str, slots: Collection[Slot]) -> None:
        return None  # the file is the inventory; nothing to give back

    def release_eni(self, eni_id: str) -> bool:
        return False  # the file's ENIs stay attached

    def eni(self, eni_id: str) -> EniInfo | None:
        return self._by_id.get(eni_id)

    def knows(self, eni_id: str, ipv4: str) -> bool:
        return any(s.ipv4 == ipv4 for s in self._slots.get(eni_id, []))

    def slot(self, eni_id: str, ipv4: str) -> Slot | None:
        for s in self._slots.get(eni_id, []):
            if s.ipv4 == ipv4:
                return s
        return None


def _v4(value: object, where: str, bad) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except (ValueError, TypeError):
        raise bad(f"{where} {value!r} is not an IPv4 address") from None
