"""Why is this flow allowed or denied? Walk a DesiredState packet by packet.

Pure (no I/O). ``explain(state, packet, path)`` evaluates one packet against our
chains with iptables semantics and returns the verdict plus the trace of rules
that matched (chain, 1-based rule number as ``iptables -L --line-numbers``
shows it, the rule's comment, its text). ``explain_flow(snapshot, node, ...)``
compiles first and picks the hook path from where the endpoints live.

Semantics modelled (filter table only, as that is all we write):
- A hook jumps from the built-in chain to ours; hooks are inserted at the top
  with ``-I <chain> 1`` in render order, so the last rendered one runs first.
  If every hook returns, the built-in chain's own rules and policy decide: we
  do not know them and report ACCEPT "by the built-in chain" (the usual case).
  Pod -> node traffic that egress policy allowed is "returned to the host's own
  rules" (endpoint_to_host_action RETURN, the default).
- ACCEPT/DROP/REJECT end the traversal; JUMP calls; GOTO tail-calls (a RETURN
  from the target returns to the chain that called the goto-ing chain);
  RETURN or the end of a chain returns; MARK is ``--set-xmark value/mask``:
  ``mark = (mark & ~mask) ^ value``.
- Matches: interfaces (exact, or ``prefix+`` wildcard; a packet without that
  interface never matches), protocol, CIDRs and negations, ipsets (hash:net
  longest-prefix with ``nomatch``, hash:ip, hash:ip,port ``ip,proto:port``
  incl. port ranges, hash:net,iface ``net,iface`` matched as ``src,src`` against
  the source address and the incoming interface), port ranges (multiport),
  ICMP type (a rule with one never matches a packet without one), conntrack
  state, mark/mask, ``addrtype --src-type LOCAL`` against the node's addresses.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from policy_agent.desired import FILTER, Action, Chain, DesiredState, Hook, IPSet, LocalEndpoint, Match, Rule

MAX_DEPTH = 64  # iptables refuses loops; a deeper walk means a broken state

HOOK_CHAINS = ("INPUT", "FORWARD", "OUTPUT")
DEFAULT_UPLINK = "eth0"  # the interface name shown for the node's side of off-node traffic


class ExplainError(ValueError):
    """The question cannot be answered (unknown pod, inconsistent state, ...)."""


@dataclass(frozen=True)
class Packet:
    """One packet as the filter table sees it. protocol is lower case (tcp/udp/sctp/icmp/ipv6-icmp).

    icmp_type: the ICMP/ICMPv6 type of an icmp/ipv6-icmp packet (None: unknown or
    not ICMP; then no rule that names a type matches).
    """

    family: int
    src: str
    dst: str
    protocol: str = "tcp"
    dst_port: int | None = None
    ctstate: str = "NEW"
    mark: int = 0
    icmp_type: int | None = None

    def __post_init__(self) -> None:
        if self.icmp_type is not None and self.protocol not in ("icmp", "ipv6-icmp"):
            raise ExplainError(f"icmp_type needs protocol icmp or ipv6-icmp, not {self.protocol!r}")
        for a in (self.src, self.dst):
            if ipaddress.ip_address(a).version != self.family:
                raise ExplainError(f"address {a} is not IPv{self.family}")


@dataclass(frozen=True)
class HookPath:
    """Which built-in chain the packet enters and through which interfaces."""

    chain: str  # INPUT | FORWARD | OUTPUT
    in_iface: str | None = None
    out_iface: str | None = None

    def __post_init__(self) -> None:
        if self.chain not in HOOK_CHAINS:
            raise ExplainError(f"hook chain must be one of {HOOK_CHAINS}, not {self.chain!r}")

    def describe(self) -> str:
        parts = [self.chain]
        if self.in_iface:
            parts.append(f"in {self.in_iface}")
        if self.out_iface:
            parts.append(f"out {self.out_iface}")
        return ", ".join(parts)


@dataclass(frozen=True)
class TraceStep:
    chain: str
    number: int  # 1-based rule number in the chain (0 for the hook rule itself)
    comment: str
    rule_text: str
    action: str  # ACCEPT, DROP, REJECT, RETURN, JUMP, GOTO, MARK
    mark: int  # the packet's mark after this step
    grants: bool = False  # a MARK that sets bits: a policy rule (or an open direction) allowed


@dataclass(frozen=True)
class Explanation:
    verdict: str  # ACCEPT | DROP | REJECT
    packet: Packet
    path: HookPath
    trace: tuple[TraceStep, ...]
    decided_by: TraceStep | None  # None: every hook returned, the built-in chain decided
    src_name: str = ""
    dst_name: str = ""
    node: str = ""

    @property
    def allowed(self) -> bool:
        return self.verdict == "ACCEPT"

    @property
    def granting_steps(self) -> tuple[TraceStep, ...]:
        """Rules that set a mark bit: policy rules that allowed, or 'not isolated' allows.

        A ClusterNetworkPolicy Accept sets the bit in the shared pa-cnp-accept chain: the
        rule that went there (the step before) is the one that allowed."""
        out = []
        for i, s in enumerate(self.trace):
            if s.grants and s.comment:
                if s.chain == "pa-cnp-accept" and i > 0:
                    s = self.trace[i - 1]
                out.append(s)
        return tuple(out)

    def summary(self) -> str:
        p = self.packet
        port = f":{p.dst_port}" if p.dst_port is not None else ""
        who = ""
        if self.src_name or self.dst_name:
            who = f" ({self.src_name or p.src} to {self.dst_name or p.dst})"
        on = f" on node {self.node}" if self.node else ""
        first = (
            f"{p.protocol.upper()} {p.src} -> {p.dst}{port}{who} is "
            f"{'ALLOWED' if self.allowed else 'DENIED'}{on} ({self.path.describe()})."
        )
        grants = "; ".join(s.comment for s in self.granting_steps)
        if self.decided_by is None and self.path.chain == "INPUT" and self.path.in_iface:
            # pod -> node with endpoint_to_host_action RETURN: our policy allowed it, the
            # host's firewall (and kube-proxy's KUBE-FIREWALL) has the last word.
            second = "Allowed by our chains" + (f" ({grants})" if grants else "")
            second += (
                " and returned to the host's own rules: the INPUT rules after ours and the chain "
                "policy decide (shown as ACCEPT)."
            )
        elif self.decided_by is None:
            second = "All our chains returned, so the built-in chain's own rules and policy decide"
            second += f" (allowed by: {grants})." if grants else "."
        elif self.allowed:
            second = f"Accepted by {self.decided_by.chain} rule {self.decided_by.number}"
            if self.decided_by.comment:
                second += f" ({self.decided_by.comment})"
            second += f" after: {grants}." if grants else "."
        else:
            verb = "Rejected" if self.verdict == "REJECT" else "Dropped"
            second = f"{verb} by {self.decided_by.chain} rule {self.decided_by.number}"
            if self.decided_by.comment:
                second += f" ({self.decided_by.comment})"
            second += f" after: {grants}." if grants else "."
        # A policy enforced as a fallback (it could not be parsed) says so and why.
        fallbacks = [s.comment for s in self.trace if " fallback: " in s.comment]
        if fallbacks:
            second += " Enforced as an unparseable policy's no-allow fallback: " + "; ".join(fallbacks) + "."
        standins = [s.comment for s in self.trace if ", unparseable: " in s.comment and _CNP_RULE_RE.match(s.comment)]
        if standins:
            second += (" Enforced as an unparseable ClusterNetworkPolicy's deny-all stand-in: "
                       + "; ".join(standins) + ".")
        notes = [s.comment for s in self.trace if _CNP_NOTE_RE.match(s.comment)]
        if notes:
            second += " Not enforced: " + "; ".join(notes) + "."
        return f"{first} {second}"

    def tier_decisions(self) -> list[str]:
        """Per direction walked (source egress, destination ingress): the tiers in order
        (admin, NetworkPolicy, baseline) and which one decided."""
        return tier_decisions(self.trace)

    def render(self) -> str:
        lines = [self.summary()]
        tiers = self.tier_decisions()
        if tiers:
            lines.append("tiers:")
            lines += [f"  {t}" for t in tiers]
        lines.append("trace:")
        for s in self.trace:
            where = f"{s.chain} #{s.number}"
            lines.append(f"  {where:<34} mark={s.mark:#x}  {s.rule_text}")
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines) + "\n"


# --- tiers ---------------------------------------------------------------------------

# Comments written by policy_agent.compiler.chains (cnp_chain, _policy_block).
_CNP_RULE_RE = re.compile(
    r"^(?P<tier>admin|baseline) tier cnp (?P<name>\S+) priority (?P<prio>-?\d+) (?P<dir>ingress|egress) "
    r"rule (?P<rule>\d+)[^:]*: (?P<action>Accept|Deny|Pass)(?:, rule name=(?P<rname>.*?))?"
    r"(?:, unparseable: (?P<why>.*))?$"
)
# A rule compiled as a no-op that says why it is not enforced (domainNames Accept).
_CNP_NOTE_RE = re.compile(
    r"^(?P<tier>admin|baseline) tier cnp (?P<name>\S+) priority (?P<prio>-?\d+) (?:ingress|egress) "
    r"rule (?P<rule>\d+) peer \d+ (?P<what>domainNames \S*): not enforced, (?P<why>.*)$"
)
_OPEN_RE = re.compile(r": no policy selects the pod for (ingress|egress): allow$")
_NP_DENY_RE = re.compile(r": no (ingress|egress) policy allowed the packet$")
_TIER_TITLE = {"admin": "admin tier", "networkpolicy": "NetworkPolicy tier", "baseline": "baseline tier"}


def _cnp_action(step: TraceStep, m: re.Match) -> str | None:
    if step.action in ("DROP", "REJECT"):
        return "Deny"
    if step.action == "GOTO":
        return m.group("action")  # goto pa-cnp-accept / pa-cnp-pass
    return None


def tier_decisions(trace: Iterable[TraceStep]) -> list[str]:
    """One line per endpoint chain walked: "egress of <iface chain>: admin tier: ..., -> decided by ..."."""
    out: list[str] = []
    current: str | None = None
    events: list[str] = []
    decided = ""

    def flush() -> None:
        if current is not None and (events or decided):
            out.append(f"{current}: " + "; ".join(events) + (f" => decided by the {decided}" if decided else ""))

    prev: TraceStep | None = None
    for step in trace:
        if step.chain.startswith(("pa-fw-", "pa-tw-")) and step.number == 1:
            flush()
            direction = "egress" if step.chain.startswith("pa-fw-") else "ingress"
            # the dispatch goto that led here names the pod
            who = prev.comment if prev is not None and prev.action == "GOTO" and "/" in prev.comment else step.chain
            current, events, decided = f"{direction} of {who}", [], ""
            prev = step
            continue
        prev = step
        if current is None:
            continue
        note = _CNP_NOTE_RE.match(step.comment)
        if note:
            events.append(
                f"{_TIER_TITLE[note.group('tier')]}: {note.group('name')} priority {note.group('prio')} rule "
                f"{note.group('rule')}: {note.group('what')} not enforced ({note.group('why')})"
            )
            continue
        m = _CNP_RULE_RE.match(step.comment)
        if m and (action := _cnp_action(step, m)):
            rname = f" ({m.group('rname')})" if m.group("rname") else ""
            tier = m.group("tier")
            why = f" [stand-in for an unparseable policy: {m.group('why')}]" if m.group("why") else ""
            events.append(
                f"{_TIER_TITLE[tier]}: {m.group('name')} priority {m.group('prio')} rule {m.group('rule')}{rname}: "
                f"{action}{why}"
            )
            if action != "Pass":
                decided = f"{_TIER_TITLE[tier]} ({action})"
            continue
        if _OPEN_RE.search(step.comment):
            events.append("no tier decided: default allow")
            decided = "default allow"
        elif _NP_DENY_RE.search(step.comment) and step.action in ("DROP", "REJECT"):
            events.append(f"{_TIER_TITLE['networkpolicy']}: the pod is isolated and no policy allowed: Deny")
            decided = f"{_TIER_TITLE['networkpolicy']} (Deny)"
        elif step.grants and step.chain.startswith(("pa-pi-", "pa-po-")):
            events.append(f"{_TIER_TITLE['networkpolicy']}: {step.comment}: Accept")
            decided = f"{_TIER_TITLE['networkpolicy']} (Accept)"
    flush()
    return out


# --- ipsets --------------------------------------------------------------------------


class _SetIndex:
    """Parsed members of one ipset, for lookups."""

    def __init__(self, s: IPSet) -> None:
        self.set = s
        self.nets: list[tuple[ipaddress._BaseNetwork, bool]] = []  # (net, nomatch)
        self.ipports: set[tuple[ipaddress._BaseAddress, str, int]] = set()
        self.ipport_ranges: list[tuple[ipaddress._BaseAddress, str, int, int]] = []
        self.net_ifaces: dict[str, list[tuple[ipaddress._BaseNetwork, bool]]] = {}  # iface -> (net, nomatch)
        kind = s.type
        for m in s.members:
            text = m.strip()
            nomatch = text.endswith(" nomatch")
            if nomatch:
                text = text[: -len(" nomatch")].strip()
            if kind in ("hash:net", "hash:ip"):
                self.nets.append((ipaddress.ip_network(text, strict=False), nomatch))
            elif kind == "hash:net,iface":
                net, sep, iface = text.rpartition(",")
                if not sep or not iface:
                    raise ExplainError(f"ipset {s.name}: member {m!r} is not NET,IFACE")
                entry = (ipaddress.ip_network(net, strict=False), nomatch)
                self.net_ifaces.setdefault(iface, []).append(entry)
            elif kind == "hash:ip,port":
                addr, _, pp = text.partition(",")
                proto, _, port = pp.rpartition(":")
                proto = proto or "tcp"
                lo, _, hi = port.partition("-")
                ip = ipaddress.ip_address(addr)
                if hi:
                    self.ipport_ranges.append((ip, proto, int(lo), int(hi)))
                else:
                    self.ipports.add((ip, proto, int(lo)))
            else:
                raise ExplainError(f"ipset {s.name}: type {kind!r} not supported by explain")

    def contains_ip(self, ip: ipaddress._BaseAddress) -> bool:
        return self._longest(self.nets, ip)

    def contains_ip_iface(self, ip: ipaddress._BaseAddress, iface: str | None) -> bool:
        # hash:net,iface: as hash:net among the entries of exactly that interface; a
        # packet without that interface (e.g. no incoming one) is not in the set.
        if iface is None:
            return False
        return self._longest(self.net_ifaces.get(iface, ()), ip)

    @staticmethod
    def _longest(entries: Iterable[tuple[ipaddress._BaseNetwork, bool]], ip: ipaddress._BaseAddress) -> bool:
        # the most specific entry containing the address decides; nomatch = not in.
        best: tuple[int, bool] | None = None
        for net, nomatch in entries:
            if net.version == ip.version and ip in net:
                if best is None or net.prefixlen > best[0] or (net.prefixlen == best[0] and nomatch):
                    best = (net.prefixlen, nomatch)
        return best is not None and not best[1]

    def contains_ipport(self, ip: ipaddress._BaseAddress, proto: str, port: int | None) -> bool:
        if port is None:
            return False
        if (ip, proto, port) in self.ipports:
            return True
        return any(i == ip and p == proto and lo <= port <= hi for i, p, lo, hi in self.ipport_ranges)


def set_contains(s: IPSet, address: str, protocol: str = "tcp", port: int | None = None,
                 iface: str | None = None) -> bool:
    """Is ``address`` (with protocol/port for hash:ip,port, interface for hash:net,iface) in ``s``?"""
    idx = _SetIndex(s)
    ip = ipaddress.ip_address(address)
    if s.type == "hash:ip,port":
        return idx.contains_ipport(ip, protocol, port)
    if s.type == "hash:net,iface":
        return idx.contains_ip_iface(ip, iface)
    return idx.contains_ip(ip)


# --- the walk ------------------------------------------------------------------------


@dataclass
class _Walk:
    chains: Mapping[str, Chain]
    ipsets: Mapping[str, IPSet]
    packet: Packet
    path: HookPath
    node_ips: frozenset
    src: ipaddress._BaseAddress = field(init=False)
    dst: ipaddress._BaseAddress = field(init=False)
    mark: int = field(init=False)
    trace: list[TraceStep] = field(default_factory=list)
    _sets: dict[str, _SetIndex] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.src = ipaddress.ip_address(self.packet.src)
        self.dst = ipaddress.ip_address(self.packet.dst)
        self.mark = self.packet.mark

    def _set(self, name: str) -> _SetIndex:
        idx = self._sets.get(name)
        if idx is None:
            s = self.ipsets.get(name)
            if s is None:
                raise ExplainError(f"a rule references ipset {name!r}, which the desired state does not define")
            idx = self._sets[name] = _SetIndex(s)
        return idx

    def _iface(self, want: str | None, have: str | None) -> bool:
        if want is None:
            return True
        if have is None:
            return False
        if want.endswith("+"):
            return have.startswith(want[:-1])
        return have == want

    def matches(self, m: Match) -> bool:
        p = self.packet
        if not self._iface(m.in_iface, self.path.in_iface) or not self._iface(m.out_iface, self.path.out_iface):
            return False
        if m.protocol is not None and m.protocol != p.protocol:
            return False
        if m.icmp_type is not None and p.icmp_type != m.icmp_type:
            return False
        if m.src_net is not None:
            net = ipaddress.ip_network(m.src_net, strict=False)
            if (net.version == self.src.version and self.src in net) == m.src_net_negate:
                return False
        if m.dst_net is not None:
            net = ipaddress.ip_network(m.dst_net, strict=False)
            if (net.version == self.dst.version and self.dst in net) == m.dst_net_negate:
                return False
        if m.src_addrtype_local and self.src not in self.node_ips:
            return False
        if m.ctstate and p.ctstate not in m.ctstate:
            return False
        if m.mark is not None and (self.mark & m.mark[1]) != m.mark[0]:
            return False
        if m.src_set is not None and self._set(m.src_set).contains_ip(self.src) == m.src_set_negate:
            return False
        if m.dst_set is not None and self._set(m.dst_set).contains_ip(self.dst) == m.dst_set_negate:
            return False
        if m.src_iface_set is not None and (
            self._set(m.src_iface_set).contains_ip_iface(self.src, self.path.in_iface) == m.src_iface_set_negate
        ):
            return False
        if m.dst_ipport_set is not None and not self._set(m.dst_ipport_set).contains_ipport(
            self.dst, p.protocol, p.dst_port
        ):
            return False
        if m.dst_ports:
            if p.dst_port is None or not any(lo <= p.dst_port <= hi for lo, hi in m.dst_ports):
                return False
        return True

    def _step(self, chain: str, number: int, rule: Rule, action: str) -> None:
        # A MARK that sets bits grants, except the ClusterNetworkPolicy Pass bit.
        grants = action == "MARK" and bool(rule.action.mark and rule.action.mark[0]) and not rule.comment.startswith(
            "cluster network policy Pass"
        )
        self.trace.append(TraceStep(chain, number, rule.comment, rule.body(), action, self.mark, grants))

    def run(self, name: str, depth: int = 0) -> TraceStep | None:
        """Run a user chain; a terminal step (ACCEPT/DROP/REJECT) or None for return."""
        if depth > MAX_DEPTH:
            raise ExplainError(f"chain nesting deeper than {MAX_DEPTH} at {name!r}: a loop?")
        chain = self.chains.get(name)
        if chain is None:
            raise ExplainError(f"a rule targets chain {name!r}, which the desired state does not define")
        for i, rule in enumerate(chain.rules, start=1):
            if not self.matches(rule.match):
                continue
            a: Action = rule.action
            verb = a.verb
            if verb == "NFLOG":
                continue  # a flow log: the packet goes on, nothing decided
            if verb == "MARK":
                assert a.mark is not None
                value, mask = a.mark
                self.mark = (self.mark & ~mask & 0xFFFFFFFF) ^ value
                self._step(name, i, rule, verb)
                continue
            self._step(name, i, rule, verb)
            if verb in ("ACCEPT", "DROP", "REJECT"):
                return self.trace[-1]
            if verb == "RETURN":
                return None
            if verb == "JUMP":
                result = self.run(a.target or "", depth + 1)
                if result is not None:
                    return result
                continue
            if verb == "GOTO":
                return self.run(a.target or "", depth + 1)
            raise ExplainError(f"{name} rule {i}: action {verb!r} not supported by explain")
        return None


def explain(
    state: DesiredState,
    packet: Packet,
    path: HookPath,
    node_ips: Iterable[str] = (),
    *,
    src_name: str = "",
    dst_name: str = "",
    node: str = "",
    hook_order: Mapping[str, Sequence[str]] | None = None,
) -> Explanation:
    """Evaluate one packet through the hooks of ``path.chain`` and our chains.

    ``hook_order``: built-in chain -> our hook targets as the kernel holds them, top
    first (live explain walks the kernel's rules); default: the order apply inserts."""
    walk = _Walk(
        state.table(packet.family, FILTER),
        state.ipsets,
        packet,
        path,
        frozenset(ipaddress.ip_address(a) for a in node_ips),
    )
    hooks = sorted((h for h in state.hooks if h.table == FILTER and h.chain == path.chain), key=lambda h: h.target)
    hooks.reverse()  # -I 1 in order: last rendered runs first
    if hook_order is not None:
        hooks = [Hook(FILTER, path.chain, t) for t in hook_order.get(path.chain, ())]
    decided: TraceStep | None = None
    for n, hook in enumerate(hooks, start=1):
        walk.trace.append(TraceStep(path.chain, n, hook.rule.comment, hook.rule.body(), "JUMP", walk.mark))
        decided = walk.run(hook.target)
        if decided is not None:
            break
    verdict = decided.action if decided is not None else "ACCEPT"
    return Explanation(verdict, packet, path, tuple(walk.trace), decided, src_name, dst_name, node)


# --- flows between pods and addresses ------------------------------------------------


@dataclass(frozen=True)
class _End:
    name: str  # "ns/pod", "node" or the address
    ips: tuple[str, ...]
    endpoint: LocalEndpoint | None  # set when the pod is local to this node
    is_node: bool = False


def _resolve(spec, snapshot, state: DesiredState, node_ips: tuple[str, ...]) -> _End:
    from policy_agent.model.types import Pod

    eps = {(e.namespace, e.pod): e for e in state.endpoints}
    if isinstance(spec, Pod):
        return _End(spec.ref, tuple(str(i) for i in spec.ips), eps.get(spec.key))
    text = str(spec)
    if text == "node":
        if not node_ips:
            raise ExplainError("'node' needs the node's addresses (node_ips / --node-ip)")
        return _End("node", node_ips, None, True)
    try:
        addr = str(ipaddress.ip_address(text))
    except ValueError:
        pass
    else:
        if addr in node_ips:
            return _End("node", (addr,), None, True)
        for e in state.endpoints:
            if addr in e.ips:
                return _End(f"{e.namespace}/{e.pod}", (addr,), e)
        for pod in snapshot.pods.values():
            if any(str(i) == addr for i in pod.ips):
                return _End(pod.ref, (addr,), None)
        return _End(addr, (addr,), None)
    ns, slash, name = text.partition("/")
    if not slash:
        raise ExplainError(f"{text!r} is neither NAMESPACE/POD, an IP address nor 'node'")
    pod = snapshot.pods.get((ns, name))
    if pod is None:
        raise ExplainError(f"pod {text} is not in the input")
    ep = eps.get(pod.key)
    ips = tuple(str(i) for i in pod.ips) or (ep.ips if ep else ())
    if not ips:
        raise ExplainError(f"pod {text} has no IP address yet")
    return _End(pod.ref, ips, ep)


def _pick(ips: tuple[str, ...], family: int) -> str | None:
    return next((a for a in ips if ipaddress.ip_address(a).version == family), None)


def explain_state_flow(
    state: DesiredState,
    snapshot,
    src,
    dst,
    protocol: str = "TCP",
    port: int | None = None,
    *,
    node: str = "",
    node_ips: Iterable[str] = (),
    family: int | None = None,
    uplink: str = DEFAULT_UPLINK,
    icmp_type: int | None = None,
    hook_order: Mapping[str, Sequence[str]] | None = None,
) -> Explanation:
    """Explain a NEW flow src -> dst against an already compiled state for one node.

    src/dst: a Pod, "ns/pod", an IP address, or "node" (needs node_ips). The hook
    path follows from which ends are local endpoints of ``state``:
    local -> local: FORWARD in=src iface out=dst iface; elsewhere -> local:
    FORWARD out=dst iface; local -> elsewhere: FORWARD in=src iface out=uplink;
    local -> node: INPUT in=src iface; node -> local: OUTPUT out=dst iface.
    """
    nips = tuple(str(ipaddress.ip_address(a)) for a in node_ips)
    s = _resolve(src, snapshot, state, nips)
    d = _resolve(dst, snapshot, state, nips)
    families = [family] if family else [4, 6]
    fam = next((f for f in families if _pick(s.ips, f) and _pick(d.ips, f)), None)
    if fam is None:
        raise ExplainError(f"{s.name} and {d.name} share no address family" + (f" IPv{family}" if family else ""))
    src_ip, dst_ip = _pick(s.ips, fam), _pick(d.ips, fam)
    assert src_ip and dst_ip
    where = f" on node {node}" if node else ""
    if s.is_node and d.is_node:
        raise ExplainError("node to node traffic is not policed by this agent")
    if s.endpoint and d.is_node:
        path = HookPath("INPUT", in_iface=s.endpoint.interface)
    elif s.is_node and d.endpoint:
        path = HookPath("OUTPUT", out_iface=d.endpoint.interface)
    elif s.endpoint or d.endpoint:
        path = HookPath(
            "FORWARD",
            in_iface=s.endpoint.interface if s.endpoint else uplink,
            out_iface=d.endpoint.interface if d.endpoint else uplink,
        )
    else:
        raise ExplainError(f"neither {s.name} nor {d.name} is a local pod{where}: this node does not see the flow")
    pkt = Packet(fam, src_ip, dst_ip, protocol.lower(), port, icmp_type=icmp_type)
    return explain(state, pkt, path, nips, src_name=s.name, dst_name=d.name, node=node, hook_order=hook_order)


def explain_flow(
    snapshot,
    node_config,
    src,
    dst,
    protocol: str = "TCP",
    port: int | None = None,
    *,
    node_ips: Iterable[str] = (),
    family: int | None = None,
    icmp_type: int | None = None,
) -> Explanation:
    """Compile ``snapshot`` for ``node_config`` and explain the flow src -> dst on that node."""
    from policy_agent.compiler import compile as compile_state

    state = compile_state(snapshot, node_config)
    return explain_state_flow(
        state, snapshot, src, dst, protocol, port, node=node_config.node_name, node_ips=node_ips, family=family,
        icmp_type=icmp_type,
    )
