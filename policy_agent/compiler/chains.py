"""Pure chain builders: static skeleton, dispatch tree, endpoint chains, policy chains.

Nothing here keeps state; the incremental ``Compiler`` caches what these return.
See docs/decisions/compiler.md for why each rule is where it is.
"""

from __future__ import annotations

import os
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Iterable

from policy_agent.compiler.options import NodeConfig
from policy_agent.compiler.scopes import (
    ALL_PODS,
    ANY_PROTOCOL,
    ScopeDef,
    cnp_peer_scope,
    cnp_subject_scope,
    ipblock_empty,
    ipblock_ident,
    ipblock_members,
    peer_scope,
    policy_scope,
)
from policy_agent.desired import ACCEPT, DROP, RETURN, Action, Chain, FlowLog, FlowOrigin, IPSet, Match, Rule
from policy_agent.model.types import (
    CNP_STANDIN_RULE_NAME,
    ClusterNetworkPolicy,
    CNPAction,
    CNPPeer,
    CNPPort,
    CNPTier,
    LabelSelector,
    NetworkPolicy,
    Node,
    Peer,
    PolicyPort,
    PolicyType,
)
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


def _flow_log(node: NodeConfig, match: Match, origin: FlowOrigin) -> list[Rule]:
    """The NFLOG rule logged just before a verdict (same match), when that verdict is
    logged: [] otherwise. Only a flow's first packet reaches the chains that hold these
    (established traffic is accepted before dispatch), so nothing is logged for it."""
    fl = node.flow_log
    if fl is None or not (fl.deny if origin.verdict == "deny" else fl.allow):
        return []
    log = FlowLog(fl.group, origin, fl.rate, fl.burst, fl.per_source_rate, fl.per_source_burst)
    return [Rule(match, Action("NFLOG", log=log), f"flow log {origin.verdict}: {origin.origin}")]


# --- static skeleton -------------------------------------------------------------


@lru_cache(maxsize=4)
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


def _pod_entry(node: NodeConfig, family: int, established: Action = ACCEPT) -> list[Rule]:
    """Anti-spoofing and conntrack for packets from (and, FORWARD, to) local pods.

    An established-flow verdict for a packet from a pod needs its (source address,
    incoming interface) pair in the local endpoints set, in the same rule: the common
    packet (established, from a pod) costs one rule, and a forged source can never
    reach that verdict (conntrack cannot tell a forged packet that carries another
    pod's flow tuple from the real one; only the interface can). Every other packet
    from a pod whose pair is not a local endpoint's own is dropped by the next rule
    (anti-spoofing), before any other verdict; an interface the compiler does not
    know has no entry, so everything it sends is dropped (fail closed).
    ``established``: ACCEPT, or RETURN where the host's own rules must still see the
    flow (pod -> node). docs/decisions/dataplane-performance.md has the argument.
    """
    wild = naming.iface_wildcard(node.iface_prefix)
    own = local_endpoints_set_name(family)
    comment = "established or related flow from a local pod address on its own interface"
    if established == RETURN:
        comment += ": return to the host INPUT rules after ours"
    return [
        Rule(Match(in_iface=wild, ctstate=("RELATED", "ESTABLISHED"), src_iface_set=own), established, comment),
        Rule(
            Match(in_iface=wild, src_iface_set=own, src_iface_set_negate=True),
            DROP,
            "anti-spoofing: a local pod may send only from its own addresses",
        ),
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
        # must work even for an egress-isolated pod, or it loses its gateway. These
        # stay ACCEPT with endpoint_to_host_action RETURN: they never leave the link
        # (hop limit 255), reach no host service, and a host firewall that does not
        # know the pod veths would otherwise cut the pod off its gateway.
        # Types as Calico allows them: MLD query/report/done (130-132), router
        # solicitation (133), neighbour solicitation/advertisement (135, 136).
        # Before anti-spoofing: these come from link-local (or unspecified) sources.
        for icmp_type, what in ND_ICMPV6_TYPES:
            to_host.append(
                Rule(Match(protocol="ipv6-icmp", icmp_type=icmp_type), ACCEPT, f"ICMPv6 {what} to the node")
            )
    to_host += _to_host_tail(node, family, ours)
    wl_to_host = Chain(CHAIN_WL_TO_HOST, tuple(to_host))
    output = Chain(
        CHAIN_OUTPUT,
        (Rule(Match(out_iface=wild), RETURN, "node to its own pods is not policed: kubelet probes"),),
    )
    return {c.name: c for c in (forward, inp, wl_to_host, output)}


def _to_host_tail(node: NodeConfig, family: int, ours: int) -> list[Rule]:
    """pa-wl-to-host after ND: anti-spoofing, conntrack, the pod's egress policy, then
    ``endpoint_to_host_action``.

    With RETURN (the default) control goes back to INPUT after our jump (pa-INPUT was
    reached by -j and goes here by -g), so the host's own INPUT rules (its firewall,
    kube-proxy's KUBE-FIREWALL) decide what egress policy allowed. So that this is
    safe: an egress denial is dropped here, never returned; established packets return
    too (an ACCEPT there would let every later packet of a flow skip the host's rules);
    and our mark bits are cleared first, so no host rule that matches marks (kube-proxy
    uses 0x4000/0x8000, others their own) sees our verdict bits.
    """
    wild = naming.iface_wildcard(node.iface_prefix)
    action = node.endpoint_to_host_action
    # DROP mode keeps accepting established flows: they are replies to flows the node
    # opened (kubelet probes), since every new pod -> node flow is dropped.
    established = RETURN if action == "RETURN" else ACCEPT
    rules = [
        *_pod_entry(node, family, established),
        _invalid("in_iface", wild),
        Rule(Match(), Action("JUMP", CHAIN_FROM_WL_DISPATCH), "pod egress policy applies to pod-to-node traffic"),
        # The endpoint chains drop what egress policy denies and return only with the
        # accept bit set; this keeps a denial final here even if that ever changed,
        # since what follows may hand the packet to rules that accept it.
        Rule(Match(mark=(0, node.accept_mark)), _deny(node), "egress policy did not accept the packet"),
    ]
    if action == "DROP":
        return rules + [Rule(Match(), DROP, "endpoint_to_host_action DROP: pods may not reach this node")]
    rules.append(Rule(Match(), _mark_clear(node, ours), "clear policy mark bits before the verdict leaves our chains"))
    if action == "ACCEPT":
        return rules + [Rule(Match(), ACCEPT, "endpoint_to_host_action ACCEPT: egress policy allowed it")]
    return rules + [Rule(Match(), RETURN, "egress policy allowed it: return to the host INPUT rules after ours")]


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
def _bin_rule(field_name: str, direction: str, pattern: str, ch: str) -> tuple[str, Rule]:
    # No pod count in the comment: rule hashes chain over the rules before them, so a
    # count would rewrite every later bin of the root on each pod add (issue 13).
    child = naming.dispatch_child_chain(direction, ch)
    return child, Rule(Match(**{field_name: pattern}), Action("GOTO", child), f"pods on {pattern}")


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
            child, rule = _bin_rule(field_name, direction, f"{cp}{c}+", c)
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
    # ClusterNetworkPolicies selecting the pod with rules in that direction, as
    # (name, priority) in evaluation order (priority, then name).
    admin_ingress: tuple[tuple[str, int], ...] = ()
    admin_egress: tuple[tuple[str, int], ...] = ()
    baseline_ingress: tuple[tuple[str, int], ...] = ()
    baseline_egress: tuple[tuple[str, int], ...] = ()

    def cnps(self, tier: CNPTier, direction: str) -> tuple[tuple[str, int], ...]:
        if tier is CNPTier.ADMIN:
            return self.admin_ingress if direction == "ingress" else self.admin_egress
        return self.baseline_ingress if direction == "ingress" else self.baseline_egress

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.pod}"


@dataclass
class Built:
    chains: dict[str, Chain] = field(default_factory=dict)
    ipsets: dict[str, IPSet] = field(default_factory=dict)  # static sets (ipBlock, endpoint)
    scopes: dict[str, ScopeDef] = field(default_factory=dict)  # set name -> scope


def _policy_block(node: NodeConfig, ep: EndpointView, direction: str) -> list[Rule]:
    """Admin tier, then NetworkPolicy (final for an isolated pod), then baseline tier,
    then default allow. Without ClusterNetworkPolicies: exactly the NetworkPolicy block."""
    refs = ep.ingress if direction == "ingress" else ep.egress
    rules: list[Rule] = _tier_block(node, ep, CNPTier.ADMIN, direction)
    if not refs:
        rules += _tier_block(node, ep, CNPTier.BASELINE, direction)
        comment = f"{ep.ref}: no policy selects the pod for {direction}: allow"
        rules += _flow_log(node, Match(), FlowOrigin("allow", direction, "no-policy-selects", endpoint=ep.ref,
                                                     origin=comment))
        rules.append(Rule(Match(), _mark_set(node), comment))
        return rules
    for ref in refs:
        ns, name = ref.split("/", 1)
        rules.append(Rule(Match(), Action("JUMP", naming.policy_chain(ns, name, direction)), f"{direction} policy {ref}"))
        rules.append(Rule(_accepted(node), RETURN, f"return if {ref} accepted"))
    comment = f"{ep.ref}: no {direction} policy allowed the packet"
    rules += _flow_log(node, Match(), FlowOrigin("deny", direction, "no-policy-allowed", endpoint=ep.ref,
                                                 isolating=tuple(refs), origin=comment))
    rules.append(Rule(Match(), _deny(node), comment))
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
                # Logged only while the accept mark is clear: the first allowing rule decides.
                rules_out += _flow_log(
                    node, Match(**fields, mark=(0, node.accept_mark)),
                    FlowOrigin("allow", direction, "networkpolicy", policy=policy.ref, rule=i, origin=comment),
                )
                rules_out.append(Rule(Match(**fields), _mark_set(node), comment))
    if policy.fallback_reason:
        # A fallback has no allow rules; this no-op RETURN only carries the why into
        # iptables-save, render and explain traces.
        comment = f"{policy.ref} {direction} fallback: {policy.fallback_reason}"
        rules_out.append(Rule(Match(), RETURN, comment))
    name = naming.policy_chain(policy.namespace, policy.name, direction)
    chain = out.chains[name] = Chain(name, tuple(rules_out))
    used = chain.ipsets
    out.scopes = {n: d for n, d in out.scopes.items() if n in used}
    return out


# --- ClusterNetworkPolicy tiers --------------------------------------------------------
#
# docs/decisions/cluster-network-policy.md. Per endpoint and direction the endpoint
# chain runs: the admin tier (one jump per selecting policy, ascending priority then
# name), the NetworkPolicy block (final for an isolated pod), the baseline tier, then
# the default allow. A policy chain is first-match: every matching rule leaves it at
# once: Accept by a goto to pa-cnp-accept (sets the accept mark; the end of that chain
# returns to the endpoint chain, which returns), Deny by the deny action, Pass by a
# goto to pa-cnp-pass (sets the pass bit = NodeConfig.scratch_mark). The endpoint
# chain jumps to the next policy of the tier only while the pass bit is clear, and
# clears it at the end of the tier.

CNP_ACCEPT_CHAIN = "pa-cnp-accept"
CNP_PASS_CHAIN = "pa-cnp-pass"
# Comment prefixes explain reads back (policy_agent.explain.tier_decisions).
CNP_ACCEPT_COMMENT = "cluster network policy Accept: set the accept mark and leave the tier"
CNP_PASS_COMMENT = "cluster network policy Pass: skip the rest of the tier"


def _tier_name(tier: CNPTier) -> str:
    return "admin" if tier is CNPTier.ADMIN else "baseline"


def cnp_chain_name(tier: CNPTier, name: str, direction: str) -> str:
    """pa-ai-/pa-ao- (admin ingress/egress), pa-bi-/pa-bo- (baseline) + the policy name."""
    d = {"ingress": "i", "egress": "o"}.get(direction)
    if d is None:
        raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}")
    return naming.length_limited(f"pa-{'a' if tier is CNPTier.ADMIN else 'b'}{d}-", name, naming.CHAIN_MAX)


def _pass_bit(node: NodeConfig) -> int:
    return node.scratch_mark


def _tier_block(node: NodeConfig, ep: EndpointView, tier: CNPTier, direction: str) -> list[Rule]:
    cnps = ep.cnps(tier, direction)
    if not cnps:
        return []
    t = _tier_name(tier)
    p = _pass_bit(node)
    rules: list[Rule] = []
    for name, prio in cnps:
        rules.append(
            Rule(
                Match(mark=(0, p)),
                Action("JUMP", cnp_chain_name(tier, name, direction)),
                f"{t} tier: {direction} cluster network policy {name} priority {prio}",
            )
        )
        rules.append(Rule(_accepted(node), RETURN, f"return if {name} accepted"))
    rules.append(Rule(Match(), _mark_clear(node, p), f"end of {t} tier: clear the pass mark"))
    return rules


def cnp_helper_chains(node: NodeConfig) -> dict[str, Chain]:
    """The two goto targets of Accept and Pass; rendered while any CNP chain is."""
    p = _pass_bit(node)
    return {
        CNP_ACCEPT_CHAIN: Chain(CNP_ACCEPT_CHAIN, (Rule(Match(), _mark_set(node), CNP_ACCEPT_COMMENT),)),
        CNP_PASS_CHAIN: Chain(CNP_PASS_CHAIN, (Rule(Match(), Action("MARK", mark=(p, p)), CNP_PASS_COMMENT),)),
    }


def _any_port_scope(base: ScopeDef, port: CNPPort) -> ScopeDef:
    assert port.named_port is not None
    return base.with_port(ANY_PROTOCOL, port.named_port)


def cnp_scopes(cnp: ClusterNetworkPolicy) -> set[ScopeDef]:
    """Every selector/named-port scope the policy's rules reference (any family)."""
    out: set[ScopeDef] = set()
    for direction in DIRECTIONS:
        for rule in cnp.rules(direction):
            named = [p for p in rule.ports if p.named_port]
            all_named = bool(rule.ports) and len(named) == len(rule.ports)
            for peer in rule.peers:
                sc = cnp_peer_scope(peer)
                if sc is not None and not (direction == "egress" and all_named):
                    out.add(sc)
                for port in named:
                    base = cnp_subject_scope(cnp) if direction == "ingress" else sc
                    if base is not None:
                        out.add(_any_port_scope(base, port))
    return out


def cnp_has_node_peers(cnp: ClusterNetworkPolicy) -> bool:
    return any(peer.kind == "nodes" for rule in cnp.egress for peer in rule.peers)


def node_set(family: int, selector: LabelSelector, nodes: Iterable[Node]) -> IPSet:
    """hash:net of the addresses (this family) of the nodes whose labels match."""
    members = frozenset(
        f"{ip}/{ip.max_prefixlen}"
        for n in nodes
        if selector.matches(n.labels)
        for ip in n.addresses
        if ip.version == family
    )
    ident = f"nodes={selector.canonical()}"
    name = naming.ipset_name(family, "b", ident)
    return IPSet(name, family, "hash:net", members, f"addresses of nodes matching {selector.canonical()}")


def _cnp_peer_fields(
    family: int, cnp: ClusterNetworkPolicy, peer: CNPPeer, direction: str, out: Built, nodes: Iterable[Node]
) -> tuple[list[tuple[str, dict]], ScopeDef | None]:
    """(label, match fields) alternatives for one peer in one family; [] = matches nothing here."""
    src_side = direction == "ingress"
    key = "src_set" if src_side else "dst_set"
    sc = cnp_peer_scope(peer)
    if sc is not None:
        name = sc.set_name(family)
        out.scopes[name] = sc
        return [("", {key: name})], sc
    if peer.kind == "networks":
        alts = []
        for m, net in enumerate(peer.networks):
            if net.version != family:
                continue
            # /0 = every address of the family: no address match at all
            alts.append((f" network {m}", {"dst_net": str(net)} if net.prefixlen else {}))
        return alts, None
    if peer.kind == "nodes":
        assert peer.node_selector is not None
        s = node_set(family, peer.node_selector, nodes)
        out.ipsets[s.name] = s
        return [("", {"dst_set": s.name})], None
    # domainNames: never matched (no DNS view in this dataplane); unknown: see caller.
    return [], None


def cnp_chain(
    node: NodeConfig, family: int, cnp: ClusterNetworkPolicy, direction: str, nodes: Iterable[Node] = ()
) -> Built:
    """The first-match chain of one ClusterNetworkPolicy in one direction and family."""
    out = Built()
    rules_out: list[Rule] = []
    tier = _tier_name(cnp.tier)
    nodes = tuple(nodes)
    for i, rule in enumerate(cnp.rules(direction)):
        head = f"{tier} tier cnp {cnp.name} priority {cnp.priority} {direction} rule {i}"
        tail = f": {rule.action.value}" + (f", rule name={rule.name}" if rule.name else "")
        if rule.action is CNPAction.ACCEPT:
            target = Action("GOTO", CNP_ACCEPT_CHAIN)
        elif rule.action is CNPAction.PASS:
            target = Action("GOTO", CNP_PASS_CHAIN)
        else:
            target = _deny(node)
        verdict = {CNPAction.ACCEPT: "allow", CNPAction.DENY: "deny"}.get(rule.action)

        def origin(comment: str, verdict: str | None = verdict, i: int = i, name: str = rule.name) -> FlowOrigin | None:
            if verdict is None:  # Pass decides nothing
                return None
            return FlowOrigin(verdict, direction, tier, policy=cnp.name, priority=cnp.priority, rule=i,
                              rule_name=name, origin=comment)

        if cnp.fallback_reason and rule.name == CNP_STANDIN_RULE_NAME:
            # The unparseable policy's stand-in (model.parse.fallback_cluster_network_policy):
            # Deny all for its subject in this direction; the comment carries the why.
            comment = f"{head}: Deny, rule name={rule.name}, unparseable: {cnp.fallback_reason}"
            fail = origin(comment, "deny")
            assert fail is not None
            rules_out += _flow_log(node, Match(), fail)
            rules_out.append(Rule(Match(), _deny(node), comment))
            break
        unknown = [j for j, p in enumerate(rule.peers) if p.kind == "unknown"]
        domains = [j for j, p in enumerate(rule.peers) if p.kind == "domainNames"]
        if domains and rule.action is not CNPAction.ACCEPT and not unknown:
            # The API supports domainNames in Accept rules only and this dataplane has no
            # DNS view: a Deny or Pass toward names is enforced as Deny to every
            # destination on the rule's ports, a superset of what it names (fail closed).
            tail_d = ": Deny" + (f", rule name={rule.name}" if rule.name else "")
            for k, port in enumerate(rule.ports or (None,)):
                fields: dict = {}
                if port is not None and port.protocol is not None and port.start is not None:
                    fields = {"protocol": port.protocol.lower, "dst_ports": ((port.start, port.end or port.start),)}
                comment = (f"{head} peer {domains[0]} domainNames not resolvable, fail closed to every destination"
                           + (f" port {k}" if port is not None else "") + tail_d)
                fail = origin(comment, "deny")
                assert fail is not None
                rules_out += _flow_log(node, Match(**fields), fail)
                rules_out.append(Rule(Match(**fields), _deny(node), comment))
            if not rule.ports:
                break  # every packet was denied: nothing after it matters
            continue
        if domains and rule.action is CNPAction.ACCEPT:
            # Not enforced: a no-op rule (MARK of no bit) so that explain's trace and
            # render name the rule and why; the Accept then matches nothing (fail closed).
            names = ",".join(rule.peers[domains[0]].domain_names)
            comment = (f"{head} peer {domains[0]} domainNames {names}: not enforced, "
                       "no DNS view in this dataplane: matches nothing")
            rules_out.append(Rule(Match(), Action("MARK", mark=(0, 0)), comment))
        if unknown and rule.action is not CNPAction.ACCEPT:
            # The API: a peer with no field we know is a newer CRD's; fail closed. For
            # Deny and Pass that is "treat the rule as Deny all": nothing after it matters.
            comment = (f"{head} peer {unknown[0]} of an unknown type, fail closed: Deny"
                       + (f", rule name={rule.name}" if rule.name else ""))
            fail = origin(comment, "deny")
            assert fail is not None
            rules_out += _flow_log(node, Match(), fail)
            rules_out.append(Rule(Match(), _deny(node), comment))
            break
        ports: tuple[CNPPort | None, ...] = rule.ports or (None,)
        for j, peer in enumerate(rule.peers):
            alts, sc = _cnp_peer_fields(family, cnp, peer, direction, out, nodes)
            for label, peer_fields in alts:
                for k, port in enumerate(ports):
                    fields = dict(peer_fields)
                    if port is not None and port.named_port:
                        base = cnp_subject_scope(cnp) if direction == "ingress" else sc
                        if base is None:
                            continue  # rejected by the parser (networks/nodes with a named port)
                        nsc = _any_port_scope(base, port)
                        name = nsc.set_name(family)
                        out.scopes[name] = nsc
                        fields["dst_ipport_set"] = name
                        if direction == "egress":
                            fields.pop("dst_set", None)  # the named-port set holds only the peer's pods
                    elif port is not None:
                        assert port.protocol is not None and port.start is not None
                        fields["protocol"] = port.protocol.lower
                        fields["dst_ports"] = ((port.start, port.end or port.start),)
                    comment = f"{head} peer {j}{label}" + (f" port {k}" if port is not None else "") + tail
                    decided = origin(comment)
                    if decided is not None:
                        rules_out += _flow_log(node, Match(**fields), decided)
                    rules_out.append(Rule(Match(**fields), target, comment))
    name = cnp_chain_name(cnp.tier, cnp.name, direction)
    chain = out.chains[name] = Chain(name, tuple(rules_out))
    used = chain.ipsets
    out.scopes = {n: d for n, d in out.scopes.items() if n in used}
    out.ipsets = {n: st for n, st in out.ipsets.items() if n in used}
    return out
