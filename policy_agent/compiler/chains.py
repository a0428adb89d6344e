"""Pure chain builders: static skeleton, dispatch tree, endpoint chains, policy chains.

Nothing here keeps state; the incremental ``Compiler`` caches what these return.
See docs/decisions/compiler.md for why each rule is where it is.
"""

from __future__ import annotations

import os
from functools import lru_cache
from dataclasses import dataclass, field

from policy_agent.compiler.options import NodeConfig
from policy_agent.compiler.scopes import (
    ALL_PODS,
    ScopeDef,
    ipblock_empty,
    ipblock_ident,
    ipblock_members,
    peer_scope,
    policy_scope,
)
from policy_agent.desired import ACCEPT, DROP, RETURN, Action, Chain, IPSet, Match, Rule
from policy_agent.model.types import NetworkPolicy, Peer, PolicyPort, PolicyType
from policy_agent.shared import naming
from policy_agent.shared.naming import (
    CHAIN_FORWARD,
    CHAIN_FROM_WL_DISPATCH,
    CHAIN_INPUT,
    CHAIN_OUTPUT,
    CHAIN_TO_WL_DISPATCH,
    CHAIN_WL_TO_HOST,
)

DIRECTIONS = ("ingress", "egress")


def _mark_set(node: NodeConfig) -> Action:
    return Action("MARK", mark=(node.accept_mark, node.accept_mark))


def _mark_clear(node: NodeConfig, bits: int | None = None) -> Action:
    return Action("MARK", mark=(0, bits if bits is not None else node.accept_mark))


def _deny(node: NodeConfig) -> Action:
    return Action(node.deny_action)


def _accepted(node: NodeConfig) -> Match:
    return Match(mark=(node.accept_mark, node.accept_mark))


# --- static skeleton -------------------------------------------------------------


def local_endpoints_set_name(family: int) -> str:
    """The hash:net,iface set of every local endpoint's (address, host interface)."""
    return naming.ipset_name(family, "e", "local-endpoints")


def local_endpoints_set(family: int, members: frozenset[str]) -> IPSet:
    return IPSet(
        local_endpoints_set_name(family),
        family,
        "hash:net,iface",
        members,
        "local endpoints: each pod's own addresses with its host interface",
    )


def endpoint_set_members(ep: "EndpointView") -> frozenset[str]:
    """This endpoint's entries in the local-endpoints set: "<ip>/<len>,<iface>"."""
    return frozenset(f"{ip}/{ep.max_prefixlen},{ep.iface}" for ip in ep.ips)


def _pod_entry(node: NodeConfig, family: int) -> list[Rule]:
    """Anti-spoofing and conntrack for packets from (and, FORWARD, to) local pods.

    Anti-spoofing comes first, so an established-flow accept can never be reached
    with a forged source: the (source address, incoming interface) pair must be a
    local endpoint's own. An interface the compiler does not know has no entry, so
    everything it sends is dropped here (fail closed).
    """
    wild = naming.iface_wildcard(node.iface_prefix)
    return [
        Rule(
            Match(in_iface=wild, src_iface_set=local_endpoints_set_name(family), src_iface_set_negate=True),
            DROP,
            "anti-spoofing: a local pod may send only from its own addresses",
        ),
        Rule(Match(in_iface=wild, ctstate=("RELATED", "ESTABLISHED")), ACCEPT, "established or related flow"),
    ]


def _invalid(iface_field: str, wild: str) -> Rule:
    return Rule(Match(**{iface_field: wild, "ctstate": ("INVALID",)}), DROP, "invalid conntrack state")


def static_chains(node: NodeConfig, family: int) -> dict[str, Chain]:
    wild = naming.iface_wildcard(node.iface_prefix)
    ours = node.accept_mark | node.scratch_mark
    # Established and related packets of a flow that involves a local pod are accepted
    # here, before dispatch: only a flow's first packet walks the dispatch tree and the
    # endpoint and policy chains. Scoped to pod interfaces so the host's own FORWARD
    # rules still decide traffic that does not touch a pod.
    forward = Chain(
        CHAIN_FORWARD,
        (
            *_pod_entry(node, family),
            Rule(Match(out_iface=wild, ctstate=("RELATED", "ESTABLISHED")), ACCEPT, "established or related flow"),
            _invalid("in_iface", wild),
            _invalid("out_iface", wild),
            Rule(Match(), _mark_clear(node, ours), "clear policy mark bits"),
            Rule(Match(in_iface=wild), Action("JUMP", CHAIN_FROM_WL_DISPATCH), "from a local pod: its egress policy"),
            Rule(Match(out_iface=wild), Action("JUMP", CHAIN_TO_WL_DISPATCH), "to a local pod: its ingress policy"),
            Rule(_accepted(node), ACCEPT, "policy accepted the packet"),
        ),
    )
    inp = Chain(
        CHAIN_INPUT,
        (
            Rule(Match(), _mark_clear(node, ours), "clear policy mark bits"),
            Rule(Match(in_iface=wild), Action("GOTO", CHAIN_WL_TO_HOST), "from a local pod to this node"),
        ),
    )
    to_host: list[Rule] = []
    if family == 6:
        # Neighbour/router discovery to the node's link-local or multicast addresses
        # must work even for an egress-isolated pod, or it loses its gateway.
        # Types as Calico allows them: MLD query/report/done (130-132), router
        # solicitation (133), neighbour solicitation/advertisement (135, 136).
        # Before anti-spoofing: these come from link-local (or unspecified) sources.
        for icmp_type, what in ND_ICMPV6_TYPES:
            to_host.append(
                Rule(Match(protocol="ipv6-icmp", icmp_type=icmp_type), ACCEPT, f"ICMPv6 {what} to the node")
            )
    to_host += [
        *_pod_entry(node, family),
        _invalid("in_iface", wild),
        Rule(Match(), Action("JUMP", CHAIN_FROM_WL_DISPATCH), "pod egress policy applies to pod-to-node traffic"),
        Rule(Match(), Action(node.endpoint_to_host_action), "configured endpoint_to_host_action"),
    ]
    wl_to_host = Chain(CHAIN_WL_TO_HOST, tuple(to_host))
    output = Chain(
        CHAIN_OUTPUT,
        (Rule(Match(out_iface=wild), RETURN, "node to its own pods is not policed: kubelet probes"),),
    )
    return {c.name: c for c in (forward, inp, wl_to_host, output)}


ND_ICMPV6_TYPES = (
    (130, "MLD query"),
    (131, "MLD report"),
    (132, "MLD done"),
    (133, "router solicitation"),
    (135, "neighbour solicitation"),
    (136, "neighbour advertisement"),
)


# --- dispatch ------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def _goto(field_name: str, iface: str, target: str, ref: str) -> Rule:
    return Rule(Match(**{field_name: iface}), Action("GOTO", target), ref)


@lru_cache(maxsize=4096)
def _dispatch_child(name: str, field_name: str, direction: str, group: tuple[tuple[str, str], ...], deny: str) -> Chain:
    target_of = naming.from_workload_chain if direction == "from" else naming.to_workload_chain
    end = Rule(Match(), Action(deny), "unknown interface")
    return Chain(name, tuple(_goto(field_name, n, target_of(n), ref) for n, ref in group) + (end,))


@lru_cache(maxsize=1024)
def _bin_rule(field_name: str, direction: str, pattern: str, ch: str, count: int) -> tuple[str, Rule]:
    child = naming.dispatch_child_chain(direction, ch)
    return child, Rule(Match(**{field_name: pattern}), Action("GOTO", child), f"{count} pods on {pattern}")


def dispatch_chains(node: NodeConfig, endpoints: list[tuple[str, str]]) -> dict[str, Chain]:
    """One-level goto tree (felix dispatch.go): bin by the char after the common prefix.

    ``endpoints`` are (interface, "ns/pod") pairs. Rules and child chains are
    memoised by content, so adding a pod builds one bin and the root's tuple.
    """
    out: dict[str, Chain] = {}
    items = sorted(set(endpoints))
    cp = os.path.commonprefix([n for n, _ in items]) if items else ""
    bins: dict[str, list[tuple[str, str]]] = {}
    for n, ref in items:
        bins.setdefault(n[len(cp) : len(cp) + 1], []).append((n, ref))
    groups = [(c, tuple(bins[c])) for c in sorted(bins)]
    deny = _deny(node)
    for direction, root, field_name, target_of in (
        ("from", CHAIN_FROM_WL_DISPATCH, "in_iface", _fw_name),
        ("to", CHAIN_TO_WL_DISPATCH, "out_iface", _tw_name),
    ):
        root_rules: list[Rule] = []
        for c, group in groups:
            if len(group) == 1 or c == "":
                root_rules += [_goto(field_name, n, target_of(n), ref) for n, ref in group]
                continue
            child, rule = _bin_rule(field_name, direction, f"{cp}{c}+", c, len(group))
            root_rules.append(rule)
            out[child] = _dispatch_child(child, field_name, direction, group, node.deny_action)
        out[root] = Chain(root, tuple(root_rules) + (_end_rule(deny),))
    return out


_fw_name = lru_cache(maxsize=65536)(naming.from_workload_chain)
_tw_name = lru_cache(maxsize=65536)(naming.to_workload_chain)


@lru_cache(maxsize=8)
def _end_rule(deny: Action) -> Rule:
    return Rule(Match(), deny, "unknown interface")


# --- endpoint chains -----------------------------------------------------------------


@dataclass(frozen=True)
class EndpointView:
    """What the endpoint chains of one pod in one family depend on."""

    namespace: str
    pod: str
    iface: str
    ips: tuple[str, ...]  # addresses of this family, as text
    ingress: tuple[str, ...]  # policy refs "ns/name", sorted
    egress: tuple[str, ...]
    max_prefixlen: int = 32

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.pod}"


@dataclass
class Built:
    chains: dict[str, Chain] = field(default_factory=dict)
    ipsets: dict[str, IPSet] = field(default_factory=dict)  # static sets (ipBlock, endpoint)
    scopes: dict[str, ScopeDef] = field(default_factory=dict)  # set name -> scope


def _policy_block(node: NodeConfig, ep: EndpointView, direction: str) -> list[Rule]:
    refs = ep.ingress if direction == "ingress" else ep.egress
    if not refs:
        return [Rule(Match(), _mark_set(node), f"{ep.ref}: no policy selects the pod for {direction}: allow")]
    rules: list[Rule] = []
    for ref in refs:
        ns, name = ref.split("/", 1)
        rules.append(Rule(Match(), Action("JUMP", naming.policy_chain(ns, name, direction)), f"{direction} policy {ref}"))
        rules.append(Rule(_accepted(node), RETURN, f"return if {ref} accepted"))
    rules.append(Rule(Match(), _deny(node), f"{ep.ref}: no {direction} policy allowed the packet"))
    return rules


def _clear_accept(node: NodeConfig) -> Rule:
    return Rule(Match(), _mark_clear(node), "clear accept mark")


def endpoint_chains(node: NodeConfig, family: int, ep: EndpointView) -> Built:
    """pa-tw-/pa-fw- for one pod: only a flow's first packet gets here.

    Anti-spoofing and conntrack are done before dispatch (pa-FORWARD, pa-wl-to-host),
    which are the only ways into these chains.
    """
    out = Built()
    tw = Chain(naming.to_workload_chain(ep.iface), tuple([_clear_accept(node)] + _policy_block(node, ep, "ingress")))
    fw = Chain(naming.from_workload_chain(ep.iface), tuple([_clear_accept(node)] + _policy_block(node, ep, "egress")))
    out.chains[tw.name] = tw
    out.chains[fw.name] = fw
    return out


# --- policy chains -------------------------------------------------------------------


def policy_scopes(policy: NetworkPolicy) -> set[ScopeDef]:
    """Every selector/named-port scope the policy's rules reference (any family)."""
    out: set[ScopeDef] = set()
    for direction in DIRECTIONS:
        if not policy.governs(_ptype(direction)):
            continue
        for rule in policy.ingress if direction == "ingress" else policy.egress:
            peers = rule.peers or (None,)
            all_named = bool(rule.ports) and all(isinstance(p.port, str) for p in rule.ports)
            for peer in peers:
                sc = peer_scope(policy, peer) if peer is not None else None
                # an egress rule whose ports are all named uses only the named-port sets
                if sc is not None and not (direction == "egress" and all_named):
                    out.add(sc)
                for port in rule.ports:
                    if isinstance(port.port, str):
                        out.add(_named_scope(policy, direction, sc, port))
    return out


def _ptype(direction: str) -> PolicyType:
    return PolicyType.INGRESS if direction == "ingress" else PolicyType.EGRESS


def _named_scope(policy: NetworkPolicy, direction: str, peer_sc: ScopeDef | None, port: PolicyPort) -> ScopeDef:
    # The named port is resolved against the destination pod: for ingress that is
    # the selected pod itself, for egress the peer (any pod if the peer is an ipBlock
    # or absent).
    base = policy_scope(policy) if direction == "ingress" else (peer_sc or ALL_PODS)
    return base.with_port(port.protocol.lower, str(port.port))


def policy_chain(node: NodeConfig, family: int, policy: NetworkPolicy, direction: str) -> Built:
    out = Built()
    rules_out: list[Rule] = []
    src_side = direction == "ingress"
    rules = policy.ingress if direction == "ingress" else policy.egress
    for i, rule in enumerate(rules):
        peers: tuple[Peer | None, ...] = rule.peers or (None,)
        ports: tuple[PolicyPort | None, ...] = rule.ports or (None,)
        for j, peer in enumerate(peers):
            peer_fields: dict = {}
            sc: ScopeDef | None = None
            if peer is not None and peer.ip_block is not None:
                block = peer.ip_block
                if block.family != family or ipblock_empty(block):
                    continue
                if not block.excepts:
                    if block.cidr.prefixlen:
                        peer_fields["src_net" if src_side else "dst_net"] = str(block.cidr)
                else:
                    name = naming.ipset_name(family, "b", ipblock_ident(block))
                    origin = f"ipBlock {block.cidr} except {', '.join(str(e) for e in block.excepts)}"
                    out.ipsets[name] = IPSet(name, family, "hash:net", ipblock_members(block), origin)
                    peer_fields["src_set" if src_side else "dst_set"] = name
            elif peer is not None:
                sc = peer_scope(policy, peer)
                assert sc is not None
                name = sc.set_name(family)
                out.scopes[name] = sc
                peer_fields["src_set" if src_side else "dst_set"] = name
            for k, port in enumerate(ports):
                fields = dict(peer_fields)
                if port is not None:
                    fields["protocol"] = port.protocol.lower
                    if isinstance(port.port, int):
                        fields["dst_ports"] = ((port.port, port.end_port or port.port),)
                    elif isinstance(port.port, str):
                        nsc = _named_scope(policy, direction, sc, port)
                        name = nsc.set_name(family)
                        out.scopes[name] = nsc
                        fields["dst_ipport_set"] = name
                        if not src_side and sc is not None:
                            # the named-port set already holds only the peer's pods
                            fields.pop("dst_set", None)
                comment = f"{policy.ref} {direction} rule {i}"
                if peer is not None:
                    comment += f" peer {j}"
                if port is not None:
                    comment += f" port {k}"
                rules_out.append(Rule(Match(**fields), _mark_set(node), comment))
    name = naming.policy_chain(policy.namespace, policy.name, direction)
    chain = out.chains[name] = Chain(name, tuple(rules_out))
    used = chain.ipsets
    out.scopes = {n: d for n, d in out.scopes.items() if n in used}
    return out
