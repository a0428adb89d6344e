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

Trust note on pod IPs: ``status.podIPs``/``status.podIP`` are written by the
kubelet (node credentials). The AWS VPC CNI annotation
``vpc.amazonaws.com/pod-ips`` is only a fallback while status has no IP yet, and
it is user-writable: anyone who may update the pod's metadata can put any
address there. It is therefore never consulted (not even parsed) once status
reports an IP, and on this node the CNI endpoint record overrides both (see
policy_agent.store). A forged annotation can at most misdescribe a pod that has
no status IP yet, for peers' ipsets.

Hot path note: 10,000 pods go through ``parse_pod`` on a relist, so regexes are
compiled once at import and the common case does no extra allocation.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable, Iterable, Mapping

import yaml

from policy_agent.model.types import (
    EMPTY_LABELS,
    MATCH_ALL,
    NAMESPACE_NAME_LABEL,
    ContainerPort,
    IPBlock,
    Labels,
    LabelSelector,
    ModelError,
    Namespace,
    NetworkPolicy,
    Operator,
    Peer,
    Pod,
    PolicyPort,
    PolicyType,
    Protocol,
    Requirement,
    Rule,
)

__all__ = [
    "AWS_POD_IPS_ANNOTATION",
    "SourcedModelError",
    "load_yaml",
    "load_yaml_keep_going",
    "parse_labels",
    "parse_namespace",
    "parse_network_policy",
    "parse_object",
    "parse_objects",
    "parse_pod",
    "parse_selector",
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
    return Labels(m)


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


def _ip(ctx: _Ctx, value: Any, path: str):
    if not isinstance(value, str):
        raise ctx.err(path, f"must be an IP address string, not {value!r}")
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise ctx.err(path, f"{value!r} is not a valid IP address") from None


def _pod_ips(ctx: _Ctx, meta: Mapping[str, Any], status: Mapping[str, Any]) -> tuple:
    ips: list = []
    pod_ips = _as_list(ctx, status.get("podIPs"), "status.podIPs")
    for i, entry in enumerate(pod_ips):
        path = f"status.podIPs[{i}]"
        entry = _as_map(ctx, entry, path)
        ips.append(_ip(ctx, entry.get("ip"), f"{path}.ip"))
    if not ips and status.get("podIP"):
        ips.append(_ip(ctx, status.get("podIP"), "status.podIP"))
    if not ips:  # only now: the annotation is user-writable (module docstring)
        ann = meta.get("annotations")
        text = ann.get(AWS_POD_IPS_ANNOTATION) if isinstance(ann, Mapping) else None
        if text:
            path = f"metadata.annotations[{AWS_POD_IPS_ANNOTATION}]"
            for part in str(text).split(","):
                if part.strip():
                    ips.append(_ip(ctx, part, path))
    # Deduplicate, keep order (podIP duplicated in podIPs on some kubelets).
    seen = set()
    out = []
    for ip in ips:
        if ip not in seen:
            seen.add(ip)
            out.append(ip)
    return tuple(out)


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


def parse_pod(d: Mapping[str, Any]) -> Pod:
    ctx, meta, ns, name = _meta("Pod", d, namespaced=True)
    if not _is_dns_subdomain(name):
        raise ctx.err("metadata.name", f"{name!r} is not a DNS-1123 subdomain")
    spec = _as_map(ctx, d.get("spec"), "spec")
    status = _as_map(ctx, d.get("status"), "status")
    node = spec.get("nodeName")
    if node is not None and not isinstance(node, str):
        raise ctx.err("spec.nodeName", f"must be a string, not {node!r}")
    phase = status.get("phase")
    return Pod(
        namespace=ns,
        name=name,
        labels=_labels(ctx, meta.get("labels"), "metadata.labels"),
        node_name=node or None,
        ips=_pod_ips(ctx, meta, status),
        ports=_container_ports(ctx, spec),
        host_network=_bool(ctx, spec.get("hostNetwork"), "spec.hostNetwork"),
        phase=phase if isinstance(phase, str) else "",
        uid=_str_field(meta, "uid"),
        resource_version=_str_field(meta, "resourceVersion"),
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


# --- dispatch -----------------------------------------------------------------------

# kind -> (accepted apiVersions, parser)
_PARSERS: dict[str, tuple[frozenset[str], Callable[[Mapping[str, Any]], Any]]] = {
    "Namespace": (frozenset({"v1"}), parse_namespace),
    "Pod": (frozenset({"v1"}), parse_pod),
    "NetworkPolicy": (frozenset({"networking.k8s.io/v1"}), parse_network_policy),
}


def _ref_of(d: Mapping[str, Any]) -> str:
    meta = d.get("metadata")
    if not isinstance(meta, Mapping):
        return "<unnamed>"
    name = meta.get("name") or "<unnamed>"
    ns = meta.get("namespace")
    return f"{ns}/{name}" if ns else str(name)


def parse_object(d: Any, ignore_unknown: bool = False):
    """One API object -> model value, by kind/apiVersion.

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
            str(kind or "object"), _ref_of(d), "kind", f"unsupported kind {kind!r} (Namespace, Pod, NetworkPolicy)"
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
    docs: Iterable[Any], ignore_unknown: bool = False, keep_going: bool = False
) -> tuple[list, list[ModelError]]:
    """Parse decoded documents (lists flattened); return (objects, errors).

    Without keep_going the first error is raised; with it, bad objects are
    collected and the rest still parse.
    """
    objects: list = []
    errors: list[ModelError] = []
    for doc in docs:
        if doc is None:
            continue  # empty YAML document ("---" at the end)
        for d in _expand(doc):
            try:
                obj = parse_object(d, ignore_unknown=ignore_unknown)
            except ModelError as exc:
                if not keep_going:
                    raise
                errors.append(exc)
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
    text: str, source: str = "<file>", ignore_unknown: bool = False
) -> tuple[list, list[SourcedModelError]]:
    """Like load_yaml, but collects every bad object and keeps the good ones.

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
        objs, errs = parse_objects([doc], ignore_unknown=ignore_unknown, keep_going=True)
        objects.extend(objs)
        errors.extend(SourcedModelError(source, e, n if len(docs) > 1 else None) for e in errs)
    return objects, errors


def load_yaml(text: str, source: str = "<file>", ignore_unknown: bool = False) -> list:
    """Multi-document YAML (or JSON) -> model values. Raises SourcedModelError (a ModelError)."""
    docs = _load_all(text, source)
    objects: list = []
    for n, doc in enumerate(docs, start=1):
        try:
            objs, _ = parse_objects([doc], ignore_unknown=ignore_unknown)
        except ModelError as exc:
            raise SourcedModelError(source, exc, n if len(docs) > 1 else None) from None
        objects.extend(objs)
    return objects
