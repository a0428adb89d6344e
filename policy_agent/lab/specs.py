"""Small cluster specs in shorthand, compiled by the real compiler.

Dataplane tests and benchmarks describe a few pods and policies tersely (labels as
"k=v", a peer as namespace + one label, ports as (proto, port)) and get the
``DesiredState`` that ``policy_agent.compiler.compile`` makes of them for node
``NODE``: exactly the layout the agent ships, never a hand-built imitation of it.

Shorthand semantics (NetworkPolicy v1):
- ``Peer(namespace, label)``: pods with ``label`` (any pod if None) in ``namespace``
  (the policy's own namespace if equal to it, every namespace if None).
- ``PolicyRule(peer=None)``: any source/destination; ``ports=()``: every port.
- ``Policy(ingress=None)``: not an ingress policy; ``ingress=()``: deny all ingress
  (the same for egress).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from policy_agent import model
from policy_agent.compiler import compile as compile_snapshot
from policy_agent.compiler.options import DEFAULT_IFACE_PREFIX, NodeConfig
from policy_agent.desired import DesiredState
from policy_agent.model.types import (
    MATCH_ALL,
    NAMESPACE_NAME_LABEL,
    ClusterSnapshot,
    Labels,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    PolicyPort,
    PolicyType,
    Protocol,
)
from policy_agent.shared import naming

NODE = "lab-node"


def _selector(label: str | None) -> LabelSelector:
    if label is None:
        return MATCH_ALL
    k, _, v = label.partition("=")
    return LabelSelector(Labels({k: v}))


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    ips: tuple[str, ...]
    labels: frozenset[str] = frozenset()  # "k=v"
    local: bool = False

    @property
    def iface(self) -> str:
        return naming.veth_name(DEFAULT_IFACE_PREFIX, self.namespace, self.name)

    def model(self) -> model.types.Pod:
        labels = Labels(dict(lab.partition("=")[::2] for lab in self.labels))
        return model.types.Pod(self.namespace, self.name, labels, NODE if self.local else "remote-node",
                               tuple(ipaddress.ip_address(ip) for ip in self.ips), phase="Running")


@dataclass(frozen=True)
class Peer:
    namespace: str | None  # None: every namespace
    label: str | None  # "k=v"; None: every pod

    def model(self, policy_namespace: str) -> model.types.Peer:
        if self.namespace == policy_namespace:
            return model.types.Peer(pod_selector=_selector(self.label))
        ns = MATCH_ALL if self.namespace is None else LabelSelector(Labels({NAMESPACE_NAME_LABEL: self.namespace}))
        return model.types.Peer(pod_selector=None if self.label is None else _selector(self.label),
                                namespace_selector=ns)


@dataclass(frozen=True)
class PolicyRule:
    peer: Peer | None = None  # None: any address
    ports: tuple[tuple[str, int], ...] = ()  # (proto, port); empty: all

    def model(self, policy_namespace: str) -> model.types.Rule:
        ports = tuple(PolicyPort(Protocol(proto.upper()), port) for proto, port in self.ports)
        peers = () if self.peer is None else (self.peer.model(policy_namespace),)
        return model.types.Rule(ports, peers)


@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    selector: str | None  # "k=v" within the namespace; None: every pod there
    ingress: tuple[PolicyRule, ...] | None = None  # None: not an ingress policy
    egress: tuple[PolicyRule, ...] | None = None

    def model(self) -> NetworkPolicy:
        types = tuple(t for t, rules in ((PolicyType.INGRESS, self.ingress), (PolicyType.EGRESS, self.egress))
                      if rules is not None)
        return NetworkPolicy(
            self.namespace, self.name, _selector(self.selector), types,
            tuple(r.model(self.namespace) for r in self.ingress or ()),
            tuple(r.model(self.namespace) for r in self.egress or ()),
        )


def snapshot(pods: list[Pod], policies: list[Policy]) -> ClusterSnapshot:
    names = sorted({p.namespace for p in pods} | {p.namespace for p in policies})
    namespaces = [Namespace(n, Labels({NAMESPACE_NAME_LABEL: n})) for n in names]
    return ClusterSnapshot.of([*namespaces, *(p.model() for p in pods), *(p.model() for p in policies)])


def build(pods: list[Pod], policies: list[Policy], node: NodeConfig | None = None) -> DesiredState:
    """The compiler's output for these pods and policies on node ``NODE``."""
    return compile_snapshot(snapshot(pods, policies), node or NodeConfig(NODE))
