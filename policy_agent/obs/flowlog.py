"""Flow verdict logs: read our NFLOG group, attribute each packet, write JSON lines.

The compiler puts an NFLOG rule (rate-limited in the kernel by hashlimit) just before
each logged verdict; its prefix ``pa:<d|a>:<i|e>:<id>`` names a ``FlowOrigin`` of the
desired state (policy_agent.desired.flow_origins). This module:

* opens a NETLINK_NETFILTER socket in the dataplane's network namespace, binds the
  group (NFULNL_MSG_CONFIG: bind, copy 128 bytes of each packet, batch up to
  ``QTHRESH`` packets or ``TIMEOUT_CS`` hundredths of a second);
* parses each NFULNL_MSG_PACKET (prefix, in/out interface, IPv4/IPv6 + TCP/UDP/SCTP/ICMP
  header) in its own thread, so the agent loop never waits on it;
* resolves the prefix through the desired state the agent last applied and the
  addresses through the agent's current pods, and appends one JSON line per packet to
  a file rotated by size (``path`` and ``path.1``).

Bounded: the kernel socket buffer is the only queue (its overflow, ENOBUFS, is counted
as lost lines, never blocks the kernel or the agent); the pod index is rebuilt at most
once per ``REINDEX_EVERY`` seconds. Never: a write to the kernel's rules, a line for a
packet that was not logged by our rules (other groups and prefixes are ignored).
pyroute2 (0.9) has no NFLOG support, hence this small stdlib reader.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import structlog

from policy_agent.desired import DesiredState, FlowOrigin, flow_origins

log = structlog.get_logger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 3, 4, 5
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2
NFULA_PACKET_HDR, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV, NFULA_PAYLOAD, NFULA_PREFIX = 1, 4, 5, 9, 10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NFNETLINK_V0 = 0

COPY_RANGE = 128  # IPv4/IPv6 header, a few IPv6 extension headers and the ports
QTHRESH = 32  # packets the kernel batches into one message ...
TIMEOUT_CS = 5  # ... or hundredths of a second it waits: 50 ms at most
NLBUFSIZ = 65536
RCVBUF = 4 << 20
REINDEX_EVERY = 1.0
MISS_EVERY = 0.1
PREFIX_HEAD = "pa:"
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}
_IPV6_EXT = {0, 43, 44, 60}  # hop-by-hop, routing, fragment, destination options
_VERDICTS = {"d": "deny", "a": "allow"}
_DIRECTIONS = {"i": "ingress", "e": "egress"}


class FlowLogError(RuntimeError):
    pass


# --- netlink ---------------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def config_message(group: int, attrs: bytes, seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    """One NFULNL_MSG_CONFIG request for ``group`` (acknowledged)."""
    body = struct.pack("=BBH", family, NFNETLINK_V0, socket.htons(group)) + attrs
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def iter_attrs(data: bytes, off: int, end: int) -> Iterator[tuple[int, bytes]]:
    while off + 4 <= end:
        n, kind = struct.unpack_from("=HH", data, off)
        if n < 4 or off + n > end:
            return
        yield kind & 0x3FFF, data[off + 4 : off + n]
        off += (n + 3) & ~3


@dataclass(frozen=True)
class Packet:
    """One logged packet as the kernel handed it over."""

    prefix: str
    family: int
    protocol: str
    src: str
    dst: str
    src_port: int | None
    dst_port: int | None
    in_ifindex: int = 0
    out_ifindex: int = 0
    icmp_type: int | None = None


def parse_payload(prefix: str, family: int, payload: bytes, indev: int = 0, outdev: int = 0) -> Packet | None:
    """IP header and the first bytes of the transport header -> Packet (None: unreadable)."""
    if family == socket.AF_INET and len(payload) >= 20 and payload[0] >> 4 == 4:
        ihl = (payload[0] & 0x0F) * 4
        proto = payload[9]
        src, dst = socket.inet_ntop(socket.AF_INET, payload[12:16]), socket.inet_ntop(socket.AF_INET, payload[16:20])
        frag_offset = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
        l4 = payload[ihl:] if frag_offset == 0 else b""
        fam = 4
    elif family == socket.AF_INET6 and len(payload) >= 40 and payload[0] >> 4 == 6:
        proto, off = payload[6], 40
        src = socket.inet_ntop(socket.AF_INET6, payload[8:24])
        dst = socket.inet_ntop(socket.AF_INET6, payload[24:40])
        while proto in _IPV6_EXT and off + 8 <= len(payload):
            nxt = payload[off]
            if proto == 44:
                if struct.unpack_from("!H", payload, off + 2)[0] & 0xFFF8:
                    off = len(payload)  # not the first fragment: no transport header
                step = 8
            else:
                step = (payload[off + 1] + 1) * 8
            proto, off = nxt, off + step
        l4 = payload[off:] if off <= len(payload) else b""
        fam = 6
    else:
        return None
    name = PROTOCOLS.get(proto, str(proto))
    sport = dport = icmp = None
    if proto in (6, 17, 132) and len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4, 0)
    elif proto in (1, 58) and l4:
        icmp = l4[0]
    return Packet(prefix, fam, name, src, dst, sport, dport, indev, outdev, icmp)


def parse_messages(data: bytes) -> tuple[list[Packet], list[int]]:
    """A netlink datagram -> (packets, netlink error codes of acks/errors other than 0)."""
    packets: list[Packet] = []
    errors: list[int] = []
    off = 0
    while off + 16 <= len(data):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
        if length < 16 or off + length > len(data):
            break
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, off + 16)[0]
            if code:
                errors.append(code)
        elif kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET and length >= 20:
            family = data[off + 16]
            prefix, payload, indev, outdev = "", b"", 0, 0
            for a, value in iter_attrs(data, off + 20, off + length):
                if a == NFULA_PREFIX:
                    prefix = value.split(b"\0", 1)[0].decode(errors="replace")
                elif a == NFULA_PAYLOAD:
                    payload = value
                elif a == NFULA_IFINDEX_INDEV:
                    indev = struct.unpack("!I", value[:4])[0]
                elif a == NFULA_IFINDEX_OUTDEV:
                    outdev = struct.unpack("!I", value[:4])[0]
            p = parse_payload(prefix, family, payload, indev, outdev)
            if p is not None:
                packets.append(p)
        off += (length + 3) & ~3
    return packets, errors


class NflogSocket:
    """A bound NFLOG group on a NETLINK_NETFILTER socket of the calling thread's netns."""

    def __init__(self, group: int, rcvbuf: int = RCVBUF) -> None:
        self.group = group
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:  # root may go past net.core.rmem_max
                self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, 0))
            self._seq = 0
            self._config(_attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])), "bind")
            self._config(_attr(NFULA_CFG_MODE, struct.pack("!IBx", COPY_RANGE, NFULNL_COPY_PACKET)), "copy mode")
            self._config(
                _attr(NFULA_CFG_NLBUFSIZ, struct.pack("!I", NLBUFSIZ))
                + _attr(NFULA_CFG_QTHRESH, struct.pack("!I", QTHRESH))
                + _attr(NFULA_CFG_TIMEOUT, struct.pack("!I", TIMEOUT_CS)),
                "batching",
            )
        except BaseException:
            self.sock.close()
            raise

    def _config(self, attrs: bytes, what: str) -> None:
        self._seq += 1
        self.sock.send(config_message(self.group, attrs, self._seq))
        self.sock.settimeout(5.0)
        try:
            while True:
                data = self.sock.recv(65536)
                off = 0
                while off + 16 <= len(data):
                    length, kind, _f, seq, _p = struct.unpack_from("=IHHII", data, off)
                    if kind == NLMSG_ERROR and seq == self._seq:
                        code = -struct.unpack_from("=i", data, off + 16)[0]
                        if code == errno.EBUSY:
                            raise FlowLogError(f"NFLOG group {self.group} is bound by another process "
                                               "(choose another flow_log_group)")
                        if code:
                            raise FlowLogError(f"NFLOG {what} for group {self.group}: {os.strerror(code)}")
                        return
                    off += max(16, (length + 3) & ~3)
        finally:
            self.sock.settimeout(None)

    def close(self) -> None:
        try:
            self._seq += 1
            self.sock.send(config_message(self.group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND])),
                                          self._seq))
        except OSError:
            pass
        self.sock.close()


# --- attribution ----------------------------------------------------------------------


def _decided(origin: FlowOrigin | None, prefix: str) -> tuple[str | None, str, dict]:
    """(policy, rule, decided_by) of one line."""
    if origin is None:
        return None, "unknown: the rule that logged it is no longer desired", {"kind": "unknown", "id": prefix}
    d = origin.as_dict()
    d["id"] = prefix
    if origin.kind == "no-policy-allowed":
        return None, "no policy allowed it", d
    if origin.kind == "no-policy-selects":
        return None, "no policy selects the pod", d
    if origin.kind == "networkpolicy":
        return origin.policy, f"{origin.direction} rule {origin.rule}", d
    name = f" ({origin.rule_name})" if origin.rule_name else ""
    rule = f"{origin.kind} tier priority {origin.priority} {origin.direction} rule {origin.rule}{name}"
    return origin.policy, rule, d


class Resolver:
    """Prefix -> FlowOrigin and address -> "ns/pod", from the agent's current state.

    ``state()`` returns (generation, desired state or None) and is cheap; ``pods()``
    the current pods, read only when the generation or the desired state changed,
    and at most once per ``every`` seconds."""

    def __init__(self, state: Callable[[], tuple[Any, DesiredState | None]],
                 pods: Callable[[], Iterable[Any]] = tuple, every: float = REINDEX_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._state = state
        self._pods = pods
        self.every = every
        self.clock = clock
        self._key: Any = object()
        self._at = -1e9
        self.origins: dict[str, FlowOrigin] = {}
        self.pods: dict[str, str] = {}

    def refresh(self, force: bool = False, every: float | None = None) -> None:
        now = self.clock()
        if not force and now - self._at < (self.every if every is None else every):
            return
        generation, desired = self._state()
        key = (generation, id(desired))
        if key == self._key:
            return
        self._at = now
        self._key = key
        self.origins = flow_origins(desired) if desired is not None else {}
        index: dict[str, str] = {}
        for p in self._pods():
            for ip in p.ips:
                index[str(ip)] = f"{p.namespace}/{p.name}"
        self.pods = index

    def origin(self, prefix: str) -> FlowOrigin | None:
        return self.origins.get(prefix)

    def pod(self, ip: str) -> str | None:
        return self.pods.get(ip)

    def on_miss(self) -> None:
        """Something was not found: rebuild now if the agent's state changed since the
        last build (a pod just added, a rule just replaced), at most every MISS_EVERY s."""
        self.refresh(every=MISS_EVERY)


def flow_record(p: Packet, resolver: Resolver, when: float, iface_name: Callable[[int], str | None]) -> dict:
    """One JSON-ready line: the format `policy-agent flows` reads (docs/operations.md)."""
    verdict = _VERDICTS.get(p.prefix.split(":")[1] if p.prefix.count(":") >= 3 else "", "unknown")
    direction = _DIRECTIONS.get(p.prefix.split(":")[2] if p.prefix.count(":") >= 3 else "", "unknown")
    origin = resolver.origin(p.prefix)
    src_pod, dst_pod = resolver.pod(p.src), resolver.pod(p.dst)
    if origin is None or src_pod is None or dst_pod is None:
        resolver.on_miss()
        origin = resolver.origin(p.prefix)
        src_pod, dst_pod = resolver.pod(p.src), resolver.pod(p.dst)
    policy, rule, decided = _decided(origin, p.prefix)
    ifindex = p.out_ifindex if direction == "ingress" else p.in_ifindex
    rec: dict[str, Any] = {
        "time": dt.datetime.fromtimestamp(when, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z"),
        "verdict": verdict,
        "direction": direction,
        "protocol": p.protocol,
        "src_ip": p.src,
        "src_port": p.src_port,
        "src_pod": src_pod,
        "dst_ip": p.dst,
        "dst_port": p.dst_port,
        "dst_pod": dst_pod,
        "policy": policy,
        "rule": rule,
        "decided_by": decided,
        "iface": iface_name(ifindex) if ifindex else None,
    }
    if p.icmp_type is not None:
        rec["icmp_type"] = p.icmp_type
    return rec


def _iface_name(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


# --- the file -------------------------------------------------------------------------


class RotatingWriter:
    """Appends lines to ``path``; past ``max_bytes`` it becomes ``path.1`` (one kept)."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        os.chmod(path, 0o640)  # pod and policy names: not for every local user
        self.size = self._f.tell()

    def write_lines(self, lines: list[str]) -> None:
        data = "".join(lines)
        if self.size and self.size + len(data) > self.max_bytes:
            self._f.close()
            os.replace(self.path, self.path + ".1")
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            os.chmod(self.path, 0o640)
            self.size = 0
        self._f.write(data)
        self._f.flush()
        self.size += len(data)

    def close(self) -> None:
        self._f.close()


class FlowMetrics:
    """Counts each line in the agent's metrics (labels bounded by BoundedLabel)."""

    def __init__(self, metrics: Any, max_labels: int) -> None:
        from policy_agent.obs.metrics import BoundedLabel

        self.m = metrics
        self.policies = {tier: BoundedLabel(max_labels) for tier in ("admin", "networkpolicy", "baseline")}
        self.namespaces = BoundedLabel(max_labels)

    def __call__(self, rec: dict) -> None:
        self.m.flow_verdicts.labels(rec["verdict"], rec["direction"]).inc()
        if rec["verdict"] != "deny":
            return
        d = rec["decided_by"]
        kind = d.get("kind")
        if kind in ("admin", "baseline"):
            pairs = [(kind, d.get("policy", ""))]
        elif kind == "no-policy-allowed":
            pairs = [("networkpolicy", p) for p in d.get("isolating_policies", ())]
        else:
            pairs = [("unknown", "unknown")]
        for tier, policy in pairs:
            bound = self.policies.get(tier)
            self.m.flow_denied_by_policy.labels(tier, bound(policy) if bound else policy).inc()
        pod = d.get("endpoint") or (rec["dst_pod"] if rec["direction"] == "ingress" else rec["src_pod"])
        ns = pod.split("/", 1)[0] if pod else "unknown"
        self.m.flow_denied_by_namespace.labels(self.namespaces(ns)).inc()


def default_path(netns: str | None) -> str:
    return f"/var/log/policy-agent/flows{'-' + netns if netns else ''}.jsonl"


# --- the thread -----------------------------------------------------------------------


class FlowLogReader:
    """Reads the group in ``netns`` until stop(); ``on_record(rec)`` sees every line."""

    def __init__(self, group: int, path: str, resolver: Resolver, *, netns: str | None = None,
                 max_bytes: int = 50 << 20, on_record: Callable[[dict], None] | None = None,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.group = group
        self.path = path
        self.resolver = resolver
        self.netns = netns
        self.max_bytes = max_bytes
        self.on_record = on_record
        self.on_lost = on_lost
        self.lines = 0
        self.lost_batches = 0
        self.error = ""
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: NflogSocket | None = None

    def start(self, timeout: float = 10.0) -> "FlowLogReader":
        self._thread = threading.Thread(target=self._run, name="flow-log", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise FlowLogError(f"flow log reader did not bind NFLOG group {self.group} within {timeout}s")
        if self.error:
            raise FlowLogError(self.error)
        return self

    def _open(self) -> NflogSocket:
        if self.netns:
            from policy_agent.shared.netns import NETNS_DIR, check_name, setns

            # This thread lives in the dataplane's namespace for good: its socket and the
            # interface-name lookups belong there.
            check_name(self.netns)
            fd = os.open(os.path.join(NETNS_DIR, self.netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd)
            finally:
                os.close(fd)
        return NflogSocket(self.group)

    def _run(self) -> None:
        try:
            self._sock = self._open()
            writer = RotatingWriter(self.path, self.max_bytes)
        except (OSError, FlowLogError) as exc:
            self.error = f"flow log: {exc}"
            log.error("flow_log_start_failed", group=self.group, netns=self.netns, path=self.path, error=str(exc))
            self._ready.set()
            return
        log.info("flow_log_started", group=self.group, netns=self.netns, path=self.path)
        self.resolver.refresh(force=True)
        self._ready.set()
        sock = self._sock.sock
        sock.settimeout(0.5)
        try:
            while not self._stop.is_set():
                try:
                    data = sock.recv(1 << 18)
                except socket.timeout:
                    continue
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:  # the kernel dropped messages: we were too slow
                        self.lost_batches += 1
                        if self.on_lost is not None:
                            self.on_lost()
                        continue
                    if self._stop.is_set():
                        break
                    raise
                now = time.time()
                self.resolver.refresh()
                packets, _ = parse_messages(data)
                lines = []
                for p in packets:
                    if not p.prefix.startswith(PREFIX_HEAD):
                        continue  # not one of our rules
                    rec = flow_record(p, self.resolver, now, _iface_name)
                    lines.append(json.dumps(rec, separators=(",", ":")) + "\n")
                    if self.on_record is not None:
                        self.on_record(rec)
                if lines:
                    writer.write_lines(lines)
                    self.lines += len(lines)
        except Exception as exc:  # noqa: BLE001 - the agent keeps enforcing without flow logs
            self.error = f"flow log: {exc}"
            log.error("flow_log_failed", group=self.group, error=str(exc))
        finally:
            writer.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def start(cfg: Any, agent: Any) -> FlowLogReader | None:
    """The reader ``run`` starts next to the agent (None: flow logging is off or could
    not start; the agent enforces either way)."""
    if not (cfg.flow_log or cfg.flow_log_allowed):
        return None
    resolver = Resolver(lambda: (agent.observed_generation, agent.last_desired), agent.store.pods)
    reader = FlowLogReader(
        cfg.flow_log_group, cfg.flow_log_file or default_path(cfg.netns or None), resolver,
        netns=cfg.netns or None, max_bytes=cfg.flow_log_max_bytes,
        on_record=FlowMetrics(agent.metrics, cfg.flow_metrics_max_labels),
        on_lost=agent.metrics.flow_log_lost.inc,
    )
    try:
        return reader.start()
    except FlowLogError as exc:
        log.error("flow_log_off", error=str(exc), hint="the agent enforces policy without flow logs")
        reader.stop()
        return None
