"""API dicts (JSON or YAML-loaded, camelCase as the API server sends them) -> model values.

This is the edge: nothing else sees a raw Kubernetes object. Every rejection is a
``ModelError`` naming the object ("ns/name") and the field path
(``spec.ingress[0].from[1].ipBlock.except[0]``).

What the API server would default, we default here too:
- NetworkPolicy ``policyTypes`` empty -> [Ingress], plus Egress if egress rules exist.
- ``protocol`` absent on a policy port or a container port -> TCP.
- Namespace label ``kubernetes.io/metadata.name=<name>`` (always set to the name,
  as the API server does since 1.21).
- ``metadata.namespace`` absent on a Pod or NetworkPolicy -> "default" (as kubectl
  apply with the default context would do).

Decisions where the API server is looser or stricter than one might expect:
- ipBlock CIDRs with host bits set (``10.0.0.1/24``) are ACCEPTED and normalised
  to the network (``10.0.0.0/24``): the API server validated them with Go's
  net.ParseCIDR for years, so such objects exist in real clusters, and rejecting a
  whole policy would silently widen access. ``except`` entries are normalised the
  same way, then must be strictly inside the (normalised) ``cidr``.
- A string ``port`` must be an IANA service name (letters required), so ``"80"``
  is rejected, as the API server rejects it.
- Label values must be strings: YAML ``version: 1`` is rejected (quote it), as
  kubectl/the API server reject it.
- Boolean fields (``spec.hostNetwork``) must be real booleans (or absent/null =
  false): a string ``"true"`` is rejected, as the API server rejects it. Taking
  its truthiness would make ``"false"`` a host-network pod, exempt from policy.

Trust note on pod IPs (docs/decisions/pod-ip-trust.md): ``status.podIPs`` and
``status.podIP`` are written by the kubelet (node credentials); the AWS VPC CNI
annotation ``vpc.amazonaws.com/pod-ips`` is user-writable (anyone with "edit"
on the pod). The annotation is therefore read only when a ``PodIPPolicy`` says
``trust_annotation`` (setting trust_pod_ips_annotation, default off), only while
status names no address, and each of its addresses only inside the policy's
``networks`` (which trust requires). Every address, whatever its field, must
pass ``pod_ip_problem``: unspecified, loopback, multicast, link-local and (when
pod networks are set) outside addresses are left out of the pod and recorded in
``Pod.rejected_ips`` (path, address, reason) for the agent to report; the pod
keeps its labels and other addresses. IPv4-mapped IPv6 is unwrapped to IPv4
first. An unparseable status address is still an error of the object (the API
server validates those); an unparseable annotation entry is only a rejection.
On this node the CNI endpoint record overrides both, and passes the same check
(see policy_agent.store).

Hot path note: 10,000 pods go through ``parse_pod`` on a relist, so regexes are
compiled once at import, accepted pod address texts are memoised per PodIPPolicy
(the address check is integer arithmetic), and the common case does no extra
allocation.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from sys import intern as _intern
# collections.abc, not typing: isinstance() against typing.Mapping goes through typing's
# __instancecheck__ and was a fifth of a pod's parse time (issue 13: 50k-pod lists).
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import yaml

from policy_agent.model.types import (
    EMPTY_LABELS,
    MATCH_ALL,
    NAMESPACE_NAME_LABEL,
    CNP_STANDIN_RULE_NAME,
    CNPAction,
    CNPPeer,
    CNPPort,
    CNPRule,
    CNPTier,
    ClusterNetworkPolicy,
    Node,
    ContainerPort,
    IPAddress,
    IPBlock,
    Labels,
    LabelSelector,
    ModelError,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PodIPPolicy,
    PolicyPort,
    PolicyType,
    Protocol,
    RejectedIP,
    Requirement,
    Rule,
)

__all__ = [
    "AWS_POD_IPS_ANNOTATION",
    "SourcedModelError",
    "CNP_STANDIN_RULE_NAME",
    "describe_cnp_fallback",
    "fallback_cluster_network_policy",
    "fallback_namespace",
    "fallback_network_policy",
    "parse_cluster_network_policy_or_fallback",
    "check_pod_ip",
    "load_yaml",
    "load_yaml_keep_going",
    "parse_labels",
    "parse_cluster_network_policy",
    "parse_namespace",
    "parse_network_policy",
    "parse_node",
    "parse_network_policy_or_fallback",
    "parse_object",
    "parse_objects",
    "parse_pod",
    "parse_selector",
    "pod_ip_problem",
]

# The AWS VPC CNI annotates pods with their IP(s) before the kubelet reports status.
AWS_POD_IPS_ANNOTATION = "vpc.amazonaws.com/pod-ips"

_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_IANA_SVC_NAME_RE = re.compile(r"^[-a-z0-9]+$")
_HAS_LETTER_RE = re.compile(r"[a-z]")

_PROTOCOLS = {p.value: p for p in Protocol}
_OPERATORS = {o.value: o for o in Operator}
_POLICY_TYPES = {t.value: t for t in PolicyType}

# Label keys/values repeat a lot across 10,000 pods: remember the valid ones.
_valid_keys: set[str] = set()
_valid_values: set[str] = set()
_CACHE_MAX = 100_000


class SourcedModelError(ModelError):
    """A ModelError that also names the file (and document) it came from."""

    def __init__(self, source: str, err: ModelError, document: int | None = None) -> None:
        super().__init__(err.kind, err.ref, err.field_path, err.message)
        self.source = source
        self.document = document
        where = source if document is None else f"{source} (document {document})"
        self.args = (f"{where}: {err}",)

    def __str__(self) -> str:
        return self.args[0]


class _Ctx:
    """Names the object being parsed, for errors."""

    __slots__ = ("kind", "ref")

    def __init__(self, kind: str, ref: str) -> None:
        self.kind = kind
        self.ref = ref

    def err(self, path: str, message: str) -> ModelError:
        return ModelError(self.kind, self.ref, path, message)


# --- small validators ---------------------------------------------------------------


def _is_dns_label(s: str) -> bool:
    return len(s) <= 63 and _DNS_LABEL_RE.match(s) is not None


def _is_dns_subdomain(s: str) -> bool:
    return len(s) <= 253 and _DNS_SUBDOMAIN_RE.match(s) is not None


def _label_key_problem(key: Any) -> str | None:
    if not isinstance(key, str):
        return f"label key {key!r} must be a string"
    if key in _valid_keys:
        return None
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix or not _is_dns_subdomain(prefix):
            return f"label key {key!r}: prefix must be a DNS subdomain"
    if not name or len(name) > 63 or not _QUALIFIED_NAME_RE.match(name):
        return (
            f"label key {key!r}: name must be 1-63 characters of [A-Za-z0-9_.-], "
            "starting and ending with an alphanumeric"
        )
    if len(_valid_keys) < _CACHE_MAX:
        _valid_keys.add(key)
    return None


def _label_value_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"label value {value!r} must be a string (quote it in YAML)"
    if value in _valid_values or value == "":
        return None
    if len(value) > 63 or not _QUALIFIED_NAME_RE.match(value):
        return (
            f"label value {value!r} must be at most 63 characters of [A-Za-z0-9_.-], "
            "starting and ending with an alphanumeric"
        )
    if len(_valid_values) < _CACHE_MAX:
        _valid_values.add(value)
    return None


def _is_iana_svc_name(s: str) -> bool:
    return (
        0 < len(s) <= 15
        and _IANA_SVC_NAME_RE.match(s) is not None
        and _HAS_LETTER_RE.search(s) is not None
        and "--" not in s
        and not s.startswith("-")
        and not s.endswith("-")
    )


def _as_map(ctx: _Ctx, value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.err(path, f"must be a mapping, not {type(value).__name__}")
    return value


def _as_list(ctx: _Ctx, value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ctx.err(path, f"must be a list, not {type(value).__name__}")
    return value


def _protocol(ctx: _Ctx, value: Any, path: str) -> Protocol:
    if value is None:
        return Protocol.TCP
    p = _PROTOCOLS.get(value) if isinstance(value, str) else None
    if p is None:
        raise ctx.err(path, f"unknown protocol {value!r} (TCP, UDP or SCTP)")
    return p


def _port_number(ctx: _Ctx, value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.err(path, f"must be an integer port, not {value!r}")
    if not 1 <= value <= 65535:
        raise ctx.err(path, f"port {value} out of range 1-65535")
    return value


# --- labels and selectors -----------------------------------------------------------


def _labels(ctx: _Ctx, value: Any, path: str) -> Labels:
    """A label map, validated (keys and values per Kubernetes rules)."""
    if not value:
        if value is not None and not isinstance(value, Mapping):
            raise ctx.err(path, f"must be a mapping, not {type(value).__name__}")
        return EMPTY_LABELS
    m = _as_map(ctx, value, path)
    for k, v in m.items():
        problem = _label_key_problem(k) or _label_value_problem(v)
        if problem:
            raise ctx.err(f"{path}[{k}]" if isinstance(k, str) else path, problem)
    # Shared: the pods of one ReplicaSet carry the same labels, and every decoded object
    # would otherwise keep its own copy of each key and value (memory per cached pod).
    return _shared_labels(tuple(sorted((_intern(k), _intern(v)) for k, v in m.items())))


@lru_cache(maxsize=65536)
def _shared_labels(items: tuple[tuple[str, str], ...]) -> Labels:
    return Labels(dict(items))


def _selector(ctx: _Ctx, value: Any, path: str) -> LabelSelector:
    """metav1.LabelSelector; ``{}`` or null is the match-everything selector."""
    m = _as_map(ctx, value, path)
    if not m:
        return MATCH_ALL
    for k in m:
        if k not in ("matchLabels", "matchExpressions"):
            raise ctx.err(f"{path}.{k}", "unknown selector field (matchLabels, matchExpressions)")
    labels = _labels(ctx, m.get("matchLabels"), f"{path}.matchLabels")
    reqs: list[Requirement] = []
    for i, e in enumerate(_as_list(ctx, m.get("matchExpressions"), f"{path}.matchExpressions")):
        epath = f"{path}.matchExpressions[{i}]"
        e = _as_map(ctx, e, epath)
        key = e.get("key")
        problem = _label_key_problem(key) if key is not None else "key is required"
        if problem:
            raise ctx.err(f"{epath}.key", problem)
        op_text = e.get("operator")
        op = _OPERATORS.get(op_text) if isinstance(op_text, str) else None
        if op is None:
            raise ctx.err(f"{epath}.operator", f"invalid operator {op_text!r} (In, NotIn, Exists, DoesNotExist)")
        values = _as_list(ctx, e.get("values"), f"{epath}.values")
        if op in (Operator.IN, Operator.NOT_IN):
            if not values:
                raise ctx.err(f"{epath}.values", f"must be non-empty when operator is {op.value}")
        elif values:
            raise ctx.err(f"{epath}.values", f"must be empty when operator is {op.value}")
        for j, v in enumerate(values):
            problem = _label_value_problem(v)
            if problem:
                raise ctx.err(f"{epath}.values[{j}]", problem)
        reqs.append(Requirement(key, op, tuple(sorted(set(values)))))
    reqs.sort(key=Requirement.canonical)
    return LabelSelector(labels, tuple(reqs))


def parse_labels(value: Any, path: str = "labels", kind: str = "object", ref: str = "?") -> Labels:
    """A validated label map; errors name ``kind ref: path``."""
    return _labels(_Ctx(kind, ref), value, path)


def parse_selector(value: Any, path: str = "selector", kind: str = "object", ref: str = "?") -> LabelSelector:
    """A validated metav1.LabelSelector; errors name ``kind ref: path``."""
    return _selector(_Ctx(kind, ref), value, path)


# --- metadata -----------------------------------------------------------------------


def _meta(kind: str, d: Any, namespaced: bool) -> tuple[_Ctx, Mapping[str, Any], str, str]:
    if not isinstance(d, Mapping):
        raise ModelError(kind, "?", "", f"must be a mapping, not {type(d).__name__}")
    meta = d.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    ns = (meta.get("namespace") if isinstance(meta, Mapping) else None) or "default"
    shown_name = name if isinstance(name, str) and name else "<unnamed>"
    ref = f"{ns}/{shown_name}" if namespaced else shown_name
    ctx = _Ctx(kind, ref)
    if not isinstance(meta, Mapping):
        raise ctx.err("metadata", "is required")
    if not isinstance(name, str) or not name:
        raise ctx.err("metadata.name", "is required")
    if namespaced:
        if not isinstance(ns, str) or not _is_dns_label(ns):
            raise ctx.err("metadata.namespace", f"{ns!r} is not a DNS-1123 label")
    return ctx, meta, ns, name


def _str_field(meta: Mapping[str, Any], key: str) -> str:
    v = meta.get(key)
    return v if isinstance(v, str) else ("" if v is None else str(v))


# --- Namespace ----------------------------------------------------------------------


def parse_namespace(d: Mapping[str, Any]) -> Namespace:
    ctx, meta, _, name = _meta("Namespace", d, namespaced=False)
    if not _is_dns_label(name):
        raise ctx.err("metadata.name", f"{name!r} is not a DNS-1123 label")
    labels = _labels(ctx, meta.get("labels"), "metadata.labels")
    if labels.get(NAMESPACE_NAME_LABEL) != name:
        merged = dict(labels)
        merged[NAMESPACE_NAME_LABEL] = name
        labels = Labels(merged)
    return Namespace(name=name, labels=labels, resource_version=_str_field(meta, "resourceVersion"))


# --- Pod ----------------------------------------------------------------------------


def _bool(ctx: _Ctx, value: Any, path: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ctx.err(path, f"must be a boolean (true/false), not {value!r}")
    return value


_MAX_ACCEPTED_MEMO = 100_000
_DEFAULT_POD_IP_POLICY = PodIPPolicy()


def pod_ip_problem(ip: IPAddress, policy: PodIPPolicy) -> str | None:
    """Why ``ip`` (IPv4-mapped already unwrapped) may not be a pod address, or None.

    Integer tests, not ipaddress' is_* properties: this runs for every pod of a
    relist, and each property builds or walks network objects.
    """
    n = int(ip)
    if ip.version == 4:
        top = n >> 24
        if n == 0:
            return "unspecified"  # in a hash:ip set the kernel refuses the whole restore
        if top == 127:
            return "loopback"
        if 224 <= top < 240:
            return "multicast"
        if n >> 16 == 0xA9FE:
            return "link_local"  # 169.254/16: every node's metadata/link-local range
    else:
        if n == 0:
            return "unspecified"
        if n == 1:
            return "loopback"
        if n >> 120 == 0xFF:
            return "multicast"
        if n >> 118 == 0x3FA:
            return "link_local"  # fe80::/10
    if policy.networks:
        for lo, hi in policy.ranges[ip.version]:
            if lo <= n <= hi:
                return None
        return "outside_pod_networks"
    return None


def check_pod_ip(value: Any, policy: PodIPPolicy) -> tuple[IPAddress | None, str, str]:
    """(address, "", text) when ``value`` is an acceptable pod address, else
    (None, reason, text). IPv4-mapped IPv6 is unwrapped to IPv4 first (the kernel
    and ipset treat it as that address). Used for every pod IP source alike."""
    memo = policy.accepted
    ip = memo.get(value) if isinstance(value, str) else None
    if ip is not None:
        return ip, "", value
    text = value.strip() if isinstance(value, str) else repr(value)
    if not isinstance(value, str) or "%" in text:  # a zone index is no pod address
        return None, "invalid", text
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None, "invalid", text
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    reason = pod_ip_problem(ip, policy)
    if reason:
        return None, reason, text
    if len(memo) < _MAX_ACCEPTED_MEMO:
        memo[value] = ip
    return ip, "", text


def _pod_ip(ctx: _Ctx, value: Any, path: str, policy: PodIPPolicy, rejected: list[RejectedIP]) -> Any:
    """One status IP: unparseable is an error of the object (the API server
    validates these, so it is not a tenant's doing); a parseable but refused one is
    left out and recorded."""
    ip, reason, text = check_pod_ip(value, policy)
    if ip is not None:
        return ip
    if reason == "invalid":
        if not isinstance(value, str):
            raise ctx.err(path, f"must be an IP address string, not {value!r}")
        raise ctx.err(path, f"{value!r} is not a valid IP address")
    rejected.append(RejectedIP(path, text, reason))
    return None


def _pod_ips(
    ctx: _Ctx, meta: Mapping[str, Any], status: Mapping[str, Any], policy: PodIPPolicy, rejected: list[RejectedIP]
) -> tuple:
    ips: list = []
    pod_ips = status.get("podIPs")
    if pod_ips:
        for i, entry in enumerate(_as_list(ctx, pod_ips, "status.podIPs")):
            if not isinstance(entry, Mapping):
                entry = _as_map(ctx, entry, f"status.podIPs[{i}]")  # raises, naming the entry (None -> {})
            ip = _pod_ip(ctx, entry.get("ip"), f"status.podIPs[{i}].ip", policy, rejected)
            if ip is not None:
                ips.append(ip)
    elif pod_ips is not None:
        _as_list(ctx, pod_ips, "status.podIPs")  # a wrong type is still an error
    if not pod_ips and status.get("podIP"):
        ip = _pod_ip(ctx, status.get("podIP"), "status.podIP", policy, rejected)
        if ip is not None:
            ips.append(ip)
    # The annotation is user-writable (module docstring): read only when trusted,
    # only while status names no address at all (a status address that was
    # rejected still counts: the annotation may not replace it), and each
    # address only inside the pod networks (the policy requires them).
    if policy.trust_annotation and not pod_ips and not status.get("podIP"):
        ann = meta.get("annotations")
        text = ann.get(AWS_POD_IPS_ANNOTATION) if isinstance(ann, Mapping) else None
        if text:
            path = f"metadata.annotations[{AWS_POD_IPS_ANNOTATION}]"
            for part in str(text).split(","):
                if part.strip():
                    ip, reason, shown = check_pod_ip(part, policy)
                    if ip is not None:
                        ips.append(ip)
                    else:
                        rejected.append(RejectedIP(path, shown, reason))
    if len(ips) < 2:
        return tuple(ips)
    # Deduplicate, keep order (podIP duplicated in podIPs on some kubelets; a
    # mapped ::ffff:a.b.c.d next to a.b.c.d).
    return tuple(dict.fromkeys(ips))


@lru_cache(maxsize=4096)
def _shared(ports: tuple[ContainerPort, ...]) -> tuple[ContainerPort, ...]:
    """One tuple for equal port lists (the pods of a Deployment share them)."""
    return ports


def _container_ports(ctx: _Ctx, spec: Mapping[str, Any]) -> tuple[ContainerPort, ...]:
    ports: list[ContainerPort] = []
    for group in ("containers", "initContainers"):
        for ci, c in enumerate(_as_list(ctx, spec.get(group), f"spec.{group}")):
            if not isinstance(c, Mapping):
                raise ctx.err(f"spec.{group}[{ci}]", "must be a mapping")
            cports = c.get("ports")
            if not cports:
                continue
            for pi, p in enumerate(_as_list(ctx, cports, f"spec.{group}[{ci}].ports")):
                path = f"spec.{group}[{ci}].ports[{pi}]"
                p = _as_map(ctx, p, path)
                number = _port_number(ctx, p.get("containerPort"), f"{path}.containerPort")
                proto = _protocol(ctx, p.get("protocol"), f"{path}.protocol")
                name = p.get("name")
                if name is not None and name != "":
                    if not isinstance(name, str) or not _is_iana_svc_name(name):
                        raise ctx.err(f"{path}.name", f"{name!r} is not a valid port name (IANA_SVC_NAME)")
                else:
                    name = None
                ports.append(ContainerPort(number, proto, name))
    return tuple(ports)


def parse_pod(d: Mapping[str, Any], ip_policy: PodIPPolicy | None = None) -> Pod:
    """A Pod; its addresses pass ``ip_policy`` (default: no range, annotation untrusted)."""
    ctx, meta, ns, name = _meta("Pod", d, namespaced=True)
    policy = ip_policy if ip_policy is not None else _DEFAULT_POD_IP_POLICY
    rejected: list[RejectedIP] = []
    if not _is_dns_subdomain(name):
        raise ctx.err("metadata.name", f"{name!r} is not a DNS-1123 subdomain")
    spec = _as_map(ctx, d.get("spec"), "spec")
    status = _as_map(ctx, d.get("status"), "status")
    node = spec.get("nodeName")
    if node is not None and not isinstance(node, str):
        raise ctx.err("spec.nodeName", f"must be a string, not {node!r}")
    phase = status.get("phase")
    labels = _labels(ctx, meta.get("labels"), "metadata.labels")
    ips = _pod_ips(ctx, meta, status, policy, rejected)
    return Pod(
        namespace=_intern(ns),
        name=name,
        labels=labels,
        node_name=_intern(node) if node else None,
        ips=ips,
        ports=_shared(_container_ports(ctx, spec)),
        host_network=_bool(ctx, spec.get("hostNetwork"), "spec.hostNetwork"),
        phase=_intern(phase) if isinstance(phase, str) else "",
        uid=_str_field(meta, "uid"),
        resource_version=_str_field(meta, "resourceVersion"),
        rejected_ips=tuple(rejected),
    )


# --- NetworkPolicy ------------------------------------------------------------------


def _cidr(ctx: _Ctx, value: Any, path: str):
    if not isinstance(value, str) or "/" not in value:
        raise ctx.err(path, f"{value!r} is not a CIDR (address/prefix length)")
    try:
        # strict=False: host bits are masked off, see the module docstring.
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as exc:
        raise ctx.err(path, f"{value!r} is not a valid CIDR: {exc}") from None


def _ip_block(ctx: _Ctx, value: Any, path: str) -> IPBlock:
    m = _as_map(ctx, value, path)
    if "cidr" not in m:
        raise ctx.err(f"{path}.cidr", "is required")
    cidr = _cidr(ctx, m.get("cidr"), f"{path}.cidr")
    excepts = []
    for i, e in enumerate(_as_list(ctx, m.get("except"), f"{path}.except")):
        epath = f"{path}.except[{i}]"
        net = _cidr(ctx, e, epath)
        if net.version != cidr.version:
            raise ctx.err(epath, f"{e!r} is not the same IP family as cidr {cidr}")
        if not (net.subnet_of(cidr) and net.prefixlen > cidr.prefixlen):  # type: ignore[arg-type]
            raise ctx.err(epath, f"{e!r} must be strictly within cidr {cidr}")
        excepts.append(net)
    # Sorted and deduplicated: the order of except entries has no meaning.
    uniq = sorted(set(excepts), key=lambda n: (int(n.network_address), n.prefixlen))
    return IPBlock(cidr, tuple(uniq))


def _peer(ctx: _Ctx, value: Any, path: str) -> Peer:
    m = _as_map(ctx, value, path)
    has_pod = m.get("podSelector") is not None
    has_ns = m.get("namespaceSelector") is not None
    has_block = m.get("ipBlock") is not None
    if not (has_pod or has_ns or has_block):
        raise ctx.err(path, "must specify podSelector, namespaceSelector or ipBlock")
    if has_block and (has_pod or has_ns):
        raise ctx.err(path, "ipBlock may not be combined with podSelector or namespaceSelector")
    if has_block:
        return Peer(ip_block=_ip_block(ctx, m["ipBlock"], f"{path}.ipBlock"))
    return Peer(
        pod_selector=_selector(ctx, m["podSelector"], f"{path}.podSelector") if has_pod else None,
        namespace_selector=_selector(ctx, m["namespaceSelector"], f"{path}.namespaceSelector") if has_ns else None,
    )


def _policy_port(ctx: _Ctx, value: Any, path: str) -> PolicyPort:
    m = _as_map(ctx, value, path)
    proto = _protocol(ctx, m.get("protocol"), f"{path}.protocol")
    port = m.get("port")
    end = m.get("endPort")
    if port is None:
        if end is not None:
            raise ctx.err(f"{path}.endPort", "may not be specified when port is not specified")
        return PolicyPort(proto)
    if isinstance(port, str):
        if not _is_iana_svc_name(port):
            raise ctx.err(f"{path}.port", f"{port!r} is not a port number or a valid port name (IANA_SVC_NAME)")
        if end is not None:
            raise ctx.err(f"{path}.endPort", f"may not be specified with the named port {port!r}")
        return PolicyPort(proto, port)
    number = _port_number(ctx, port, f"{path}.port")
    if end is None:
        return PolicyPort(proto, number)
    end_number = _port_number(ctx, end, f"{path}.endPort")
    if end_number < number:
        raise ctx.err(f"{path}.endPort", f"endPort {end_number} is below port {number}")
    return PolicyPort(proto, number, end_number)


def _rules(ctx: _Ctx, value: Any, path: str, peers_key: str) -> tuple[Rule, ...]:
    out = []
    for i, r in enumerate(_as_list(ctx, value, path)):
        rpath = f"{path}[{i}]"
        r = _as_map(ctx, r, rpath)
        ports = tuple(
            _policy_port(ctx, p, f"{rpath}.ports[{j}]")
            for j, p in enumerate(_as_list(ctx, r.get("ports"), f"{rpath}.ports"))
        )
        peers = tuple(
            _peer(ctx, p, f"{rpath}.{peers_key}[{j}]")
            for j, p in enumerate(_as_list(ctx, r.get(peers_key), f"{rpath}.{peers_key}"))
        )
        out.append(Rule(ports, peers))
    return tuple(out)


def parse_network_policy(d: Mapping[str, Any]) -> NetworkPolicy:
    ctx, meta, ns, name = _meta("NetworkPolicy", d, namespaced=True)
    if not _is_dns_subdomain(name):
        raise ctx.err("metadata.name", f"{name!r} is not a DNS-1123 subdomain")
    spec = _as_map(ctx, d.get("spec"), "spec")
    selector = _selector(ctx, spec.get("podSelector"), "spec.podSelector")
    ingress = _rules(ctx, spec.get("ingress"), "spec.ingress", "from")
    egress = _rules(ctx, spec.get("egress"), "spec.egress", "to")
    raw_types = _as_list(ctx, spec.get("policyTypes"), "spec.policyTypes")
    types: set[PolicyType] = set()
    for i, t in enumerate(raw_types):
        pt = _POLICY_TYPES.get(t) if isinstance(t, str) else None
        if pt is None:
            raise ctx.err(f"spec.policyTypes[{i}]", f"invalid policy type {t!r} (Ingress, Egress)")
        types.add(pt)
    if not types:
        # SetDefaults_NetworkPolicy: Ingress always, Egress if there are egress rules.
        types.add(PolicyType.INGRESS)
        if egress:
            types.add(PolicyType.EGRESS)
    return NetworkPolicy(
        namespace=ns,
        name=name,
        pod_selector=selector,
        policy_types=tuple(t for t in (PolicyType.INGRESS, PolicyType.EGRESS) if t in types),
        ingress=ingress,
        egress=egress,
        resource_version=_str_field(meta, "resourceVersion"),
    )


# --- NetworkPolicy fallback ---------------------------------------------------------
#
# An object we cannot parse must never open what it isolated (docs/decisions/
# policy-fallback.md). The sources keep a last good version first; for an object
# that never had one, this is what is enforced instead, in this order:
#   a. it parses: the policy itself;
#   b. metadata, spec.podSelector (and policyTypes) parse: the same selector and
#      directions, NO allow rules: the pods it selects are isolated, allowed nothing;
#   c. the podSelector cannot be read: podSelector {} (the whole namespace), same;
#   d. namespace/name unusable: nothing can be keyed (None); the error is reported.
#      Never the case for an object from the API server, which validates both.
# Directions: a policyTypes that parses (non-empty) is taken as written. Absent or
# empty, the API's defaulting, conservatively: Ingress, plus Egress if the spec has
# an ``egress`` key at all (the API checks for rules; an unparseable egress list may
# hold some). Present but unreadable (a typo, a wrong type) or no readable spec:
# both directions, as such an object may name either.


def _fallback_types(spec: Any) -> tuple[PolicyType, ...]:
    both = (PolicyType.INGRESS, PolicyType.EGRESS)
    if not isinstance(spec, Mapping):
        return both
    raw = spec.get("policyTypes")
    if raw is None or raw == []:
        return both if "egress" in spec else (PolicyType.INGRESS,)
    if not isinstance(raw, list):
        return both
    types = set()
    for t in raw:
        pt = _POLICY_TYPES.get(t) if isinstance(t, str) else None
        if pt is None:
            return both
        types.add(pt)
    return tuple(t for t in both if t in types)


def _reason(error: BaseException) -> str:
    if isinstance(error, ModelError):
        return f"{error.field_path}: {error.message}" if error.field_path else error.message
    return f"{type(error).__name__}: {error}"


def fallback_network_policy(d: Any, error: BaseException) -> NetworkPolicy | None:
    """The no-allow stand-in for a NetworkPolicy dict that failed to parse with ``error``
    (cases b, c, d above); None when it cannot be keyed by namespace/name."""
    try:
        ctx, meta, ns, name = _meta("NetworkPolicy", d, namespaced=True)
    except ModelError:
        return None
    if not _is_dns_subdomain(name):
        return None
    spec = d.get("spec")
    reason = _reason(error)
    try:
        if spec is not None and not isinstance(spec, Mapping):
            raise ctx.err("spec", f"must be a mapping, not {type(spec).__name__}")
        selector = _selector(ctx, (spec or {}).get("podSelector"), "spec.podSelector")
    except ModelError as exc:
        selector = MATCH_ALL
        if exc.field_path != getattr(error, "field_path", None):
            reason += f"; {_reason(exc)}"
        reason += " (podSelector unreadable: isolating the whole namespace)"
    return NetworkPolicy(
        namespace=ns,
        name=name,
        pod_selector=selector,
        policy_types=_fallback_types(spec if spec is not None else {}),
        resource_version=_str_field(meta, "resourceVersion"),
        fallback_reason=reason,
    )


def parse_network_policy_or_fallback(d: Any) -> tuple[NetworkPolicy | None, ModelError | None]:
    """(policy, None) when ``d`` parses; else (fallback or None, the error). See above."""
    try:
        return parse_network_policy(d), None
    except ModelError as err:
        return fallback_network_policy(d, err), err


# A label value no selector can name (selector values are validated): stands for a
# value we could not read.
UNREADABLE_LABEL_VALUE = "<unreadable>"


def fallback_namespace(d: Any) -> Namespace | None:
    """A Namespace whose labels failed to parse, matched as the object itself would be.

    Dropping it would not do: a pod whose Namespace is unknown is matched with the
    name label only, so a ``NotIn``/``DoesNotExist`` namespaceSelector that the real
    labels fail would match (wider). Instead: valid labels as written; a valid key
    with an invalid value gets UNREADABLE_LABEL_VALUE (which, like the real value,
    no selector can name: In false, NotIn/Exists true); an invalid key is left out
    (no selector can name it either). None when the name is unusable or the labels
    are not a mapping at all (then nothing is known; see the decision doc).
    """
    try:
        _ctx, meta, _, name = _meta("Namespace", d, namespaced=False)
    except ModelError:
        return None
    raw = meta.get("labels")
    if not _is_dns_label(name) or (raw is not None and not isinstance(raw, Mapping)):
        return None
    labels: dict[str, str] = {}
    for k, v in (raw or {}).items():
        if _label_key_problem(k) is None:
            labels[k] = v if _label_value_problem(v) is None else UNREADABLE_LABEL_VALUE
    labels[NAMESPACE_NAME_LABEL] = name
    return Namespace(name=name, labels=Labels(labels), resource_version=_str_field(meta, "resourceVersion"))


# --- ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) --------------------------
#
# Validation follows the CRD schema of apis/v1alpha2/clusternetworkpolicy_types.go
# (docs/decisions/cluster-network-policy.md): what the API server would reject we
# reject, naming the field; what it accepts we accept. Two places where the API asks
# the implementation to decide:
# - a peer that sets no field we know (a newer CRD with a new peer type) is kept as
#   kind "unknown" and enforced fail-closed (Accept: matches nothing; Deny/Pass: the
#   whole rule denies everything), as the API's peer documentation says;
# - ``networks`` CIDRs with host bits set are normalised (strict=False), as ipBlock.

CNP_API_VERSION = "policy.networking.k8s.io/v1alpha2"
CNP_MAX_RULES = 25  # ingress/egress rules per policy; peers, protocols, networks per rule
CNP_MAX_PRIORITY = 1000
CNP_RULE_NAME_MAX = 100
_TIERS = {t.value: t for t in CNPTier}
_ACTIONS = {a.value: a for a in CNPAction}
_DOMAIN_RE = re.compile(
    r"^(\*\.)?([a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.)+[a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.?$"
)


def _bounded_list(ctx: _Ctx, value: Any, path: str, required: bool, limit: int = CNP_MAX_RULES) -> list[Any]:
    """A list with MinItems=1 (when present or required) and MaxItems=limit."""
    if value is None:
        if required:
            raise ctx.err(path, "is required (at least one item)")
        return []
    items = _as_list(ctx, value, path)
    if not items:
        raise ctx.err(path, "must have at least one item" if required else "must have at least one item, or be left out")
    if len(items) > limit:
        raise ctx.err(path, f"has {len(items)} items, at most {limit} are allowed")
    return items


def _one_of(ctx: _Ctx, m: Mapping[str, Any], path: str, known: tuple[str, ...]) -> list[str]:
    """The known keys set (non-null) in m; more than one is an error (MaxProperties=1)."""
    present = [k for k in known if m.get(k) is not None]
    if len(present) > 1:
        raise ctx.err(path, f"exactly one of {', '.join(known)} may be set, not {', '.join(present)}")
    return present


def _namespaced_pod(ctx: _Ctx, value: Any, path: str) -> tuple[LabelSelector, LabelSelector]:
    m = _as_map(ctx, value, path)
    if m.get("podSelector") is None:
        raise ctx.err(f"{path}.podSelector", "is required ({} selects every pod)")
    ns_sel = _selector(ctx, m.get("namespaceSelector"), f"{path}.namespaceSelector")
    return ns_sel, _selector(ctx, m["podSelector"], f"{path}.podSelector")


def _cnp_destination_port(ctx: _Ctx, value: Any, path: str) -> tuple[int, int]:
    m = _as_map(ctx, value, path)
    present = _one_of(ctx, m, path, ("number", "range"))
    if not present:
        raise ctx.err(path, "must set number or range")
    if present[0] == "number":
        n = _port_number(ctx, m["number"], f"{path}.number")
        return n, n
    r = _as_map(ctx, m["range"], f"{path}.range")
    for k in ("start", "end"):
        if r.get(k) is None:
            raise ctx.err(f"{path}.range.{k}", "is required")
    start = _port_number(ctx, r["start"], f"{path}.range.start")
    end = _port_number(ctx, r["end"], f"{path}.range.end")
    if not start < end:
        raise ctx.err(f"{path}.range", f"start {start} must be less than end {end}")
    return start, end


def _cnp_port(ctx: _Ctx, value: Any, path: str) -> CNPPort:
    m = _as_map(ctx, value, path)
    present = _one_of(ctx, m, path, ("tcp", "udp", "sctp", "destinationNamedPort"))
    if not present:
        raise ctx.err(path, "must set one of tcp, udp, sctp, destinationNamedPort")
    key = present[0]
    if key == "destinationNamedPort":
        name = m[key]
        if not isinstance(name, str) or not name:
            raise ctx.err(f"{path}.destinationNamedPort", f"must be a non-empty string, not {name!r}")
        return CNPPort(named_port=name)
    proto = _PROTOCOLS[key.upper()]
    inner = _as_map(ctx, m[key], f"{path}.{key}")
    if inner.get("destinationPort") is None:
        raise ctx.err(f"{path}.{key}.destinationPort", "is required (the CRD needs at least one property)")
    start, end = _cnp_destination_port(ctx, inner["destinationPort"], f"{path}.{key}.destinationPort")
    return CNPPort(proto, start, end)


def _cnp_peer(ctx: _Ctx, value: Any, path: str, egress: bool) -> CNPPeer:
    m = _as_map(ctx, value, path)
    known = ("namespaces", "pods", "nodes", "networks", "domainNames") if egress else ("namespaces", "pods")
    present = _one_of(ctx, m, path, known)
    if not present:
        # A peer type we do not know (a newer CRD): the API says fail closed.
        return CNPPeer("unknown")
    kind = present[0]
    if kind == "namespaces":
        return CNPPeer(kind, namespace_selector=_selector(ctx, m[kind], f"{path}.namespaces"))
    if kind == "pods":
        ns_sel, pod_sel = _namespaced_pod(ctx, m[kind], f"{path}.pods")
        return CNPPeer(kind, namespace_selector=ns_sel, pod_selector=pod_sel)
    if kind == "nodes":
        return CNPPeer(kind, node_selector=_selector(ctx, m[kind], f"{path}.nodes"))
    if kind == "networks":
        nets = []
        for i, c in enumerate(_bounded_list(ctx, m[kind], f"{path}.networks", required=True)):
            if isinstance(c, str) and len(c) > 43:
                raise ctx.err(f"{path}.networks[{i}]", "is longer than 43 characters")
            nets.append(_cidr(ctx, c, f"{path}.networks[{i}]"))
        # A set: order carries no meaning; equal after normalisation = one entry.
        uniq = sorted(set(nets), key=lambda n: (n.version, int(n.network_address), n.prefixlen))
        return CNPPeer(kind, networks=tuple(uniq))
    names = []
    for i, d in enumerate(_bounded_list(ctx, m[kind], f"{path}.domainNames", required=True)):
        if not isinstance(d, str) or not _DOMAIN_RE.match(d):
            raise ctx.err(f"{path}.domainNames[{i}]", f"{d!r} is not a domain name (an optional '*.' prefix only)")
        names.append(d)
    return CNPPeer(kind, domain_names=tuple(sorted(set(names))))


def _cnp_rules(ctx: _Ctx, value: Any, path: str, egress: bool) -> tuple[CNPRule, ...]:
    out = []
    peers_key = "to" if egress else "from"
    for i, r in enumerate(_bounded_list(ctx, value, path, required=False)):
        rpath = f"{path}[{i}]"
        r = _as_map(ctx, r, rpath)
        name = r.get("name") or ""
        if not isinstance(name, str):
            raise ctx.err(f"{rpath}.name", f"must be a string, not {type(name).__name__}")
        if len(name) > CNP_RULE_NAME_MAX:
            raise ctx.err(f"{rpath}.name", f"is {len(name)} characters long, at most {CNP_RULE_NAME_MAX}")
        action_text = r.get("action")
        action = _ACTIONS.get(action_text) if isinstance(action_text, str) else None
        if action is None:
            raise ctx.err(f"{rpath}.action", f"must be Accept, Deny or Pass, not {action_text!r}")
        peers = tuple(
            _cnp_peer(ctx, p, f"{rpath}.{peers_key}[{j}]", egress)
            for j, p in enumerate(_bounded_list(ctx, r.get(peers_key), f"{rpath}.{peers_key}", required=True))
        )
        ports = tuple(
            _cnp_port(ctx, p, f"{rpath}.protocols[{j}]")
            for j, p in enumerate(_bounded_list(ctx, r.get("protocols"), f"{rpath}.protocols", required=False))
        )
        if egress and any(p.named_port for p in ports) and any(
            p.kind in ("networks", "nodes", "domainNames") for p in peers
        ):
            raise ctx.err(
                f"{rpath}",
                "networks/nodes/domainNames peer cannot be set with destinationNamedPort "
                "since there are no named ports for networks/nodes/domainNames",
            )
        out.append(CNPRule(action, name, peers, ports))
    return tuple(out)


def parse_cluster_network_policy(d: Mapping[str, Any]) -> ClusterNetworkPolicy:
    ctx, meta, _, name = _meta("ClusterNetworkPolicy", d, namespaced=False)
    if not _is_dns_subdomain(name):
        raise ctx.err("metadata.name", f"{name!r} is not a DNS-1123 subdomain")
    spec = _as_map(ctx, d.get("spec"), "spec")
    if not spec:
        raise ctx.err("spec", "is required")
    tier_text = spec.get("tier")
    tier = _TIERS.get(tier_text) if isinstance(tier_text, str) else None
    if tier is None:
        raise ctx.err("spec.tier", f"must be Admin or Baseline, not {tier_text!r}")
    prio = spec.get("priority")
    if isinstance(prio, bool) or not isinstance(prio, int):
        raise ctx.err("spec.priority", f"must be an integer 0-{CNP_MAX_PRIORITY}, not {prio!r}")
    if not 0 <= prio <= CNP_MAX_PRIORITY:
        raise ctx.err("spec.priority", f"{prio} is out of range 0-{CNP_MAX_PRIORITY}")
    subject = _as_map(ctx, spec.get("subject"), "spec.subject")
    present = _one_of(ctx, subject, "spec.subject", ("namespaces", "pods"))
    if not present:
        raise ctx.err("spec.subject", "must set namespaces or pods")
    if present[0] == "namespaces":
        subj_ns, subj_pods = _selector(ctx, subject["namespaces"], "spec.subject.namespaces"), MATCH_ALL
    else:
        subj_ns, subj_pods = _namespaced_pod(ctx, subject["pods"], "spec.subject.pods")
    return ClusterNetworkPolicy(
        name=name,
        tier=tier,
        priority=prio,
        subject_namespaces=subj_ns,
        subject_pods=subj_pods,
        ingress=_cnp_rules(ctx, spec.get("ingress"), "spec.ingress", egress=False),
        egress=_cnp_rules(ctx, spec.get("egress"), "spec.egress", egress=True),
        resource_version=_str_field(meta, "resourceVersion"),
    )


# --- ClusterNetworkPolicy fallback ------------------------------------------------------
#
# An admin Deny that fails to parse must not open what it denied (docs/decisions/
# cnp-fallback.md). The sources keep a last good version first (same metadata.uid);
# for an object that never parsed this is enforced instead, never wider than the
# object itself, whatever its unreadable parts hold:
# - tier, priority and subject as read; an unreadable tier is Admin at priority -1
#   (before every written policy: an Admin Pass must not be able to skip it), an
#   unreadable priority 0 (never later than the object's real place: same name, ties
#   by name), an unreadable selector of the subject selects everything (so the
#   subject can only grow). Moving a Deny all earlier never widens;
# - per direction (ingress, egress): no key = no rules (as the object); the rules as
#   written when they parse AND tier, priority and subject were read exactly (a
#   direction is evaluated independently of the other); rules that are all readable
#   Accepts = no rules (removing an Accept from a first-match list never widens);
#   otherwise one rule "Deny all" (peer kind "unknown": the API's own fail-closed
#   form), which never accepts anything, in either tier;
# - no readable spec at all: both directions Deny all, Admin, priority 0, every pod;
# - metadata.name unusable: nothing can be keyed (None). Never from the API server.

# Priority of a stand-in whose tier is unreadable: evaluated before every written policy.
CNP_STANDIN_FIRST = -1


def _cnp_standin_rule() -> CNPRule:
    return CNPRule(CNPAction.DENY, CNP_STANDIN_RULE_NAME, (CNPPeer("unknown"),))


def _all_accept(rules: Any) -> bool:
    return isinstance(rules, list) and bool(rules) and all(
        isinstance(r, Mapping) and r.get("action") == CNPAction.ACCEPT.value for r in rules
    )


def fallback_cluster_network_policy(d: Any, error: BaseException) -> ClusterNetworkPolicy | None:
    """The fail-closed stand-in for a ClusterNetworkPolicy dict that failed to parse with
    ``error`` (rules above); None when it cannot be keyed by name."""
    try:
        ctx, meta, _, name = _meta("ClusterNetworkPolicy", d, namespaced=False)
    except ModelError:
        return None
    if not _is_dns_subdomain(name):
        return None
    raw = d.get("spec")
    spec: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    notes: list[str] = []
    exact = True
    tier = _TIERS.get(spec.get("tier")) if isinstance(spec.get("tier"), str) else None
    prio = spec.get("priority")
    if tier is None:
        # Admin at its own priority is not enough: an Admin Pass evaluated before it would
        # skip it, and a Baseline Deny it stood for would then be missing. Ahead of every
        # written policy (-1; the API allows 0-1000) nothing can skip it.
        tier, prio, exact = CNPTier.ADMIN, CNP_STANDIN_FIRST, False
        notes.append(f"tier unreadable: Admin, priority {CNP_STANDIN_FIRST} (before every policy)")
    elif isinstance(prio, bool) or not isinstance(prio, int) or not 0 <= prio <= CNP_MAX_PRIORITY:
        # 0 with the same name: never later than the object's real place in its tier.
        prio, exact = 0, False
        notes.append("priority unreadable: 0")
    subj_ns, subj_pods = MATCH_ALL, MATCH_ALL
    subject = spec.get("subject")
    kinds = [k for k in ("namespaces", "pods") if isinstance(subject, Mapping) and subject.get(k) is not None]
    if len(kinds) != 1:
        exact = False
        notes.append("subject unreadable: every pod")
    elif kinds[0] == "namespaces":
        try:
            subj_ns = _selector(ctx, subject["namespaces"], "spec.subject.namespaces")
        except ModelError:
            exact = False
            notes.append("subject namespaces selector unreadable: every pod")
    elif not isinstance(subject["pods"], Mapping):
        exact = False
        notes.append("subject pods unreadable: every pod")
    else:
        pods = subject["pods"]
        try:
            subj_ns = _selector(ctx, pods.get("namespaceSelector"), "spec.subject.pods.namespaceSelector")
        except ModelError:
            exact = False
            notes.append("subject namespaceSelector unreadable: every namespace")
        try:
            if pods.get("podSelector") is None:
                raise ctx.err("spec.subject.pods.podSelector", "is required")
            subj_pods = _selector(ctx, pods["podSelector"], "spec.subject.pods.podSelector")
        except ModelError:
            exact = False
            notes.append("subject podSelector unreadable: every pod of those namespaces")
    rules: dict[str, tuple[CNPRule, ...]] = {}
    for direction in ("ingress", "egress"):
        if not isinstance(raw, Mapping):
            rules[direction] = (_cnp_standin_rule(),)  # nothing readable: either direction may be named
            continue
        if direction not in spec:
            rules[direction] = ()
            continue
        if exact:
            try:
                rules[direction] = _cnp_rules(ctx, spec[direction], f"spec.{direction}", egress=direction == "egress")
                continue
            except ModelError:
                pass
        if _all_accept(spec[direction]):
            rules[direction] = ()
            notes.append(f"{direction}: Accept rules only, not enforced")
        else:
            rules[direction] = (_cnp_standin_rule(),)
    reason = _reason(error) + (f" ({'; '.join(notes)})" if notes else "")
    return ClusterNetworkPolicy(
        name=name,
        tier=tier,
        priority=prio,
        subject_namespaces=subj_ns,
        subject_pods=subj_pods,
        ingress=rules["ingress"],
        egress=rules["egress"],
        resource_version=_str_field(meta, "resourceVersion"),
        fallback_reason=reason,
    )


def parse_cluster_network_policy_or_fallback(d: Any) -> tuple[ClusterNetworkPolicy | None, ModelError | None]:
    """(policy, None) when ``d`` parses; else (stand-in or None, the error). See above."""
    try:
        return parse_cluster_network_policy(d), None
    except ModelError as err:
        return fallback_cluster_network_policy(d, err), err


def describe_cnp_fallback(cnp: ClusterNetworkPolicy) -> str:
    """What a stand-in enforces, for logs, Events and status: tier, priority, subject, directions."""
    dirs = [d for d in ("ingress", "egress") if any(r.name == CNP_STANDIN_RULE_NAME for r in cnp.rules(d))]
    kept = [d for d in ("ingress", "egress") if cnp.rules(d) and d not in dirs]
    subject = (f"namespaces {cnp.subject_namespaces.canonical()} pods {cnp.subject_pods.canonical()}")
    out = (f"{cnp.tier.value} tier priority {cnp.priority}: "
           + (f"Deny all {'+'.join(dirs)} for {subject}" if dirs else "denies nothing"))
    if kept:
        out += f"; {'+'.join(kept)} rules as written"
    return out


# --- Node (v1): labels and status.addresses only ------------------------------------


def parse_node(d: Mapping[str, Any]) -> Node:
    """A v1 Node as a ``nodes`` peer sees it. Addresses of any type that are IPs
    (InternalIP, ExternalIP); Hostname/InternalDNS entries are names and are skipped."""
    ctx, meta, _, name = _meta("Node", d, namespaced=False)
    if not _is_dns_subdomain(name):
        raise ctx.err("metadata.name", f"{name!r} is not a DNS-1123 subdomain")
    labels = _labels(ctx, meta.get("labels"), "metadata.labels")
    status = _as_map(ctx, d.get("status"), "status")
    addrs: list[IPAddress] = []
    for i, a in enumerate(_as_list(ctx, status.get("addresses"), "status.addresses")):
        a = _as_map(ctx, a, f"status.addresses[{i}]")
        text = a.get("address")
        if not isinstance(text, str):
            raise ctx.err(f"status.addresses[{i}].address", f"must be a string, not {text!r}")
        try:
            ip = ipaddress.ip_address(text.strip())
        except ValueError:
            continue  # a host name (type Hostname, InternalDNS, ExternalDNS)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip not in addrs:
            addrs.append(ip)
    return Node(name, labels, tuple(addrs), _str_field(meta, "resourceVersion"))


# --- dispatch -----------------------------------------------------------------------

# kind -> (accepted apiVersions, parser)
_PARSERS: dict[str, tuple[frozenset[str], Callable[[Mapping[str, Any]], Any]]] = {
    "Namespace": (frozenset({"v1"}), parse_namespace),
    "Pod": (frozenset({"v1"}), parse_pod),
    "NetworkPolicy": (frozenset({"networking.k8s.io/v1"}), parse_network_policy),
    "ClusterNetworkPolicy": (frozenset({CNP_API_VERSION}), parse_cluster_network_policy),
    "Node": (frozenset({"v1"}), parse_node),
}


def _ref_of(d: Mapping[str, Any]) -> str:
    meta = d.get("metadata")
    if not isinstance(meta, Mapping):
        return "<unnamed>"
    name = meta.get("name") or "<unnamed>"
    ns = meta.get("namespace")
    return f"{ns}/{name}" if ns else str(name)


def parse_object(d: Any, ignore_unknown: bool = False, pod_ip_policy: PodIPPolicy | None = None):
    """One API object -> model value, by kind/apiVersion (Pods under ``pod_ip_policy``).

    Unknown kinds raise ModelError, or return None with ``ignore_unknown``. A
    missing apiVersion is accepted (typed list items often lack it); a wrong one
    for a known kind (e.g. NetworkPolicy extensions/v1beta1) is an error.
    """
    if not isinstance(d, Mapping):
        raise ModelError("object", "?", "", f"must be a mapping, not {type(d).__name__}")
    kind = d.get("kind")
    entry = _PARSERS.get(kind) if isinstance(kind, str) else None
    if entry is None:
        if ignore_unknown:
            return None
        raise ModelError(
            str(kind or "object"), _ref_of(d), "kind", f"unsupported kind {kind!r} (Namespace, Pod, NetworkPolicy, ClusterNetworkPolicy, Node)"
        )
    versions, parser = entry
    api_version = d.get("apiVersion")
    if api_version is not None and api_version not in versions:
        raise ModelError(
            kind,
            _ref_of(d),
            "apiVersion",
            f"unsupported apiVersion {api_version!r} for {kind} ({', '.join(sorted(versions))})",
        )
    if parser is parse_pod:
        return parse_pod(d, pod_ip_policy)
    return parser(d)


def _expand(doc: Any) -> Iterable[Any]:
    """Flatten ``kind: List`` / ``<Kind>List`` documents (items may omit their kind)."""
    if isinstance(doc, Mapping):
        kind = doc.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and "items" in doc:
            item_kind = kind[: -len("List")] or None
            for item in doc.get("items") or []:
                if isinstance(item, Mapping) and item_kind and "kind" not in item:
                    item = {**item, "kind": item_kind}
                yield from _expand(item)
            return
    yield doc


def parse_objects(
    docs: Iterable[Any], ignore_unknown: bool = False, keep_going: bool = False, fallbacks: bool = False,
    pod_ip_policy: PodIPPolicy | None = None,
) -> tuple[list, list[ModelError]]:
    """Parse decoded documents (lists flattened); return (objects, errors).

    Without keep_going the first error is raised; with it, bad objects are
    collected and the rest still parse. With fallbacks (and keep_going) a
    NetworkPolicy, ClusterNetworkPolicy or Namespace that fails is reported AND its
    stand-in, if any, is among the objects (fallback_network_policy and
    fallback_cluster_network_policy, marked by ``fallback_reason``; fallback_namespace).
    """
    objects: list = []
    errors: list[ModelError] = []
    for doc in docs:
        if doc is None:
            continue  # empty YAML document ("---" at the end)
        for d in _expand(doc):
            try:
                obj = parse_object(d, ignore_unknown=ignore_unknown, pod_ip_policy=pod_ip_policy)
            except ModelError as exc:
                if not keep_going:
                    raise
                errors.append(exc)
                # Not for a wrong kind/apiVersion: that is not a v1 NetworkPolicy at all.
                if fallbacks and exc.field_path not in ("kind", "apiVersion"):
                    fb: Any = None
                    if exc.kind == "NetworkPolicy":
                        fb = fallback_network_policy(d, exc)
                    elif exc.kind == "ClusterNetworkPolicy":
                        fb = fallback_cluster_network_policy(d, exc)
                    elif exc.kind == "Namespace":
                        fb = fallback_namespace(d)
                    if fb is not None:
                        objects.append(fb)
                continue
            if obj is not None:
                objects.append(obj)
    return objects, errors


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_all(text: str, source: str) -> list[Any]:
    try:
        return list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        raise SourcedModelError(source, ModelError("YAML", source, "", f"cannot parse: {exc}")) from None


def load_yaml_keep_going(
    text: str, source: str = "<file>", ignore_unknown: bool = False, fallbacks: bool = False,
    pod_ip_policy: PodIPPolicy | None = None,
) -> tuple[list, list[SourcedModelError]]:
    """Like load_yaml, but collects every bad object and keeps the good ones
    (and, with fallbacks, the stand-ins of bad NetworkPolicies and Namespaces: parse_objects).

    A YAML syntax error still loses the whole file (there is no reliable way to
    resync a broken stream) and is returned as the single error.
    """
    try:
        docs = _load_all(text, source)
    except SourcedModelError as exc:
        return [], [exc]
    objects: list = []
    errors: list[SourcedModelError] = []
    for n, doc in enumerate(docs, start=1):
        objs, errs = parse_objects(
            [doc], ignore_unknown=ignore_unknown, keep_going=True, fallbacks=fallbacks, pod_ip_policy=pod_ip_policy
        )
        objects.extend(objs)
        errors.extend(SourcedModelError(source, e, n if len(docs) > 1 else None) for e in errs)
    return objects, errors


def load_yaml(
    text: str, source: str = "<file>", ignore_unknown: bool = False, pod_ip_policy: PodIPPolicy | None = None
) -> list:
    """Multi-document YAML (or JSON) -> model values. Raises SourcedModelError (a ModelError)."""
    docs = _load_all(text, source)
    objects: list = []
    for n, doc in enumerate(docs, start=1):
        try:
            objs, _ = parse_objects([doc], ignore_unknown=ignore_unknown, pod_ip_policy=pod_ip_policy)
        except ModelError as exc:
            raise SourcedModelError(source, exc, n if len(docs) > 1 else None) from None
        objects.extend(objs)
    return objects
