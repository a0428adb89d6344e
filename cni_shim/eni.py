"""Host plumbing for a secondary ENI, as the AWS VPC CNI's setupENINetwork does it.

When EC2 attaches an ENI, the kernel gets a new link with the ENI's MAC. For pods
whose addresses live on that ENI (rule 1536 `from <pod> lookup <table>`, plumbing.py)
the ENI needs (pkg/networkutils/network.go setupENINetwork; reference-facts §2.4):

- the link, found by MAC (it appears a moment after the attach: retried), MTU set
  (AWS_VPC_ENI_MTU, 9001), up;
- the ENI's primary address on it, and the route the kernel adds for it in main
  removed (the subnet is reached through the ENI's own table, not main);
- its route table (device number + 1 on network card 0; ``EniInfo.table``): a link
  route for the subnet, ``<gw>/32 scope link`` and ``default via <gw>``, where gw is
  the subnet's first address after the base (the VPC router, e.g. 10.0.16.1);
- rule 32765 ``from <ENI primary IP> lookup <table>``: traffic from the ENI's own
  address leaves through the ENI.

All steps are idempotent (a second call changes nothing); teardown removes the rule,
the table's routes and the address, and never deletes the link (EC2's detach does).
Never touches device 0 (the primary ENI uses main) or a table below 2.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_shim.ipam.provider import MAIN_TABLE, EniInfo
from cni_shim.plumbing import host_ipr, ipr_in, open_netns

log = structlog.get_logger(__name__)

ENI_SOURCE_RULE_PRIORITY = 32765  # AWS: from the ENI's primary IP -> its table
RT_SCOPE_LINK = 253
RT_SCOPE_UNIVERSE = 0
RTPROT_KERNEL = 2
AF_INET = 2


class EniPlumbingError(RuntimeError):
    pass


@dataclass(frozen=True)
class EniNet:
    id: str
    mac: str
    device: int
    table: int
    primary_ip: str
    subnet_cidr: str
    mtu: int = 9001

    @classmethod
    def of(cls, info: EniInfo, mtu: int = 9001) -> "EniNet":
        return cls(info.id, info.mac, info.device, info.table, info.primary_ip, info.subnet_cidr, mtu)

    def validate(self) -> None:
        if self.device == 0 or self.table in (0, MAIN_TABLE, 255) or self.table < 2:
            raise EniPlumbingError(f"ENI {self.id}: device {self.device} / table {self.table} is not a secondary "
                                   "ENI's own table (the primary ENI uses main)")
        if not self.mac:
            raise EniPlumbingError(f"ENI {self.id}: no MAC address known")
        try:
            net = ipaddress.IPv4Network(self.subnet_cidr)
            ip = ipaddress.IPv4Address(self.primary_ip)
        except ValueError as exc:
            raise EniPlumbingError(f"ENI {self.id}: subnet_cidr {self.subnet_cidr!r} / primary_ip "
                                   f"{self.primary_ip!r}: {exc}") from None
        if ip not in net:
            raise EniPlumbingError(f"ENI {self.id}: primary_ip {ip} is not in subnet_cidr {net}")

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet_cidr)

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)


@contextmanager
def _ipr(netns: str | None) -> Iterator[IPRoute]:
    """The daemon's own namespace (None), or the one at a path (tests)."""
    if netns is None:
        with host_ipr() as ipr:
            yield ipr
        return
    fd = open_netns(netns)
    try:
        with ipr_in(fd) as ipr:
            yield ipr
    finally:
        os.close(fd)


def link_by_mac(ipr: IPRoute, mac: str) -> int | None:
    mac = mac.lower()
    for link in ipr.get_links():
        if (link.get("IFLA_ADDRESS") or "").lower() == mac and link.get("IFLA_INFO_KIND") != "bridge":
            return link["index"]
    return None


def _wait_link(ipr: IPRoute, net: EniNet, wait: float) -> int:
    deadline = time.monotonic() + wait
    while True:
        idx = link_by_mac(ipr, net.mac)
        if idx is not None:
            return idx
        if time.monotonic() >= deadline:
            raise EniPlumbingError(f"ENI {net.id}: no link with MAC {net.mac} (waited {wait:g}s after the attach)")
        time.sleep(0.2)


def _routes(net: EniNet, idx: int) -> list[dict]:
    """The ENI table's routes, as pyroute2 route specs."""
    return [
        dict(dst=str(net.subnet), oif=idx, scope=RT_SCOPE_LINK, prefsrc=net.primary_ip, table=net.table),
        dict(dst=f"{net.gateway}/32", oif=idx, scope=RT_SCOPE_LINK, table=net.table),
        dict(dst="0.0.0.0/0", gateway=net.gateway, oif=idx, table=net.table),
    ]


def _rule_spec(net: EniNet) -> dict:
    return dict(family=AF_INET, src=net.primary_ip, src_len=32, table=net.table, priority=ENI_SOURCE_RULE_PRIORITY)


def _source_rules(ipr: IPRoute, net: EniNet) -> list:
    return [r for r in ipr.get_rules(family=AF_INET)
            if r.get("priority") == ENI_SOURCE_RULE_PRIORITY and r.get("FRA_SRC") == net.primary_ip
            and r["src_len"] == 32]


def setup_eni(net: EniNet, netns: str | None = None, wait: float = 10.0) -> int:
    """Plumb the ENI on the host; returns its link's ifindex. Idempotent."""
    net.validate()
    plen = net.subnet.prefixlen
    with _ipr(netns) as ipr:
        idx = _wait_link(ipr, net, wait)
        link = ipr.get_links(idx)[0]
        if link.get("IFLA_MTU") != net.mtu:
            ipr.link("set", index=idx, mtu=net.mtu)
        if not link["flags"] & 1:
            ipr.link("set", index=idx, state="up")
        addrs = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(family=AF_INET, index=idx)}
        for a, p in addrs - {(net.primary_ip, plen)}:
            # Only our address belongs on the ENI's link (AWS deletes the others, e.g. from DHCP).
            with _ignore(errno.EADDRNOTAVAIL):
                ipr.addr("del", index=idx, address=a, prefixlen=p)
        if (net.primary_ip, plen) not in addrs:
            ipr.addr("add", index=idx, address=net.primary_ip, prefixlen=plen)
        # The kernel's subnet route in main would send the subnet out of this ENI for everyone.
        for r in ipr.get_routes(family=AF_INET, table=MAIN_TABLE, oif=idx):
            if r.get("RTA_DST") == str(net.subnet.network_address) and r["dst_len"] == plen:
                with _ignore(errno.ESRCH, errno.ENOENT):
                    ipr.route("del", dst=str(net.subnet), oif=idx, table=MAIN_TABLE, scope=r["scope"],
                              proto=r["proto"])
        for spec in _routes(net, idx):
            ipr.route("replace", **spec)
        if not _source_rules(ipr, net):
            ipr.rule("add", **_rule_spec(net))
    log.info("eni_plumbed", eni=net.id, mac=net.mac, ifindex=idx, table=net.table, gateway=net.gateway,
             subnet=net.subnet_cidr)
    return idx


def teardown_eni(net: EniNet, netns: str | None = None) -> None:
    """Remove what setup_eni built (rule, table routes, address); the link stays. Idempotent."""
    net.validate()
    with _ipr(netns) as ipr:
        for r in _source_rules(ipr, net):
            with _ignore(errno.ENOENT):
                ipr.rule("del", **{**_rule_spec(net), "table": r.get("FRA_TABLE") or r["table"]})
        for r in ipr.get_routes(family=AF_INET, table=net.table):
            if (r.get("RTA_TABLE") or r["table"]) != net.table:
                continue
            spec = {"family": AF_INET, "table": net.table, "dst_len": r["dst_len"], "scope": r["scope"]}
            if r.get("RTA_DST"):
                spec["dst"] = r.get("RTA_DST")
            with _ignore(errno.ESRCH, errno.ENOENT):
                ipr.route("del", **spec)
        idx = link_by_mac(ipr, net.mac)
        if idx is not None:
            with _ignore(errno.EADDRNOTAVAIL):
                ipr.addr("del", index=idx, address=net.primary_ip, prefixlen=net.subnet.prefixlen)
    log.info("eni_unplumbed", eni=net.id, mac=net.mac, table=net.table)


def check_eni(net: EniNet, netns: str | None = None) -> list[str]:
    """What is missing or different from what setup_eni builds ([] when all is in place)."""
    net.validate()
    problems: list[str] = []
    with _ipr(netns) as ipr:
        idx = link_by_mac(ipr, net.mac)
        if idx is None:
            return [f"no link with MAC {net.mac} for ENI {net.id}"]
        link = ipr.get_links(idx)[0]
        if not link["flags"] & 1:
            problems.append(f"link {link.get('IFLA_IFNAME')} of ENI {net.id} is down")
        if link.get("IFLA_MTU") != net.mtu:
            problems.append(f"link {link.get('IFLA_IFNAME')} MTU {link.get('IFLA_MTU')} != {net.mtu}")
        addrs = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(family=AF_INET, index=idx)}
        if (net.primary_ip, net.subnet.prefixlen) not in addrs:
            problems.append(f"address {net.primary_ip}/{net.subnet.prefixlen} missing on the ENI's link")
        have = {(r.get("RTA_DST"), r["dst_len"], r.get("RTA_GATEWAY"), r.get("RTA_OIF"))
                for r in ipr.get_routes(family=AF_INET, table=net.table) if (r.get("RTA_TABLE") or r["table"]) == net.table}
        for spec in _routes(net, idx):
            dst, _, plen = spec["dst"].partition("/")
            want = (None if plen == "0" else dst, int(plen), spec.get("gateway"), idx)
            if want not in have:
                problems.append(f"route {spec['dst']}{' via ' + spec['gateway'] if 'gateway' in spec else ''} "
                                f"table {net.table} missing")
        main = [r for r in ipr.get_routes(family=AF_INET, table=MAIN_TABLE, oif=idx)
                if r.get("RTA_DST") == str(net.subnet.network_address) and r["dst_len"] == net.subnet.prefixlen]
        if main:
            problems.append(f"subnet route {net.subnet} in main still points at the ENI's link")
        rules = _source_rules(ipr, net)
        if not any((r.get("FRA_TABLE") or r["table"]) == net.table for r in rules):
            problems.append(f"rule from {net.primary_ip} lookup {net.table} priority {ENI_SOURCE_RULE_PRIORITY} missing")
    return problems


@contextmanager
def _ignore(*codes: int):
    try:
        yield
    except NetlinkError as exc:
        if exc.code not in codes:
            raise
