"""Pod plumbing with pyroute2, as the AWS VPC CNI does it (driver.go).

Host side lives in the namespace the daemon runs in; the pod side in the
namespace at the request's CNI_NETNS path. We reach the pod namespace with a
per-thread setns(2) around opening the netlink socket (a socket stays bound to
the namespace it was created in), which costs ~1 ms, where pyroute2's own
``IPRoute(netns=...)`` forks a helper process and creates missing namespaces.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_shim.ipam.provider import MAIN_TABLE
from cni_shim.protocol import GATEWAY_V4, GATEWAY_V6
from policy_agent.shared.netns import setns as _setns

log = structlog.get_logger(__name__)

TO_POD_RULE_PRIORITY = 512
FROM_POD_RULE_PRIORITY = 1536
NUD_PERMANENT = 0x80
IFA_F_NODAD = 0x02
RT_SCOPE_LINK = 253
AF_INET, AF_INET6 = 2, 10

class PlumbingError(Exception):
    pass


class NetnsMissing(PlumbingError):
    pass


@dataclass(frozen=True)
class PodNet:
    host_veth: str
    ifname: str
    netns: str
    ipv4: str
    ipv6: str = ""
    mtu: int = 9001
    table: int = MAIN_TABLE


class Built(NamedTuple):
    """What setup() made: the MACs for the result, the ifindexes for ownership."""

    host_mac: str
    pod_mac: str
    host_ifindex: int
    peer_ifindex: int


def netns_inode(path: str) -> int:
    """Identity of the network namespace at path (nsfs inode), 0 if there is none."""
    try:
        return os.stat(path).st_ino if path else 0
    except OSError:
        return 0


def open_netns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsMissing(f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise NetnsMissing(f"network namespace {path}: {exc.strerror}") from None


@contextmanager
def ipr_in(netns_fd: int) -> Iterator[IPRoute]:
    """An IPRoute whose socket lives in the namespace ``netns_fd``; this thread only."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(netns_fd)
        except OSError as exc:
            raise NetnsMissing(f"cannot enter network namespace: {exc}") from None
        try:
            ipr = IPRoute()
        finally:
            _setns(own)
    finally:
        os.close(own)
    try:
        yield ipr
    finally:
        ipr.close()


@contextmanager
def host_ipr() -> Iterator[IPRoute]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _mac(ipr: IPRoute, index: int) -> str:
    return ipr.get_links(index)[0].get("IFLA_ADDRESS")


def _ignore(*codes: int):
    @contextmanager
    def cm():
        try:
            yield
        except NetlinkError as exc:
            if exc.code not in codes:
                raise
    return cm()




def setup(pod: PodNet, after_veth: Callable[[], None] | None = None) -> Built:
    """Build everything for one pod. Caller undoes on error.

    A host link already named pod.host_veth is deleted first: the name belongs to the
    pod, and the newest sandbox of a pod takes it over (the caller records that the
    older allocation no longer owns it)."""
    nsfd = open_netns(pod.netns)
    try:
        with host_ipr() as host, ipr_in(nsfd) as podr:
            old = _index(host, pod.host_veth)
            if old is not None:  # a leftover of an earlier attempt (AWS does the same)
                log.info("stale_host_veth_deleted", host_veth=pod.host_veth)
                with _ignore(errno.ENODEV):
                    host.link("del", index=old)
            if _index(podr, pod.ifname) is not None:
                raise PlumbingError(f"interface {pod.ifname} already exists in {pod.netns}")
            # Peer created directly in the pod netns: no move between namespaces.
            host.link(
                "add", ifname=pod.host_veth, kind="veth", mtu=pod.mtu,
                peer={"ifname": pod.ifname, "net_ns_fd": nsfd, "mtu": pod.mtu},
            )
            hidx = _index(host, pod.host_veth)
            pidx = _index(podr, pod.ifname)
            if hidx is None or pidx is None:
                raise PlumbingError(f"veth {pod.host_veth}/{pod.ifname} vanished after creation")
            if after_veth is not None:
                after_veth()
            if pod.ipv6:
                _sysctl_v6(pod.host_veth)
            host.link("set", index=hidx, state="up")
            host_mac = _mac(host, hidx)
            # pod side
            lo = _index(podr, "lo")
            if lo is not None:
                podr.link("set", index=lo, state="up")
            podr.link("set", index=pidx, state="up")
            podr.addr("add", index=pidx, address=pod.ipv4, prefixlen=32)
            podr.route("replace", dst=f"{GATEWAY_V4}/32", oif=pidx, scope=RT_SCOPE_LINK)
            podr.route("replace", dst="0.0.0.0/0", gateway=GATEWAY_V4, oif=pidx)
            podr.neigh("replace", dst=GATEWAY_V4, lladdr=host_mac, ifindex=pidx, state=NUD_PERMANENT)
            if pod.ipv6:
                podr.addr("add", index=pidx, address=pod.ipv6, prefixlen=128, flags=IFA_F_NODAD)
                podr.neigh("replace", dst=GATEWAY_V6, lladdr=host_mac, ifindex=pidx,
                           state=NUD_PERMANENT, family=AF_INET6)
                podr.route("replace", dst="::/0", gateway=GATEWAY_V6, oif=pidx, family=AF_INET6)
            pod_mac = _mac(podr, pidx)
            # host side
            host.route("replace", dst=f"{pod.ipv4}/32", oif=hidx, scope=RT_SCOPE_LINK)
            if pod.ipv6:
                host.route("replace", dst=f"{pod.ipv6}/128", oif=hidx, family=AF_INET6)
            _rules(host, pod, add=True)
            return Built(host_mac, pod_mac, hidx, pidx)
    finally:
        os.close(nsfd)


def _sysctl_v6(host_veth: str) -> None:
    # As AWS: before the host end is up, no RA and no forwarding decisions on it.
    # No DAD either: while the host end's link-local address is tentative the node
    # sends no neighbour solicitation, and the new pod is unreachable over IPv6 for
    # 1-2 s after ADD returned (found by the churn campaign, docs/reliability.md).
    for key, value in (("accept_ra", "0"), ("accept_redirects", "1"), ("accept_dad", "0")):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{host_veth}/{key}", "w") as f:
                f.write(value)
        except OSError:
            pass


def _rule_specs(pod: PodNet, all_kinds: bool = False) -> list[dict]:
    """As the AWS CNI: 512 `to <pod> lookup main` for every pod (so a reply to a pod on the
    primary ENI never follows another pod's ENI table), 1536 `from <pod> lookup <table>` only
    for pods on a secondary ENI. ``all_kinds``: both, whatever the table (for deletion)."""
    specs = [dict(family=AF_INET, dst=pod.ipv4, dst_len=32, table=MAIN_TABLE, priority=TO_POD_RULE_PRIORITY)]
    if pod.table != MAIN_TABLE or all_kinds:
        specs.append(dict(family=AF_INET, src=pod.ipv4, src_len=32, table=pod.table, priority=FROM_POD_RULE_PRIORITY))
    if pod.ipv6:
        specs.append(dict(family=AF_INET6, dst=pod.ipv6, dst_len=128, table=MAIN_TABLE, priority=TO_POD_RULE_PRIORITY))
        if pod.table != MAIN_TABLE or all_kinds:
            specs.append(dict(family=AF_INET6, src=pod.ipv6, src_len=128, table=pod.table,
                              priority=FROM_POD_RULE_PRIORITY))
    return specs


def _rules(host: IPRoute, pod: PodNet, add: bool) -> None:
    for spec in _rule_specs(pod, all_kinds=not add):
        if add:
            with _ignore(errno.EEXIST):
                host.rule("add", **spec)
        else:
            _rule_del_all(host, spec)


def _rule_matches(rule, spec: dict) -> bool:
    if rule.get("priority") != spec["priority"]:
        return False
    if "dst" in spec:
        return rule.get("FRA_DST") == spec["dst"] and rule["dst_len"] == spec["dst_len"]
    return rule.get("FRA_SRC") == spec["src"] and rule["src_len"] == spec["src_len"]


def _rule_del_all(host: IPRoute, spec: dict) -> int:
    """Delete every rule like spec (older AWS versions left duplicates; so might a crash)."""
    n = 0
    for rule in host.get_rules(family=spec["family"]):
        if _rule_matches(rule, spec):
            with _ignore(errno.ENOENT):
                host.rule("del", family=spec["family"], priority=rule.get("priority"),
                          table=rule.get("FRA_TABLE") or rule["table"],
                          **{k: spec[k] for k in ("dst", "dst_len", "src", "src_len") if k in spec})
                n += 1
    return n


def teardown(pod: PodNet, host_ifindex: int = 0) -> None:
    """Remove what setup() built for this pod's addresses (host side). Idempotent.

    The host veth is deleted only if host_ifindex names it: the link with that index
    still carries pod.host_veth. Never by name alone: the name is derived from
    namespace/pod, so it may now belong to a newer sandbox of the same pod. The pod
    end goes with the host end (a veth pair dies as one)."""
    with host_ipr() as host:
        if pod.ipv4:
            _rules(host, pod, add=False)
            with _ignore(errno.ESRCH, errno.ENOENT, errno.ENODEV):
                host.route("del", dst=f"{pod.ipv4}/32")
        if pod.ipv6:
            with _ignore(errno.ESRCH, errno.ENOENT, errno.ENODEV):
                host.route("del", dst=f"{pod.ipv6}/128", family=AF_INET6)
        if host_ifindex and pod.host_veth and _index(host, pod.host_veth) == host_ifindex:
            with _ignore(errno.ENODEV):
                host.link("del", index=host_ifindex)


def link_index(name: str) -> int | None:
    """ifindex of the host link called name, or None."""
    if not name:
        return None
    with host_ipr() as host:
        return _index(host, name)


def peer_of(host_veth: str, netns: str, ifname: str) -> int:
    """ifindex of host_veth if its veth peer is ifname inside the netns at path netns, else 0.

    Proves that a host veth is a given sandbox's when no ifindex was recorded (a
    half-done ADD, an unknown DEL): the peer must be that interface index in that
    namespace (link netnsid and peer index both match). A sandbox whose netns is gone
    has no veth left, so the answer is 0 for it."""
    if not host_veth or not netns or not ifname:
        return 0
    try:
        nsfd = open_netns(netns)
    except NetnsMissing:
        return 0
    try:
        with host_ipr() as host, ipr_in(nsfd) as podr:
            hidx = _index(host, host_veth)
            pidx = _index(podr, ifname)
            if hidx is None or pidx is None:
                return 0
            hlink = host.get_links(hidx)[0]
            plink = podr.get_links(pidx)[0]
            try:
                nsid = host.get_netnsid(fd=nsfd).get("nsid")
            except NetlinkError:
                return 0
            if (hlink.get("IFLA_LINK") == pidx and plink.get("IFLA_LINK") == hidx
                    and nsid is not None and hlink.get("IFLA_LINK_NETNSID") == nsid):
                return hidx
            return 0
    except NetnsMissing:
        return 0
    finally:
        os.close(nsfd)


def host_links() -> dict[str, int]:
    """Host link name -> ifindex."""
    with host_ipr() as host:
        return {link.get("IFLA_IFNAME"): link["index"] for link in host.get_links()}


def check(pod: PodNet, host_mac_expected: str = "") -> list[str]:
    """What is missing or different from what setup() builds ([] when all is in place)."""
    problems: list[str] = []
    try:
        nsfd = open_netns(pod.netns)
    except NetnsMissing as exc:
        return [str(exc)]
    try:
        with host_ipr() as host, ipr_in(nsfd) as podr:
            hidx = _index(host, pod.host_veth)
            if hidx is None:
                return [f"host veth {pod.host_veth} is missing"]
            host_link = host.get_links(hidx)[0]
            host_mac = host_link.get("IFLA_ADDRESS")
            if host_link.get("IFLA_OPERSTATE") != "UP" and not (host_link["flags"] & 1):
                problems.append(f"host veth {pod.host_veth} is down")
            if host_link.get("IFLA_MTU") != pod.mtu:
                problems.append(f"host veth {pod.host_veth} MTU {host_link.get('IFLA_MTU')} != {pod.mtu}")
            pidx = _index(podr, pod.ifname)
            if pidx is None:
                return problems + [f"pod interface {pod.ifname} is missing in {pod.netns}"]
            plink = podr.get_links(pidx)[0]
            if not plink["flags"] & 1:
                problems.append(f"pod interface {pod.ifname} is down")
            if plink.get("IFLA_MTU") != pod.mtu:
                problems.append(f"pod interface {pod.ifname} MTU {plink.get('IFLA_MTU')} != {pod.mtu}")
            addrs = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in podr.get_addr(index=pidx)}
            want = [(pod.ipv4, 32)] + ([(pod.ipv6, 128)] if pod.ipv6 else [])
            for a in want:
                if a not in addrs:
                    problems.append(f"pod address {a[0]}/{a[1]} missing on {pod.ifname}")
            routes = {(r.get("RTA_DST"), r["dst_len"], r.get("RTA_GATEWAY"), r["scope"])
                      for r in podr.get_routes(family=AF_INET, oif=pidx, table=MAIN_TABLE)}
            if (GATEWAY_V4, 32, None, RT_SCOPE_LINK) not in routes:
                problems.append(f"pod route {GATEWAY_V4} scope link missing")
            if not any(r[0] is None and r[1] == 0 and r[2] == GATEWAY_V4 for r in routes):
                problems.append(f"pod default route via {GATEWAY_V4} missing")
            neighs = {(n.get("NDA_DST"), n.get("NDA_LLADDR"), n["state"]) for n in podr.get_neighbours(ifindex=pidx)}
            if (GATEWAY_V4, host_mac, NUD_PERMANENT) not in neighs:
                problems.append(f"pod permanent neighbour {GATEWAY_V4} -> {host_mac} missing")
            if pod.ipv6:
                if (GATEWAY_V6, host_mac, NUD_PERMANENT) not in neighs:
                    problems.append(f"pod permanent neighbour {GATEWAY_V6} -> {host_mac} missing")
                r6 = [r for r in podr.get_routes(family=AF_INET6, oif=pidx, table=MAIN_TABLE)
                      if r["dst_len"] == 0 and r.get("RTA_GATEWAY") == GATEWAY_V6]
                if not r6:
                    problems.append(f"pod default route via {GATEWAY_V6} missing")
            hroutes = {(r.get("RTA_DST"), r["dst_len"]) for r in host.get_routes(family=AF_INET, oif=hidx, table=MAIN_TABLE)}
            if (pod.ipv4, 32) not in hroutes:
                problems.append(f"host route {pod.ipv4}/32 dev {pod.host_veth} missing")
            if pod.ipv6:
                h6 = {(r.get("RTA_DST"), r["dst_len"]) for r in host.get_routes(family=AF_INET6, oif=hidx)}
                if (pod.ipv6, 128) not in h6:
                    problems.append(f"host route {pod.ipv6}/128 dev {pod.host_veth} missing")
            for spec in _rule_specs(pod):
                rules = host.get_rules(family=spec["family"])
                if not any(_rule_matches(r, spec) and (r.get("FRA_TABLE") or r["table"]) == spec["table"]
                           for r in rules):
                    what = f"to {spec['dst']}" if "dst" in spec else f"from {spec['src']}"
                    problems.append(f"rule {what} lookup {spec['table']} priority {spec['priority']} missing")
            if host_mac_expected and host_mac_expected != host_mac:
                problems.append(f"host veth MAC {host_mac} != {host_mac_expected} from the result")
    finally:
        os.close(nsfd)
    return problems


def rules_for(ip: str) -> list[tuple[int, int]]:
    """(priority, table) of every rule that names ip as src or dst (for tests and GC)."""
    out = []
    fam = AF_INET6 if ":" in ip else AF_INET
    with host_ipr() as host:
        for r in host.get_rules(family=fam):
            if ip in (r.get("FRA_DST"), r.get("FRA_SRC")):
                out.append((r.get("priority"), r.get("FRA_TABLE") or r["table"]))
    return out
