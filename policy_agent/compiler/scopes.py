"""Address sets the compiler needs: what a peer (or a named port) stands for.

A ``ScopeDef`` is the meaning of a selector ipset: "pods matching <pod selector>
in <one namespace | namespaces matching a selector>", optionally narrowed to
the pods that expose a named port. Its ``ident`` is canonical, so two rules or
two policies with the same selector share one ipset (per family).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from socket import AF_INET6 as _AF_INET6
from socket import inet_ntoa as _inet_ntoa
from socket import inet_ntop as _inet_ntop
from functools import lru_cache
from ipaddress import IPv4Address

from policy_agent.model.types import (
    MATCH_ALL,
    ClusterNetworkPolicy,
    CNPPeer,
    IPBlock,
    LabelSelector,
    NetworkPolicy,
    Peer,
    Pod,
)
from policy_agent.shared.naming import ipset_name


@dataclass(frozen=True)
class ScopeDef:
    namespace: str | None  # a fixed namespace, or None = chosen by ns_selector
    ns_selector: LabelSelector | None
    pod_selector: LabelSelector
    named_port: tuple[str, str] | None = None  # (protocol lower-case, port name)

    def __hash__(self) -> int:
        # Scopes are dictionary keys on every event: hash the nested selectors once.
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.namespace, self.ns_selector, self.pod_selector, self.named_port))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def kind(self) -> str:
        return "n" if self.named_port else "s"

    @property
    def ident(self) -> str:
        if self.namespace is not None:
            where = f"ns={self.namespace}"
        else:
            where = f"nssel={(self.ns_selector or MATCH_ALL).canonical()}"
        base = f"{where}|pod={self.pod_selector.canonical()}"
        if self.named_port:
            return f"port={self.named_port[0]}:{self.named_port[1]}|{base}"
        return base

    def set_name(self, family: int) -> str:
        # Named on every desired() that touches the scope, and equal scopes are built
        # anew with each policy chain: hash the identity once.
        return _set_name(self, family)

    @property
    def origin(self) -> str:
        if self.namespace is not None:
            where = f"in namespace {self.namespace}"
        else:
            where = f"in namespaces matching {(self.ns_selector or MATCH_ALL).canonical()}"
        text = f"pods matching {self.pod_selector.canonical()} {where}"
        if self.named_port and self.named_port[0] == ANY_PROTOCOL:
            return f"named port {self.named_port[1]} (any protocol) of {text}"
        if self.named_port:
            return f"named port {self.named_port[0]}/{self.named_port[1]} of {text}"
        return text

    def with_port(self, protocol: str, name: str) -> "ScopeDef":
        return replace(self, named_port=(protocol, name))

    def members_of(self, pod: Pod) -> tuple[tuple[int, str], ...]:
        """(family, ipset member) pairs this pod contributes, ignoring selectors."""
        if self.named_port is None:
            # once per pod in a full compile: IPv4 inline (the common case), no generator
            out = []
            for ip in pod.ips:
                if ip.__class__ is IPv4Address:
                    out.append((4, _inet_ntoa(ip._ip.to_bytes(4, "big")) + "/32"))
                else:
                    out.append((ip.version, _host_member(ip)))
            return tuple(out)
        proto, name = self.named_port
        out = []
        for cp in pod.ports:
            # ANY_PROTOCOL (ClusterNetworkPolicy destinationNamedPort): the entry carries
            # the container port's own protocol, so the packet's must match it.
            if cp.name == name and (cp.protocol.lower == proto or proto == ANY_PROTOCOL):
                out += [(ip.version, f"{_ip_text(ip)},{cp.protocol.lower}:{cp.port}") for ip in pod.ips]
        return tuple(out)


def _host_member(ip) -> str:
    """"<address>/32" or "<address>/128"."""
    return _ip_text(ip) + ("/32" if ip.version == 4 else "/128")


def _ip_text(ip) -> str:
    """The text str() gives, at a fraction of its cost (a full compile formats every
    pod's addresses): IPv4 through inet_ntoa, IPv6 through inet_ntop, which compresses
    zeros as str() does (RFC 5952: the first longest run of two or more) except under
    ::/80, where it writes an embedded IPv4 address (::ffff:1.2.3.4) that str() does
    not: those, and scoped ones, go through str()."""
    if ip.version == 4:
        return _inet_ntoa(int(ip).to_bytes(4, "big"))
    if int(ip) >> 48 and not ip.scope_id:
        return _inet_ntop(_AF_INET6, ip.packed)
    return str(ip)


@lru_cache(maxsize=65536)
def _set_name(d: ScopeDef, family: int) -> str:
    return ipset_name(family, d.kind, d.ident)


ALL_PODS = ScopeDef(None, MATCH_ALL, MATCH_ALL)
# named_port protocol of a ClusterNetworkPolicy destinationNamedPort (no protocol of its own)
ANY_PROTOCOL = "any"


def selector_matches(selector: LabelSelector, labels: dict[str, str]) -> bool:
    """LabelSelector.matches on a plain dict: the hot loop of the label index.

    Same meaning as the model's method (tested against it); avoids the Mapping ABC
    on every lookup.
    """
    for k, v in selector.match_labels.items_tuple():
        if labels.get(k) != v:
            return False
    for r in selector.match_expressions:
        if not r.matches(labels):
            return False
    return True


def peer_scope(policy: NetworkPolicy, peer: Peer) -> ScopeDef | None:
    """The pods a selector peer stands for; None for an ipBlock peer."""
    if peer.ip_block is not None:
        return None
    if peer.namespace_selector is None:
        return ScopeDef(policy.namespace, None, peer.pod_selector or MATCH_ALL)
    return ScopeDef(None, peer.namespace_selector, peer.pod_selector or MATCH_ALL)


def cnp_peer_scope(peer: CNPPeer) -> ScopeDef | None:
    """The pods a ClusterNetworkPolicy namespaces/pods peer stands for (None for the
    other kinds). The same identity as a NetworkPolicy namespaceSelector peer with the
    same selectors, so both share one set."""
    if peer.kind == "namespaces":
        return ScopeDef(None, peer.namespace_selector or MATCH_ALL, MATCH_ALL)
    if peer.kind == "pods":
        return ScopeDef(None, peer.namespace_selector or MATCH_ALL, peer.pod_selector or MATCH_ALL)
    return None


def cnp_subject_scope(cnp: ClusterNetworkPolicy) -> ScopeDef:
    """The pods a ClusterNetworkPolicy applies to (as a scope: for ingress named ports)."""
    return ScopeDef(None, cnp.subject_namespaces, cnp.subject_pods)


def policy_scope(policy: NetworkPolicy) -> ScopeDef:
    """The pods the policy itself applies to."""
    return ScopeDef(policy.namespace, None, policy.pod_selector)


def eligible(pod: Pod) -> bool:
    """Pods that can be a peer: a host-network pod has the node's address and a
    finished pod's address may already belong to someone else (as Calico)."""
    return not pod.host_network and not pod.terminated and bool(pod.ips)


# --- ipBlock sets ------------------------------------------------------------------


def ipblock_ident(block: IPBlock) -> str:
    return f"cidr={block.cidr}|except={','.join(sorted(str(e) for e in block.excepts))}"


@lru_cache(maxsize=4096)
def _ipblock_positives(block: IPBlock) -> tuple:
    """The cidr as hash:net entries, minus any entry an except covers whole.

    hash:net cannot hold a /0, so a /0 becomes its two halves; an except equal to
    (or containing) such a half must remove the half rather than sit next to it
    as "nomatch", or the set would hold the same net twice with both flags.
    """
    cidr = block.cidr
    halves = list(cidr.subnets(prefixlen_diff=1)) if cidr.prefixlen == 0 else [cidr]
    excepts = [e for e in block.excepts if e.version == cidr.version]
    return tuple(n for n in halves if not any(n.subnet_of(e) for e in excepts))


@lru_cache(maxsize=4096)
def ipblock_members(block: IPBlock) -> frozenset[str]:
    """hash:net members: the cidr, and every except inside it as "nomatch" (most specific wins)."""
    pos = _ipblock_positives(block)
    nomatch = [e for e in block.excepts if e not in pos and any(e.subnet_of(p) for p in pos if p.version == e.version)]
    return frozenset([str(n) for n in pos] + [f"{e} nomatch" for e in nomatch])


def ipblock_empty(block: IPBlock) -> bool:
    """Excepts that cover the whole cidr leave nothing to match."""
    return not _ipblock_positives(block)
