"""A small, independent reference evaluator of NetworkPolicy v1 semantics.

Straight from the model values, sharing no code with the compiler (not even the
selector matching in model.types), following kube-network-policies
(``EvaluatePolicyDirection``, ``evaluatePorts``, ``evaluateIPBlocks``,
``evaluateSelectors``; reference-facts.md §6):

- a pod selected by no policy governing a direction is open in that direction;
- a flow needs the source's egress AND the destination's ingress;
- peers: podSelector alone = pods of the policy's namespace; namespaceSelector
  alone = every pod of the matching namespaces; both = AND; ipBlock = the
  address is in ``cidr`` and in no ``except`` (pod addresses included);
- ports: none listed = everything; a port without number = every port of the
  protocol; ``endPort`` inclusive; a named port resolves on the destination
  pod's container ports (name and protocol must both match).

An address that belongs to a pod is that pod (host-network and finished pods
are never peers: their address is the node's or may be reused).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Mapping, Union

import reference_eval_cnp
from policy_agent.model.types import ClusterSnapshot, NetworkPolicy, Peer, Pod

NS_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Endpoint:
    """A flow end: the address used, and the pod it belongs to (if any)."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    pod: Pod | None


End = Union[Pod, str, Endpoint]


def _selector_matches(selector, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics, written out again on purpose."""
    if selector is None:
        return False
    for k, v in selector.match_labels.items():
        if k not in labels or labels[k] != v:
            return False
    for req in selector.match_expressions:
        op = req.operator.value
        present = req.key in labels
        if op == "In":
            if not (present and labels[req.key] in req.values):
                return False
        elif op == "NotIn":
            if present and labels[req.key] in req.values:
                return False
        elif op == "Exists":
            if not present:
                return False
        elif op == "DoesNotExist":
            if present:
                return False
        else:  # pragma: no cover - the parser rejects other operators
            raise AssertionError(op)
    return True


def _ns_labels(snap: ClusterSnapshot, name: str) -> Mapping[str, str]:
    ns = snap.namespaces.get(name)
    return ns.labels if ns is not None else {NS_NAME_LABEL: name}


def _peer_pod(pod: Pod | None) -> Pod | None:
    if pod is None or pod.host_network or pod.phase in ("Succeeded", "Failed") or not pod.ips:
        return None
    return pod


def resolve(snap: ClusterSnapshot, end: End, family: int | None = None) -> Endpoint:
    if isinstance(end, Endpoint):
        return end
    if isinstance(end, Pod):
        ips = [ip for ip in end.ips if family is None or ip.version == family]
        if not ips:
            raise ValueError(f"{end.ref} has no IPv{family} address")
        return Endpoint(ips[0], end)
    ip = ipaddress.ip_address(end)
    owner = next((p for p in snap.pods.values() if ip in p.ips and _peer_pod(p)), None)
    return Endpoint(ip, owner)


def _peer_matches(snap: ClusterSnapshot, policy: NetworkPolicy, peer: Peer, other: Endpoint) -> bool:
    if peer.ip_block is not None:
        b = peer.ip_block
        if other.ip.version != b.cidr.version or other.ip not in b.cidr:
            return False
        return not any(other.ip in e for e in b.excepts)
    pod = _peer_pod(other.pod)
    if pod is None:
        return False
    if peer.namespace_selector is None:
        if pod.namespace != policy.namespace:
            return False
    elif not _selector_matches(peer.namespace_selector, _ns_labels(snap, pod.namespace)):
        return False
    if peer.pod_selector is not None and not _selector_matches(peer.pod_selector, pod.labels):
        return False
    return True


def _ports_match(rule, protocol: str, port: int | None, dst: Endpoint) -> bool:
    if not rule.ports:
        return True
    for pp in rule.ports:
        if pp.protocol.value != protocol:
            continue
        if pp.port is None:
            return True
        if port is None:
            continue
        if isinstance(pp.port, int):
            if pp.port <= port <= (pp.end_port if pp.end_port is not None else pp.port):
                return True
            continue
        dpod = _peer_pod(dst.pod)
        if dpod is None:
            continue
        for cp in dpod.ports:
            if cp.name == pp.port and cp.protocol.value == protocol and cp.port == port:
                return True
    return False


def _direction_allows(
    snap: ClusterSnapshot,
    subject: Endpoint,
    other: Endpoint,
    direction: str,
    protocol: str,
    port: int | None,
    dst: Endpoint,
) -> bool:
    pod = subject.pod
    if pod is None:
        return True  # not a pod: no NetworkPolicy applies to it
    # ClusterNetworkPolicy: admin tier first, baseline only for pods no NetworkPolicy governs.
    admin = reference_eval_cnp.tier_verdict(snap, "Admin", pod, other, direction, protocol, port, dst)
    if admin is not None:
        return admin == "Accept"
    governing = [
        p
        for p in snap.policies.values()
        if p.namespace == pod.namespace
        and any(t.value.lower() == direction for t in p.policy_types)
        and _selector_matches(p.pod_selector, pod.labels)
    ]
    if not governing:
        baseline = reference_eval_cnp.tier_verdict(snap, "Baseline", pod, other, direction, protocol, port, dst)
        return baseline != "Deny"
    for p in governing:
        for rule in p.ingress if direction == "ingress" else p.egress:
            if rule.peers and not any(_peer_matches(snap, p, peer, other) for peer in rule.peers):
                continue
            if _ports_match(rule, protocol, port, dst):
                return True
    return False


def egress_allows(snap: ClusterSnapshot, src: End, dst: End, protocol: str = "TCP", port: int | None = None) -> bool:
    s, d = _pair(snap, src, dst)
    return _direction_allows(snap, s, d, "egress", protocol.upper(), port, d)


def ingress_allows(snap: ClusterSnapshot, src: End, dst: End, protocol: str = "TCP", port: int | None = None) -> bool:
    s, d = _pair(snap, src, dst)
    return _direction_allows(snap, d, s, "ingress", protocol.upper(), port, d)


def allowed(snap: ClusterSnapshot, src: End, dst: End, protocol: str = "TCP", port: int | None = None) -> bool:
    """Is a NEW connection src -> dst:port allowed by the cluster's NetworkPolicies?"""
    return egress_allows(snap, src, dst, protocol, port) and ingress_allows(snap, src, dst, protocol, port)


def _pair(snap: ClusterSnapshot, src: End, dst: End) -> tuple[Endpoint, Endpoint]:
    family = None
    for e in (src, dst):
        if isinstance(e, str):
            family = ipaddress.ip_address(e).version
        elif isinstance(e, Endpoint):
            family = e.ip.version
    if family is None:
        fams = {ip.version for ip in src.ips} & {ip.version for ip in dst.ips}  # type: ignore[union-attr]
        if not fams:
            raise ValueError("no common address family")
        family = min(fams)
    return resolve(snap, src, family), resolve(snap, dst, family)
