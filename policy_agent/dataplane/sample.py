"""Synthetic DesiredStates in the compiler's shape, for dataplane tests and benchmarks.

Not a NetworkPolicy compiler: just enough structure (hooks -> pa-FORWARD ->
dispatch -> per-endpoint chain -> per-policy chains with ipset matches) to
exercise the dataplane realistically without depending on policy_agent.compiler.
Policies are "active" only if they select a local pod (as felix does), and only
the peer sets of active policies exist.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from policy_agent.desired import (
    ACCEPT,
    DROP,
    RETURN,
    Action,
    Chain,
    DesiredState,
    Hook,
    IPSet,
    LocalEndpoint,
    Match,
    Rule,
)
from policy_agent.shared import naming

MARK = 0x10000


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    ips: tuple[str, ...]
    labels: frozenset[str] = frozenset()  # "k=v"
    local: bool = False

    @property
    def iface(self) -> str:
        return naming.veth_name("eni", self.namespace, self.name)


@dataclass(frozen=True)
class Peer:
    namespace: str | None  # None: every namespace
    label: str | None  # "k=v"; None: every pod


@dataclass(frozen=True)
class PolicyRule:
    peer: Peer | None = None  # None: any address
    ports: tuple[tuple[str, int], ...] = ()  # (proto, port); empty: all


@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    selector: str | None  # "k=v" within the namespace; None: every pod there
    ingress: tuple[PolicyRule, ...] | None = None  # None: not an ingress policy
    egress: tuple[PolicyRule, ...] | None = None

    def selects(self, pod: Pod) -> bool:
        return pod.namespace == self.namespace and (self.selector is None or self.selector in pod.labels)


@dataclass
class _Ctx:
    pods: list[Pod]
    ipsets: dict[str, IPSet] = field(default_factory=dict)
    by_label: dict[str | None, list[Pod]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_label[None] = self.pods
        for p in self.pods:
            for lab in p.labels:
                self.by_label.setdefault(lab, []).append(p)


def _family_of(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def _peer_set(ctx: _Ctx, peer: Peer, family: int) -> str:
    ident = f"{peer.namespace or '*'}/{peer.label or '*'}"
    name = naming.ipset_name(family, "s", ident)
    if name not in ctx.ipsets:
        members = frozenset(
            f"{ip}/{32 if family == 4 else 128}"
            for p in ctx.by_label.get(peer.label, ())
            if peer.namespace is None or p.namespace == peer.namespace
            for ip in p.ips
            if _family_of(ip) == family
        )
        ctx.ipsets[name] = IPSet(name, family, "hash:net", members, origin=f"selector ns={peer.namespace or '*'} pods={peer.label or '*'}")
    return name


def _policy_chain(ctx: _Ctx, pol: Policy, direction: str, family: int) -> Chain:
    name = naming.policy_chain(pol.namespace, pol.name, direction)
    rules: list[Rule] = []
    for i, r in enumerate(pol.ingress if direction == "ingress" else pol.egress or ()):
        sets: dict[str, str] = {}
        if r.peer is not None:
            s = _peer_set(ctx, r.peer, family)
            sets = {"src_set": s} if direction == "ingress" else {"dst_set": s}
        for proto, port in r.ports or ((None, None),):
            m = Match(protocol=proto, dst_ports=((port, port),) if port else (), **sets)
            rules.append(Rule(m, Action("MARK", mark=(MARK, MARK)), f"{pol.namespace}/{pol.name} {direction} rule {i}"))
    if rules:
        rules.append(Rule(Match(mark=(MARK, MARK)), RETURN, "Return if accepted"))
    return Chain(name, tuple(rules))


def _endpoint_chain(name: str, policies: list[Policy], direction: str) -> Chain:
    rules = [
        Rule(Match(ctstate=("RELATED", "ESTABLISHED")), ACCEPT),
        Rule(Match(ctstate=("INVALID",)), DROP),
        Rule(Match(), Action("MARK", mark=(0, MARK)), "Clear accept mark"),
    ]
    for p in policies:
        rules.append(Rule(Match(), Action("JUMP", naming.policy_chain(p.namespace, p.name, direction)), f"{p.namespace}/{p.name} {direction}"))
        rules.append(Rule(Match(mark=(MARK, MARK)), RETURN, "Return if policy accepted"))
    if policies:
        rules.append(Rule(Match(), DROP, "Drop if no policies passed packet"))
    return Chain(name, tuple(rules))


def _dispatch(out: dict, direction: str, root: str, local: list[Pod], rules: list[Rule], prefix: str, unknown: Rule) -> None:
    """Felix's one-level dispatch tree: bin interfaces by the character after the prefix."""
    bins: dict[str, list[Rule]] = {}
    for pod, r in zip(local, rules):
        bins.setdefault(pod.iface[len(prefix)], []).append(r)
    top: list[Rule] = []
    for key in sorted(bins):
        if len(bins[key]) == 1:
            top.extend(bins[key])
            continue
        child = naming.dispatch_child_chain(direction, key)
        out[child] = Chain(child, tuple(bins[key] + [unknown]))
        m = Match(in_iface=f"{prefix}{key}+") if direction == "from" else Match(out_iface=f"{prefix}{key}+")
        top.append(Rule(m, Action("GOTO", child)))
    out[root] = Chain(root, tuple(top + [unknown]))


def build(pods: list[Pod], policies: list[Policy], families: tuple[int, ...] = (4, 6), prefix: str = "eni") -> DesiredState:
    ctx = _Ctx(pods)
    wild = naming.iface_wildcard(prefix)
    local = sorted((p for p in pods if p.local), key=lambda p: p.iface)
    chains: dict[tuple[int, str], dict[str, Chain]] = {}
    endpoints = []
    for family in families:
        out: dict[str, Chain] = {}
        from_d: list[Rule] = []
        to_d: list[Rule] = []
        for pod in local:
            ing = [p for p in policies if p.ingress is not None and p.selects(pod)]
            egr = [p for p in policies if p.egress is not None and p.selects(pod)]
            tw, fw = naming.to_workload_chain(pod.iface), naming.from_workload_chain(pod.iface)
            out[tw] = _endpoint_chain(tw, ing, "ingress")
            out[fw] = _endpoint_chain(fw, egr, "egress")
            for p in ing:
                out.setdefault(naming.policy_chain(p.namespace, p.name, "ingress"), _policy_chain(ctx, p, "ingress", family))
            for p in egr:
                out.setdefault(naming.policy_chain(p.namespace, p.name, "egress"), _policy_chain(ctx, p, "egress", family))
            from_d.append(Rule(Match(in_iface=pod.iface), Action("GOTO", fw)))
            to_d.append(Rule(Match(out_iface=pod.iface), Action("GOTO", tw)))
            if family == families[0]:
                endpoints.append(
                    LocalEndpoint(
                        pod.namespace, pod.name, pod.iface, pod.ips,
                        tuple(sorted(f"{p.namespace}/{p.name}" for p in ing)),
                        tuple(sorted(f"{p.namespace}/{p.name}" for p in egr)),
                        bool(ing), bool(egr),
                    )
                )
        unknown = Rule(Match(), DROP, "Unknown interface")
        _dispatch(out, "from", naming.CHAIN_FROM_WL_DISPATCH, local, from_d, prefix, unknown)
        _dispatch(out, "to", naming.CHAIN_TO_WL_DISPATCH, local, to_d, prefix, unknown)
        out[naming.CHAIN_FORWARD] = Chain(naming.CHAIN_FORWARD, (
            Rule(Match(in_iface=wild), Action("JUMP", naming.CHAIN_FROM_WL_DISPATCH), "From workload"),
            Rule(Match(out_iface=wild), Action("JUMP", naming.CHAIN_TO_WL_DISPATCH), "To workload"),
            Rule(Match(in_iface=wild), ACCEPT, "Policy accepted packet from workload"),
            Rule(Match(out_iface=wild), ACCEPT, "Policy accepted packet to workload"),
        ))
        out[naming.CHAIN_WL_TO_HOST] = Chain(naming.CHAIN_WL_TO_HOST, (
            Rule(Match(), Action("JUMP", naming.CHAIN_FROM_WL_DISPATCH)),
            Rule(Match(), ACCEPT, "Configured DefaultEndpointToHostAction"),
        ))
        out[naming.CHAIN_INPUT] = Chain(naming.CHAIN_INPUT, (
            Rule(Match(in_iface=wild), Action("GOTO", naming.CHAIN_WL_TO_HOST)),
        ))
        out[naming.CHAIN_OUTPUT] = Chain(naming.CHAIN_OUTPUT, (
            Rule(Match(mark=(MARK, MARK)), ACCEPT, "Policy accepted packet"),
        ))
        chains[(family, "filter")] = out
    hooks = tuple(Hook("filter", c, f"pa-{c}") for c in ("INPUT", "FORWARD", "OUTPUT"))
    return DesiredState(chains=chains, hooks=hooks, ipsets=dict(ctx.ipsets), endpoints=tuple(endpoints))
