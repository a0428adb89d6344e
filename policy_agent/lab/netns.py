"""Safe helpers for private network namespaces: create, wire, serve, probe, clean up.

Everything here acts inside named network namespaces only; nothing touches the
root namespace's links, routes, rules or sets. Needs root.

API summary (import as ``from policy_agent.lab import netns``):

  Namespaces
    unique_name(area, role)            -> "pa-<area>-<pid>-<role>" (use in tests)
    create(name)                       ip netns add + lo up (idempotent: replaces a leftover)
    delete(name)                       kill every process inside (by pid), then ip netns del
    exists(name) / list_names(prefix)  current namespaces (optionally by prefix)
    cleanup_prefix(prefix)             delete every namespace whose name starts with prefix
    run(ns, *argv, check=True, input=None, timeout=60) -> CompletedProcess (text)
    ip(ns, *args)                      `ip -n ns ...` (raises NetnsError on failure)
    enable_forwarding(ns)              ip_forward=1 (v4 and v6) inside ns
    in_netns(ns)                       context manager: this *thread* in ns (setns)

  Wiring without the CNI (tests that exercise only the dataplane)
    add_veth(node_ns, pod_ns, host_ifname, pod_ips, pod_ifname="eth0") -> Veth
        AWS VPC CNI style: pod side gets <ip>/32 (/128), a link route to the
        gateway 169.254.1.1 (fe80::1), a default route via it and a permanent
        neighbour for it with the host veth's MAC; node side gets /32 (/128)
        routes to the pod via the host veth.
    add_peer_link(node_ns, peer_ns, host_ifname, peer_ips)  same, for "remote" peers

  Servers (TCP accept + UDP echo on the given ports, on every address)
    start_server(ns, tcp_ports, udp_ports, log_path=None, timeout=20, detach=False, name=None)
        -> Server(pid, ns, ...); the server answers with ``name`` (default: ns)
    stop_server(server_or_pid)         SIGTERM, then SIGKILL, by pid only

  Probes (real sockets created inside the source namespace)
    probe(ns, ip, port, protocol="TCP", timeout=1.0) -> bool
        TCP: the connection is established; UDP: a datagram comes back.
    probe_many([Probe(ns, ip, port, protocol, key)], timeout=1.0, attempts=2, workers=64)
        -> {key: bool}; parallel threads; a failed probe is retried up to
        ``attempts`` times (a loaded machine can lose a first SYN), a success is final.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import structlog

from policy_agent.shared import netns as _shared_netns

log = structlog.get_logger(__name__)

NETNS_DIR = _shared_netns.NETNS_DIR
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::1"


class NetnsError(RuntimeError):
    """A command inside a namespace failed; the message carries argv and stderr."""


# --- namespaces -------------------------------------------------------------------


def unique_name(area: str, role: str) -> str:
    """A namespace name unique to this process: pa-<area>-<pid>-<role>."""
    return f"pa-{area}-{os.getpid()}-{role}"


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def list_names(prefix: str = "") -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


_check_name = _shared_netns.check_name


def _cmd(argv: Sequence[str], check: bool = True, input: str | None = None, timeout: float = 60):
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def create(name: str) -> None:
    """Create namespace ``name`` with lo up. A leftover of the same name is removed first."""
    _check_name(name)
    if exists(name):
        delete(name)
    _cmd(["ip", "netns", "add", name])
    _cmd(["ip", "-n", name, "link", "set", "lo", "up"])
    log.debug("netns_created", netns=name)


def pids_in(name: str) -> list[int]:
    proc = _cmd(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def delete(name: str) -> None:
    """Kill the processes inside ``name`` (they are ours: the namespace is), then delete it."""
    _check_name(name)
    if not exists(name):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in pids_in(name) if p != os.getpid()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if pids and sig == signal.SIGTERM:
            _wait_gone(pids, 3.0)
    proc = _cmd(["ip", "netns", "del", name], check=False)
    if proc.returncode != 0 and exists(name):
        raise NetnsError(f"ip netns del {name} failed: {proc.stderr.strip()}")
    log.debug("netns_deleted", netns=name)


def _wait_gone(pids: Iterable[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            if not _alive(pid):
                pending.discard(pid)
        if pending:
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        # Reap if it is our child, so a zombie does not look alive.
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with ``prefix``; returns the names removed."""
    if len(prefix) < 4:
        raise ValueError(f"prefix {prefix!r} is too short to be safely ours")
    removed = []
    for name in list_names(prefix):
        delete(name)
        removed.append(name)
    return removed


def run(ns: str, *argv: str, check: bool = True, input: str | None = None, timeout: float = 60,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run argv inside namespace ``ns`` (ip netns exec); text output captured."""
    _check_name(ns)
    full = ["ip", "netns", "exec", ns, *argv]
    proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(full)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ip -n ns args...`."""
    _check_name(ns)
    return _cmd(["ip", "-n", ns, *args], check=check)


def enable_forwarding(ns: str) -> None:
    run(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    run(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1", check=False)


@contextlib.contextmanager
def scratch(area: str, role: str) -> Iterator[str]:
    """A fresh namespace for the block, deleted after it, whether it failed or not."""
    name = unique_name(area, role)
    create(name)
    try:
        yield name
    finally:
        delete(name)


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Move the calling thread into ``ns`` for the block; sockets made inside stay there."""
    _check_name(ns)
    with _shared_netns.in_netns(ns):
        yield


# --- wiring without the CNI ------------------------------------------------------------


@dataclass(frozen=True)
class Veth:
    node_ns: str
    pod_ns: str
    host_ifname: str
    pod_ifname: str
    ips: tuple[str, ...]
    host_mac: str


def _link_mac(ns: str, ifname: str) -> str:
    out = ip(ns, "-j", "link", "show", "dev", ifname).stdout
    return json.loads(out)[0]["address"]


def add_veth(node_ns: str, pod_ns: str, host_ifname: str, pod_ips: Sequence[str], pod_ifname: str = "eth0") -> Veth:
    """Wire ``pod_ns`` to ``node_ns`` the way the AWS VPC CNI does (see module doc)."""
    if len(host_ifname) > 15:
        raise ValueError(f"interface name {host_ifname!r} is longer than 15 characters")
    ips = [ipaddress.ip_address(a) for a in pod_ips]
    ip(node_ns, "link", "add", host_ifname, "type", "veth", "peer", "name", pod_ifname, "netns", pod_ns)
    if any(a.version == 6 for a in ips):
        for key in ("accept_ra=0", "forwarding=1"):
            run(node_ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{host_ifname}.{key}", check=False)
    ip(node_ns, "link", "set", host_ifname, "up")
    ip(pod_ns, "link", "set", pod_ifname, "up")
    mac = _link_mac(node_ns, host_ifname)
    for a in ips:
        plen = 32 if a.version == 4 else 128
        gw = GATEWAY_V4 if a.version == 4 else GATEWAY_V6
        fam = "-4" if a.version == 4 else "-6"
        extra = ["nodad"] if a.version == 6 else []
        ip(pod_ns, fam, "addr", "add", f"{a}/{plen}", "dev", pod_ifname, *extra)
        if a.version == 4:
            ip(pod_ns, fam, "route", "replace", f"{gw}/32", "dev", pod_ifname, "scope", "link")
            ip(pod_ns, fam, "route", "replace", "default", "via", gw, "dev", pod_ifname)
        else:
            ip(pod_ns, fam, "route", "replace", "default", "via", gw, "dev", pod_ifname)
        ip(pod_ns, fam, "neigh", "replace", gw, "lladdr", mac, "dev", pod_ifname, "nud", "permanent")
        ip(node_ns, fam, "route", "replace", f"{a}/{plen}", "dev", host_ifname, "scope", "link")
    if any(a.version == 6 for a in ips):
        # The node answers for fe80::1 on this link (the pod's gateway).
        ip(node_ns, "-6", "addr", "add", f"{GATEWAY_V6}/64", "dev", host_ifname, "nodad", check=False)
    log.debug("veth_added", node_netns=node_ns, pod_netns=pod_ns, interface=host_ifname, ips=list(pod_ips))
    return Veth(node_ns, pod_ns, host_ifname, pod_ifname, tuple(str(a) for a in ips), mac)


def add_peer_link(node_ns: str, peer_ns: str, host_ifname: str, peer_ips: Sequence[str]) -> Veth:
    """A "remote" peer (pod on another node): wired like a pod, but under a non-pod interface
    prefix so the agent does not treat it as a local endpoint."""
    return add_veth(node_ns, peer_ns, host_ifname, peer_ips)


# --- servers -------------------------------------------------------------------------


@dataclass
class Server:
    pid: int
    ns: str
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()
    log_path: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)


def start_server(ns: str, tcp_ports: Iterable[int] = (), udp_ports: Iterable[int] = (),
                 log_path: str | None = None, timeout: float = 20.0, detach: bool = False,
                 name: str | None = None) -> Server:
    """Start ``python -m policy_agent.lab.server`` inside ``ns``; return once it listens.

    ``detach``: new session, so it outlives this process (the lab CLI uses this).
    """
    tcp = tuple(sorted({int(p) for p in tcp_ports}))
    udp = tuple(sorted({int(p) for p in udp_ports}))
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "policy_agent.lab.server",
            "--tcp", ",".join(map(str, tcp)), "--udp", ",".join(map(str, udp)), "--name", name or ns]
    logf = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL,
                                start_new_session=detach, cwd=_project_root())
    finally:
        if log_path:
            logf.close()
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode().strip() if ready else ""
    proc.stdout.close()
    if line != "ready":
        stop_server(proc.pid)
        raise NetnsError(f"server in {ns} did not start (tcp={tcp} udp={udp}): {line or 'timeout'}")
    log.debug("server_started", netns=ns, pid=proc.pid, tcp=list(tcp), udp=list(udp))
    return Server(proc.pid, ns, tcp, udp, log_path, proc)


def _project_root() -> str:
    # So `-m policy_agent.lab.server` imports this checkout even without an install.
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stop_server(server: "Server | int", timeout: float = 5.0) -> None:
    """Stop a server by its pid: SIGTERM, then SIGKILL."""
    pid = server.pid if isinstance(server, Server) else int(server)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    _wait_gone([pid], timeout)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone([pid], timeout)


# --- probes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    ns: str
    ip: str
    port: int
    protocol: str = "TCP"
    key: object = None


def _socket_in(ns: str, family: int, kind: int) -> socket.socket:
    with in_netns(ns):
        return socket.socket(family, kind)


def probe(ns: str, ip: str, port: int, protocol: str = "TCP", timeout: float = 1.0) -> bool:
    """One real connection attempt from inside ``ns``; True when it got through."""
    addr = ipaddress.ip_address(ip)
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    protocol = protocol.upper()
    if protocol == "TCP":
        s = _socket_in(ns, family, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect((str(addr), int(port)))
            return True
        except OSError:
            return False
        finally:
            s.close()
    if protocol == "UDP":
        s = _socket_in(ns, family, socket.SOCK_DGRAM)
        try:
            s.settimeout(timeout)
            s.connect((str(addr), int(port)))
            token = os.urandom(8).hex().encode()
            s.send(b"probe " + token)
            deadline = time.monotonic() + timeout
            while True:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                data = s.recv(2048)
                if token in data:
                    return True
        except OSError:
            return False
        finally:
            s.close()
    raise ValueError(f"cannot probe protocol {protocol!r} (TCP or UDP)")


def probe_many(probes: Sequence[Probe], timeout: float = 1.0, attempts: int = 2, workers: int = 64) -> dict:
    """Run probes in parallel; returns {probe.key (or the Probe): connected}."""

    def one(p: Probe) -> bool:
        for i in range(max(1, attempts)):
            if probe(p.ns, p.ip, p.port, p.protocol, timeout * (1 + i)):
                return True
        return False

    if not probes:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(probes)))) as pool:
        results = list(pool.map(one, probes))
    return {(p.key if p.key is not None else p): r for p, r in zip(probes, results)}

