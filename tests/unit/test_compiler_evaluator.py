"""A small packet walker over a DesiredState, used by the compiler tests.

It interprets the structured rules (not their text) the way the kernel does:
jump/goto/return, marks, conntrack state, hash:net sets with "nomatch" (most
specific entry wins), hash:ip,port sets. Also builders for model objects
(makePod/makePolicy style with tweaks). The tests at the bottom pin the
walker's own semantics so the compiler tests can lean on it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from policy_agent.compiler.options import NodeConfig
from policy_agent.desired import Action, Chain, DesiredState, IPSet, Match, Rule
from policy_agent.model.types import (
    MATCH_ALL,
    ContainerPort,
    IPBlock,
    LabelSelector,
    Labels,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PolicyPort,
    PolicyType,
    Protocol,
    Requirement,
)
from policy_agent.model.types import Rule as NPRule
from policy_agent.shared.naming import veth_name

NODE = "node-1"
HOST_IFACE = "eth0"

# --- builders -------------------------------------------------------------------------


def sel(match_labels: dict | None = None, **exprs) -> LabelSelector:
    """sel({"app": "web"}, tier=("In", ["a", "b"]), env=("Exists",))"""
    reqs = []
    for key, spec in exprs.items():
        op = Operator(spec[0])
        values = tuple(sorted(set(spec[1]))) if len(spec) > 1 else ()
        reqs.append(Requirement(key, op, values))
    return LabelSelector(Labels(match_labels or {}), tuple(sorted(reqs, key=lambda r: r.canonical())))


def make_ns(name: str, **labels: str) -> Namespace:
    return Namespace(name, Labels({"kubernetes.io/metadata.name": name, **labels}))


def make_pod(name: str, ns: str = "default", ips=("10.233.0.1",), labels: dict | None = None, node: str | None = NODE,
             ports=(), **tweaks) -> Pod:
    pod = Pod(
        namespace=ns,
        name=name,
        labels=Labels(labels or {}),
        node_name=node,
        ips=tuple(ipaddress.ip_address(i) for i in ips),
        ports=tuple(p if isinstance(p, ContainerPort) else ContainerPort(p[0], Protocol(p[1]), p[2]) for p in ports),
        phase="Running",
    )
    return replace(pod, **tweaks)


def peer(pods: LabelSelector | None = None, nss: LabelSelector | None = None, cidr: str | None = None,
         excepts=()) -> Peer:
    if cidr is not None:
        return Peer(ip_block=IPBlock(ipaddress.ip_network(cidr), tuple(ipaddress.ip_network(e) for e in excepts)))
    return Peer(pod_selector=pods, namespace_selector=nss)


def port(p=None, proto: str = "TCP", end: int | None = None) -> PolicyPort:
    return PolicyPort(Protocol(proto), p, end)


def rule(peers=(), ports=()) -> NPRule:
    return NPRule(tuple(ports), tuple(peers))


def make_policy(name: str, ns: str = "default", pod_selector: LabelSelector = MATCH_ALL, ingress=None, egress=None,
                types=None, **tweaks) -> NetworkPolicy:
    """ingress/egress None = that list absent; types defaulted like the API server."""
    if types is None:
        types = ["Ingress"] + (["Egress"] if egress is not None else [])
    pol = NetworkPolicy(
        namespace=ns,
        name=name,
        pod_selector=pod_selector,
        policy_types=tuple(PolicyType(t) for t in types),
        ingress=tuple(ingress or ()),
        egress=tuple(egress or ()),
    )
    return replace(pol, **tweaks)


def node_config(**kw) -> NodeConfig:
    return NodeConfig(node_name=kw.pop("node_name", NODE), **kw)


def iface_of(pod: Pod, prefix: str = "eni") -> str:
    return veth_name(prefix, pod.namespace, pod.name)


# --- the walker -------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: str = "tcp"  # tcp|udp|sctp|icmp|ipv6-icmp
    dport: int = 80
    in_iface: str | None = None
    out_iface: str | None = None
    ctstate: str = "NEW"
    mark: int = 0
    icmp_type: int | None = None

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.src).version


def _iface_match(pattern: str | None, actual: str | None) -> bool:
    if pattern is None:
        return True
    if actual is None:
        return False
    if pattern.endswith("+"):
        return actual.startswith(pattern[:-1])
    return actual == pattern


def _in_net_set(s: IPSet, addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    best: tuple[int, bool] | None = None
    for m in s.members:
        text, _, flag = m.partition(" ")
        net = ipaddress.ip_network(text)
        if net.version == ip.version and ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, flag == "nomatch")
    return best is not None and not best[1]


def _in_net_iface_set(s: IPSet, addr: str, iface: str | None) -> bool:
    """hash:net,iface matched as src,src: the entries of exactly that interface, as hash:net."""
    if iface is None:
        return False
    ip = ipaddress.ip_address(addr)
    best: tuple[int, bool] | None = None
    for m in s.members:
        text, _, flag = m.partition(" ")
        net_text, _, name = text.rpartition(",")
        net = ipaddress.ip_network(net_text)
        if name == iface and net.version == ip.version and ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, flag == "nomatch")
    return best is not None and not best[1]


def _set_lookup(state: DesiredState, name: str) -> IPSet:
    if name not in state.ipsets:
        raise AssertionError(f"rule references ipset {name} that the state does not define")
    return state.ipsets[name]


def matches(state: DesiredState, m: Match, p: Packet, mark: int) -> bool:
    if not _iface_match(m.in_iface, p.in_iface) or not _iface_match(m.out_iface, p.out_iface):
        return False
    if m.protocol and m.protocol != p.proto:
        return False
    if m.icmp_type is not None and m.icmp_type != p.icmp_type:
        return False
    for net, neg, addr in ((m.src_net, m.src_net_negate, p.src), (m.dst_net, m.dst_net_negate, p.dst)):
        if net:
            n = ipaddress.ip_network(net)
            ip = ipaddress.ip_address(addr)
            inside = n.version == ip.version and ip in n
            if inside == neg:
                return False
    if m.ctstate and p.ctstate not in m.ctstate:
        return False
    if m.mark is not None and (mark & m.mark[1]) != m.mark[0]:
        return False
    for name, neg, addr in ((m.src_set, m.src_set_negate, p.src), (m.dst_set, m.dst_set_negate, p.dst)):
        if name:
            s = _set_lookup(state, name)
            assert s.type == "hash:net" and s.family == p.family, s
            if _in_net_set(s, addr) == neg:
                return False
    if m.src_iface_set:
        s = _set_lookup(state, m.src_iface_set)
        assert s.type == "hash:net,iface" and s.family == p.family, s
        if _in_net_iface_set(s, p.src, p.in_iface) == m.src_iface_set_negate:
            return False
    if m.dst_ipport_set:
        s = _set_lookup(state, m.dst_ipport_set)
        assert s.type == "hash:ip,port" and s.family == p.family, s
        if f"{p.dst},{p.proto}:{p.dport}" not in s.members:
            return False
    if m.dst_ports:
        if not any(lo <= p.dport <= hi for lo, hi in m.dst_ports):
            return False
    return True


@dataclass
class Trace:
    verdict: str  # ACCEPT | DROP | REJECT | CONTINUE (fell back to the built-in chain)
    rules: list[tuple[str, Rule]]

    def comments(self) -> list[str]:
        return [r.comment for _, r in self.rules]


def walk(state: DesiredState, builtin: str, p: Packet) -> Trace:
    """Traverse our hook for a built-in chain in table filter."""
    table = state.table(p.family)
    hooks = [h for h in state.hooks if h.chain == builtin and h.table == "filter"]
    assert len(hooks) == 1, hooks
    mark = p.mark
    trace: list[tuple[str, Rule]] = []
    stack: list[tuple[Chain, int]] = [(table[hooks[0].target], 0)]
    steps = 0
    while stack:
        chain, i = stack.pop()
        if i >= len(chain.rules):
            continue  # fell off the end: return to the caller
        r = chain.rules[i]
        steps += 1
        assert steps < 10_000, "loop"
        if not matches(state, r.match, p, mark):
            stack.append((chain, i + 1))
            continue
        trace.append((chain.name, r))
        a: Action = r.action
        if a.verb in ("ACCEPT", "DROP", "REJECT"):
            return Trace(a.verb, trace)
        if a.verb == "RETURN":
            continue
        if a.verb == "NFLOG":  # a flow log never decides
            stack.append((chain, i + 1))
            continue
        if a.verb == "MARK":
            assert a.mark is not None
            mark = (mark & ~a.mark[1]) | a.mark[0]
            stack.append((chain, i + 1))
        elif a.verb == "JUMP":
            stack.append((chain, i + 1))
            stack.append((table[a.target], 0))
        elif a.verb == "GOTO":
            stack.append((table[a.target], 0))
        else:
            raise AssertionError(f"unknown verb {a.verb}")
    return Trace("CONTINUE", trace)


def allowed(trace: Trace) -> bool:
    """Built-in chains default to ACCEPT here, so CONTINUE lets the packet through."""
    return trace.verdict in ("ACCEPT", "CONTINUE")


# Flow helpers: where a packet between two endpoints crosses our chains.


def pod_to_pod(state, src: Pod, dst: Pod, family: int = 4, **kw) -> Trace:
    on_node_src = src.node_name == NODE
    on_node_dst = dst.node_name == NODE
    p = Packet(
        src=str(src.ips_of(family)[0]),
        dst=str(dst.ips_of(family)[0]),
        in_iface=iface_of(src) if on_node_src else HOST_IFACE,
        out_iface=iface_of(dst) if on_node_dst else HOST_IFACE,
        **kw,
    )
    return walk(state, "FORWARD", p)


def external_to_pod(state, src_ip: str, dst: Pod, **kw) -> Trace:
    dst_ip = next(str(i) for i in dst.ips if i.version == ipaddress.ip_address(src_ip).version)
    return walk(state, "FORWARD", Packet(src=src_ip, dst=dst_ip, in_iface=HOST_IFACE, out_iface=iface_of(dst), **kw))


def pod_to_external(state, src: Pod, dst_ip: str, **kw) -> Trace:
    src_ip = next(str(i) for i in src.ips if i.version == ipaddress.ip_address(dst_ip).version)
    return walk(state, "FORWARD", Packet(src=src_ip, dst=dst_ip, in_iface=iface_of(src), out_iface=HOST_IFACE, **kw))


# --- tests of the walker itself ------------------------------------------------------------


def test_nomatch_entry_is_more_specific_and_wins():
    s = IPSet("x", 4, "hash:net", frozenset({"10.0.0.0/8", "10.1.0.0/16 nomatch", "10.1.2.0/24"}))
    assert _in_net_set(s, "10.9.9.9")
    assert not _in_net_set(s, "10.1.9.9")
    assert _in_net_set(s, "10.1.2.3")
    assert not _in_net_set(s, "11.0.0.1")


def test_goto_returns_to_the_caller_of_the_jumping_chain():
    from policy_agent.desired import ACCEPT, DROP, RETURN, Hook

    chains = {
        "pa-A": Chain("pa-A", (Rule(Match(), Action("JUMP", "pa-B")), Rule(Match(mark=(1, 1)), ACCEPT))),
        "pa-B": Chain("pa-B", (Rule(Match(), Action("GOTO", "pa-C")), Rule(Match(), DROP))),
        "pa-C": Chain("pa-C", (Rule(Match(), Action("MARK", mark=(1, 1))), Rule(Match(), RETURN))),
    }
    state = DesiredState({(4, "filter"): chains}, (Hook("filter", "FORWARD", "pa-A"),))
    t = walk(state, "FORWARD", Packet("10.0.0.1", "10.0.0.2"))
    assert t.verdict == "ACCEPT"
    assert [c for c, _ in t.rules] == ["pa-A", "pa-B", "pa-C", "pa-C", "pa-A"]


def assert_well_formed(state: DesiredState) -> None:
    """Every jump target and ipset exists, nothing unreferenced is rendered, families match."""
    roots = {h.target for h in state.hooks}
    referenced_sets: set[str] = set()
    for (family, _), table in state.chains.items():
        reachable, todo = set(), [r for r in roots if r in table]
        while todo:
            name = todo.pop()
            if name in reachable:
                continue
            reachable.add(name)
            chain = table[name]
            for t in chain.references:
                assert t in table, f"{name} jumps to missing {t}"
                todo.append(t)
            for s in chain.ipsets:
                assert s in state.ipsets, f"{name} uses missing ipset {s}"
                assert state.ipsets[s].family == family, f"{name} (IPv{family}) uses {s}"
            referenced_sets |= chain.ipsets
        assert reachable == set(table), f"unreachable chains: {set(table) - reachable}"
    assert referenced_sets == set(state.ipsets), f"unreferenced ipsets: {set(state.ipsets) - referenced_sets}"
