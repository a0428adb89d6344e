"""ClusterNetworkPolicy tiers for the independent reference evaluator (tests/reference_eval.py).

Written from the API's documented semantics (apis/v1alpha2 of
kubernetes-sigs/network-policy-api; docs/decisions/cluster-network-policy.md), sharing
no code with the compiler. For one direction of one pod (the *subject*: the source for
egress, the destination for ingress):

1. Admin tier: the policies whose subject selects the pod, by ascending priority then
   name (ties: the API lets the implementation choose; we pin name order), rules in
   order; the first rule whose peers and protocols match decides: Accept or Deny are
   final, Pass ends the tier.
2. NetworkPolicy: only when some NetworkPolicy governs the pod in that direction; then
   it is final (tests/reference_eval.py).
3. Baseline tier, as the admin tier.
4. Allow.

A peer of a type we do not know fails closed: in an Accept rule it matches nothing, a
Deny or Pass rule becomes "deny everything". A domainNames peer matches nothing in an
Accept rule; a Deny or Pass rule with one denies every destination on its ports.
"""

from __future__ import annotations

from typing import Mapping

NS_NAME_LABEL = "kubernetes.io/metadata.name"


def _sel(selector, labels: Mapping[str, str]) -> bool:
    for k, v in selector.match_labels.items():
        if labels.get(k) != v:
            return False
    for req in selector.match_expressions:
        op, present = req.operator.value, req.key in labels
        if op == "In" and not (present and labels[req.key] in req.values):
            return False
        if op == "NotIn" and present and labels[req.key] in req.values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def _ns_labels(snap, name: str) -> Mapping[str, str]:
    ns = snap.namespaces.get(name)
    return ns.labels if ns is not None else {NS_NAME_LABEL: name}


def _live(pod):
    if pod is None or pod.host_network or pod.phase in ("Succeeded", "Failed") or not pod.ips:
        return None
    return pod


def _peer(snap, peer, other) -> bool:
    kind = peer.kind
    if kind in ("namespaces", "pods"):
        pod = _live(other.pod)
        if pod is None or not _sel(peer.namespace_selector, _ns_labels(snap, pod.namespace)):
            return False
        return kind == "namespaces" or _sel(peer.pod_selector, pod.labels)
    if kind == "networks":
        return any(other.ip.version == n.version and other.ip in n for n in peer.networks)
    if kind == "nodes":
        return any(
            _sel(peer.node_selector, n.labels) and other.ip in n.addresses
            for n in getattr(snap, "nodes", {}).values()
        )
    return False  # domainNames: not resolved; unknown: handled by the caller


def _ports(rule, protocol: str, port: int | None, dst) -> bool:
    if not rule.ports:
        return True
    for p in rule.ports:
        if port is None:
            continue
        if p.named_port:
            pod = _live(dst.pod)
            if pod and any(c.name == p.named_port and c.protocol.value == protocol and c.port == port for c in pod.ports):
                return True
        elif p.protocol.value == protocol and p.start <= port <= p.end:
            return True
    return False


def tier_verdict(snap, tier: str, subject_pod, other, direction: str, protocol: str, port, dst) -> str | None:
    """"Accept", "Deny", or None (no rule matched, or Pass) for one tier."""
    pols = [
        c
        for c in getattr(snap, "cluster_policies", {}).values()
        if c.tier.value == tier
        and _sel(c.subject_namespaces, _ns_labels(snap, subject_pod.namespace))
        and _sel(c.subject_pods, subject_pod.labels)
    ]
    for c in sorted(pols, key=lambda c: (c.priority, c.name)):
        for rule in c.ingress if direction == "ingress" else c.egress:
            action = rule.action.value
            if action != "Accept" and any(p.kind == "unknown" for p in rule.peers):
                return "Deny"
            if action != "Accept" and any(p.kind == "domainNames" for p in rule.peers):
                # domainNames are supported in Accept rules only and never resolved here: a
                # Deny or Pass toward names denies every destination on the rule's ports.
                if _ports(rule, protocol, port, dst):
                    return "Deny"
                continue
            if not _ports(rule, protocol, port, dst):
                continue
            if any(_peer(snap, p, other) for p in rule.peers):
                return None if action == "Pass" else action
    return None
