"""Frozen input values: what the compiler sees of Namespaces, Pods and NetworkPolicies.

Outside objects (API dicts, YAML) are converted to these once, at the edge
(``policy_agent.model.parse``). Every value is immutable and hashable.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator, Mapping, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class Protocol(str, Enum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def lower(self) -> str:
        return self.value.lower()


class PolicyType(str, Enum):
    INGRESS = "Ingress"
    EGRESS = "Egress"


class Operator(str, Enum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class Labels(Mapping[str, str]):
    """An immutable, hashable label map with a deterministic order."""

    __slots__ = ("_items", "_dict", "_hash")

    def __init__(self, data: Mapping[str, str] | None = None) -> None:
        items = tuple(sorted((data or {}).items()))
        self._items = items
        self._dict = dict(items)
        self._hash = hash(items)

    def __getitem__(self, key: str) -> str:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._dict == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({self._dict!r})"

    def items_tuple(self) -> tuple[tuple[str, str], ...]:
        return self._items

    def plain(self) -> dict[str, str]:
        """The labels as a plain dict (fast lookups in hot loops). Shared: never modify it."""
        return self._dict


EMPTY_LABELS = Labels()


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: tuple[str, ...] = ()  # sorted, deduplicated

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator is Operator.IN:
            return self.key in labels and labels[self.key] in self.values
        if self.operator is Operator.NOT_IN:
            # Kubernetes: NotIn matches when the key is absent too.
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator is Operator.EXISTS:
            return self.key in labels
        return self.key not in labels

    def canonical(self) -> str:
        if self.operator in (Operator.IN, Operator.NOT_IN):
            return f"{self.key} {self.operator.value} ({','.join(self.values)})"
        return f"{self.key} {self.operator.value}"


@dataclass(frozen=True)
class LabelSelector:
    """metav1.LabelSelector. The empty selector matches everything."""

    match_labels: Labels = EMPTY_LABELS
    match_expressions: tuple[Requirement, ...] = ()  # sorted by canonical()

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        for k, v in self.match_labels.items():
            if labels.get(k) != v:
                return False
        return all(r.matches(labels) for r in self.match_expressions)

    def canonical(self) -> str:
        """A stable string; equal selectors (in meaning of their terms) give equal strings."""
        terms = [f"{k}={v}" for k, v in self.match_labels.items()]
        terms += [r.canonical() for r in self.match_expressions]
        return "&".join(sorted(terms)) if terms else "all()"


MATCH_ALL = LabelSelector()


@dataclass(frozen=True)
class IPBlock:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    @property
    def family(self) -> int:
        return self.cidr.version

    def contains(self, ip: IPAddress) -> bool:
        if ip.version != self.cidr.version or ip not in self.cidr:
            return False
        return not any(ip in e for e in self.excepts)


@dataclass(frozen=True)
class Peer:
    """One entry of from/to. Exactly one of (selectors) or ip_block is used.

    pod_selector None + namespace_selector None + ip_block None never occurs
    (the parser rejects an empty peer, as the API server does).
    - pod_selector only: pods in the policy's namespace.
    - namespace_selector only: every pod in the matching namespaces.
    - both: matching pods in matching namespaces.
    """

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PolicyPort:
    """protocol defaults to TCP; port None = every port of that protocol.

    port is an int (1-65535) or a named port (str, an IANA_SVC_NAME);
    end_port only with an int port, end_port >= port.
    """

    protocol: Protocol = Protocol.TCP
    port: int | str | None = None
    end_port: int | None = None


@dataclass(frozen=True)
class Rule:
    """One ingress or egress rule.

    ports empty = all ports and protocols; peers empty = all sources/destinations
    (the API makes no difference between an absent and an empty list here).
    """

    ports: tuple[PolicyPort, ...] = ()
    peers: tuple[Peer, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector = MATCH_ALL
    policy_types: tuple[PolicyType, ...] = (PolicyType.INGRESS,)  # already defaulted
    ingress: tuple[Rule, ...] = ()  # () with INGRESS in policy_types = deny all ingress
    egress: tuple[Rule, ...] = ()
    resource_version: str = ""
    # Non-empty: the object could not be parsed and this is its no-allow stand-in
    # (model.parse.fallback_network_policy); the text says why (field: message).
    fallback_reason: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def governs(self, policy_type: PolicyType) -> bool:
        return policy_type in self.policy_types


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: Protocol = Protocol.TCP
    name: str | None = None


# Why a pod address was left out (bounded: these are metric label values).
POD_IP_REJECT_REASONS = (
    "invalid",  # not an address (or has an IPv6 zone index); only for the annotation
    "unspecified",  # 0.0.0.0, ::
    "loopback",  # 127.0.0.0/8, ::1
    "multicast",  # 224.0.0.0/4, ff00::/8
    "link_local",  # 169.254.0.0/16, fe80::/10
    "outside_pod_networks",  # not in PodIPPolicy.networks (when set)
)


@dataclass(frozen=True)
class RejectedIP:
    """One pod address the edge refused: where it was written, what, and why."""

    path: str  # e.g. status.podIPs[0].ip, metadata.annotations[vpc.amazonaws.com/pod-ips]
    address: str  # as written (whitespace stripped)
    reason: str  # one of POD_IP_REJECT_REASONS


@dataclass(frozen=True)
class PodIPPolicy:
    """Which pod addresses the edge accepts (settings pod_networks, trust_pod_ips_annotation).

    ``networks`` empty = no range check (only the always-invalid classes are
    rejected). ``trust_annotation`` needs ``networks``: an annotation anyone with
    "edit" may write, taken without a range, could bind any address to a pod.
    """

    networks: tuple[IPNetwork, ...] = ()
    trust_annotation: bool = False
    # Derived, not compared: per family, (first, last) integer ranges of networks.
    ranges: Mapping[int, tuple[tuple[int, int], ...]] = field(
        default_factory=dict, init=False, compare=False, hash=False, repr=False
    )
    # Memo of accepted address texts -> address (the hot path of a relist); bounded.
    accepted: dict = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.trust_annotation and not self.networks:
            raise ValueError("trusting the pod-ips annotation needs pod networks to limit it")
        ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for net in self.networks:
            ranges[net.version].append((int(net.network_address), int(net.broadcast_address)))
        object.__setattr__(self, "ranges", {v: tuple(r) for v, r in ranges.items()})


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Labels = EMPTY_LABELS
    node_name: str | None = None
    ips: tuple[IPAddress, ...] = ()  # status.podIPs, in order; may be empty (not yet known)
    ports: tuple[ContainerPort, ...] = ()  # containers and initContainers
    host_network: bool = False
    phase: str = ""  # Pending/Running/Succeeded/Failed/Unknown
    uid: str = ""
    resource_version: str = ""
    # Addresses left out at the edge (PodIPPolicy), kept only so the agent can report them.
    rejected_ips: tuple[RejectedIP, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def terminated(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    def ips_of(self, family: int) -> tuple[IPAddress, ...]:
        return tuple(ip for ip in self.ips if ip.version == family)

    def named_port(self, name: str) -> tuple[ContainerPort, ...]:
        return tuple(p for p in self.ports if p.name == name)


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Labels = EMPTY_LABELS
    resource_version: str = ""

    @property
    def key(self) -> str:
        return self.name


# --- ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) and Node -------------
# docs/decisions/cluster-network-policy.md: shape, semantics and what we do not do.


class CNPTier(str, Enum):
    ADMIN = "Admin"
    BASELINE = "Baseline"


class CNPAction(str, Enum):
    ACCEPT = "Accept"
    DENY = "Deny"
    PASS = "Pass"


@dataclass(frozen=True)
class CNPPort:
    """One ``protocols[]`` entry: a protocol with a destination port or range, or a
    destination named port (resolved on the destination pod, any protocol: the
    container port's own protocol must match the packet's)."""

    protocol: Protocol | None = None  # None only with named_port
    start: int | None = None  # destinationPort.number, or range.start
    end: int | None = None  # = start for a number; range.end (inclusive)
    named_port: str | None = None


# CNPRule.name of the Deny-all rule of an unparseable policy's stand-in
# (ClusterNetworkPolicy.fallback_reason set; model.parse.fallback_cluster_network_policy).
CNP_STANDIN_RULE_NAME = "deny-all stand-in"

# CNPPeer.kind values
CNP_PEER_KINDS = ("namespaces", "pods", "nodes", "networks", "domainNames", "unknown")


@dataclass(frozen=True)
class CNPPeer:
    """One from/to entry; exactly one kind.

    - namespaces: every pod of the namespaces matching ``namespace_selector``;
    - pods: pods matching ``pod_selector`` in namespaces matching ``namespace_selector``;
    - nodes (egress): the addresses of the nodes whose labels match ``node_selector``;
    - networks (egress): CIDRs;
    - domainNames (egress): parsed, never matched (see the decision doc);
    - unknown: the object set no field we know (a newer CRD): fail closed.
    """

    kind: str
    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector | None = None
    node_selector: LabelSelector | None = None
    networks: tuple[IPNetwork, ...] = ()
    domain_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class CNPRule:
    """ports () = every protocol and port (the API: protocols unspecified)."""

    action: CNPAction
    name: str = ""
    peers: tuple[CNPPeer, ...] = ()
    ports: tuple[CNPPort, ...] = ()


@dataclass(frozen=True)
class ClusterNetworkPolicy:
    """Cluster-scoped; subject = pods matching ``subject_pods`` in namespaces matching
    ``subject_namespaces`` (a ``namespaces`` subject has subject_pods MATCH_ALL)."""

    name: str
    tier: CNPTier
    priority: int
    subject_namespaces: LabelSelector = MATCH_ALL
    subject_pods: LabelSelector = MATCH_ALL
    ingress: tuple[CNPRule, ...] = ()
    egress: tuple[CNPRule, ...] = ()
    resource_version: str = ""
    # Non-empty: the object could not be parsed and this is its fail-closed stand-in
    # (model.parse.fallback_cluster_network_policy); the text says why (field: message).
    fallback_reason: str = ""

    @property
    def key(self) -> str:
        return self.name

    @property
    def ref(self) -> str:
        return self.name

    def rules(self, direction: str) -> tuple[CNPRule, ...]:
        return self.ingress if direction == "ingress" else self.egress


@dataclass(frozen=True)
class Node:
    """What a ``nodes`` peer needs of a v1 Node: labels and status.addresses (IPs only)."""

    name: str
    labels: Labels = EMPTY_LABELS
    addresses: tuple[IPAddress, ...] = ()
    resource_version: str = ""

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True)
class ClusterSnapshot:
    """Everything the compiler needs, keyed for lookup.

    A pod whose namespace is not (yet) in ``namespaces`` is treated as being in a
    namespace whose only label is kubernetes.io/metadata.name=<name>.
    """

    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    pods: Mapping[tuple[str, str], Pod] = field(default_factory=dict)
    policies: Mapping[tuple[str, str], NetworkPolicy] = field(default_factory=dict)
    cluster_policies: Mapping[str, ClusterNetworkPolicy] = field(default_factory=dict)
    nodes: Mapping[str, Node] = field(default_factory=dict)

    @classmethod
    def of(cls, objects) -> "ClusterSnapshot":
        ns: dict[str, Namespace] = {}
        pods: dict[tuple[str, str], Pod] = {}
        pols: dict[tuple[str, str], NetworkPolicy] = {}
        cnps: dict[str, ClusterNetworkPolicy] = {}
        nodes: dict[str, Node] = {}
        for o in objects:
            if isinstance(o, Namespace):
                ns[o.name] = o
            elif isinstance(o, Pod):
                pods[o.key] = o
            elif isinstance(o, NetworkPolicy):
                pols[o.key] = o
            elif isinstance(o, ClusterNetworkPolicy):
                cnps[o.key] = o
            elif isinstance(o, Node):
                nodes[o.key] = o
            else:
                raise TypeError(f"not a model object: {o!r}")
        return cls(ns, pods, pols, cnps, nodes)

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        ns = self.namespaces.get(name)
        if ns is not None:
            return ns.labels
        return Labels({NAMESPACE_NAME_LABEL: name})


# Set by the API server on every namespace since 1.21; the parser adds it too.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


class ModelError(ValueError):
    """Invalid input, naming the object and the field.

    str() reads like: NetworkPolicy default/web: spec.ingress[0].from[1].ipBlock.except[0]: ...
    """

    def __init__(self, kind: str, ref: str, field_path: str, message: str) -> None:
        self.kind = kind
        self.ref = ref
        self.field_path = field_path
        self.message = message
        super().__init__(f"{kind} {ref}: {field_path}: {message}" if field_path else f"{kind} {ref}: {message}")
