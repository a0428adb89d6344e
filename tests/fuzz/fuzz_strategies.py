"""Structure-aware hypothesis strategies for Kubernetes API dicts (Namespaces, Pods,
NetworkPolicies) that look valid but push every edge.

A generated cluster has three parts:
- ``good``: objects the API server would accept and the agent must enforce, drawn
  from edge values that are *valid* (253-character names, 63-character label keys
  and values, prefixed keys, empty values, ports 1 and 65535, endPort == port,
  named ports, SCTP, /0 /32 /128 CIDRs, host bits set, IPv4-mapped IPv6, duplicate
  rules/peers/ports, empty selectors, every operator, 1,000-rule policies,
  pods with 0-3 addresses, host-network and finished pods, pods on this node and
  on another);
- ``poison``: a good object with one or two hostile mutations (port 0, endPort
  below port, invalid named ports, unicode label values, bad operators, except
  equal to or outside the cidr, ``010.0.0.0/8``, bad address classes in status
  and in the ``vpc.amazonaws.com/pod-ips`` annotation, another pod's or the node's
  address in that annotation, missing and extra fields, wrong types ...);
- ``late``: a default-deny policy added afterwards (the "later default-deny in
  another namespace" of issue 10), applied as a second transaction.

Every good pod's status addresses are unique and inside the lab pod networks
(10.233.0.0/16, fd00:233::/64); only annotations may repeat or forge them.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from hypothesis import strategies as st

NODE = "n1"  # the node the pipeline compiles for
OTHER_NODE = "n2"
NODE_IPS = {NODE: "10.233.0.250", OTHER_NODE: "10.233.1.250"}
POD_NETWORKS = ("10.233.0.0/16", "fd00:233::/64")
EXTERNAL_IPS = ("10.234.0.1", "192.0.2.10", "fd00:234::1", "2001:db8::10")

# --- names and labels -------------------------------------------------------------------

LONG_SUBDOMAIN = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
assert len(LONG_SUBDOMAIN) == 253
LONG_NAME = "p" * 253  # a DNS-1123 subdomain of maximal length (no per-label limit)
LONG_NS = "n" * 63  # a DNS-1123 label of maximal length
LONG_KEY = LONG_SUBDOMAIN + "/" + "k" * 63
LONG_VALUE = "v" * 63

NAMESPACES = ("x", "y", LONG_NS)
KEYS = ("app", "example.com/tier", LONG_KEY)
VALUES = ("a", "b", "", LONG_VALUE, "A-b_c.9")
NS_KEYS = ("team", "kubernetes.io/metadata.name")
PORT_NAMES = ("http", "dns", "a-b", "x" * 15)  # valid IANA_SVC_NAMEs, the last of maximal length
PROTOCOLS = ("TCP", "UDP", "SCTP")

BAD_VALUES: tuple[Any, ...] = ("ü", "a" * 64, "-a", "a b", "a/b", 1, True, ["a"])
BAD_KEYS: tuple[Any, ...] = ("/x", "a/", "bad key", "ü", "k" * 64, "-k", LONG_SUBDOMAIN + "x/k")
BAD_PORT_NAMES = ("80", "HTTP", "a--b", "-a", "a-", "x" * 16, "", "ü")
BAD_PORTS: tuple[Any, ...] = (0, -1, 65536, 1.5, "", True, None)
BAD_ADDRESSES = (
    "0.0.0.0", "::", "127.0.0.1", "::1", "224.0.0.1", "ff02::1", "169.254.1.1", "fe80::1",
    "255.255.255.255", "240.0.0.1",
)
GARBAGE_ADDRESSES = ("not-an-ip", "010.233.0.7", "10.233.0.7/32", "::ffff:10.233.0.7", " 10.233.0.9 ", "")


@functools.lru_cache(maxsize=None)
def labels_st(keys=KEYS, values=VALUES, max_size=3):
    return st.dictionaries(st.sampled_from(keys), st.sampled_from(values), max_size=max_size)


def _requirement_st(keys):
    return st.one_of(
        st.builds(
            lambda k, op, vs: {"key": k, "operator": op, "values": vs},
            st.sampled_from(keys),
            st.sampled_from(("In", "NotIn")),
            st.lists(st.sampled_from(VALUES), min_size=1, max_size=3),  # duplicates allowed
        ),
        st.builds(
            lambda k, op, form: {"key": k, "operator": op, **form},
            st.sampled_from(keys),
            st.sampled_from(("Exists", "DoesNotExist")),
            st.sampled_from(({}, {"values": []}, {"values": None})),
        ),
    )


@functools.lru_cache(maxsize=None)
def selector_st(keys=KEYS):
    """A valid metav1.LabelSelector: null, {}, matchLabels, matchExpressions or both."""
    return st.one_of(
        st.sampled_from((None, {}, {"matchLabels": {}}, {"matchExpressions": []}, {"matchLabels": None})),
        st.builds(lambda ml: {"matchLabels": ml}, labels_st(keys, max_size=2)),
        st.builds(
            lambda ml, me: {"matchLabels": ml, "matchExpressions": me},
            labels_st(keys, max_size=1),
            st.lists(_requirement_st(keys), max_size=2),
        ),
    )


@functools.lru_cache(maxsize=None)
def ns_selector_st():
    return st.one_of(
        selector_st(NS_KEYS),
        st.sampled_from(NAMESPACES).map(lambda n: {"matchLabels": {"kubernetes.io/metadata.name": n}}),
    )


# --- policies -----------------------------------------------------------------------------

CIDRS = (
    {"cidr": "10.233.0.0/24"},
    {"cidr": "10.233.0.0/16", "except": ["10.233.0.0/26", "10.233.0.64/26", "10.233.0.0/26"]},  # dup except
    {"cidr": "0.0.0.0/0"},
    {"cidr": "0.0.0.0/0", "except": ["10.233.0.0/24"]},
    {"cidr": "0.0.0.0/0", "except": ["0.0.0.0/1"]},  # except covering a half
    {"cidr": "10.233.0.5/32"},
    {"cidr": "10.233.0.7/24"},  # host bits set: normalised, as old API servers stored it
    {"cidr": "::/0"},
    {"cidr": "::/0", "except": ["fd00:233::/64"]},
    {"cidr": "fd00:233::/64", "except": ["fd00:233::/120"]},
    {"cidr": "fd00:233::5/128"},
    {"cidr": "::ffff:10.233.0.0/120"},  # IPv4-mapped IPv6
    {"cidr": "::ffff:10.233.0.5/128"},
    {"cidr": "192.0.2.0/24"},
    {"cidr": " 10.233.1.0/24 "},
)


@functools.lru_cache(maxsize=None)
def peer_st():
    return st.one_of(
        st.builds(lambda s: {"podSelector": s if s is not None else {}}, selector_st()),
        st.builds(lambda s: {"namespaceSelector": s if s is not None else {}}, ns_selector_st()),
        st.builds(
            lambda p, n: {"podSelector": p or {}, "namespaceSelector": n or {}}, selector_st(), ns_selector_st()
        ),
        st.sampled_from(CIDRS).map(lambda b: {"ipBlock": copy.deepcopy(b)}),
    )


@functools.lru_cache(maxsize=None)
def policy_port_st():
    proto = st.one_of(st.none(), st.sampled_from(PROTOCOLS))

    def with_proto(d, p):
        if p is not None:
            d = {**d, "protocol": p}
        return d

    return st.one_of(
        st.builds(with_proto, st.just({}), proto),
        st.builds(lambda n, p: with_proto({"port": n}, p), st.sampled_from((1, 53, 80, 81, 8080, 65535)), proto),
        st.builds(
            lambda lo, width, p: with_proto({"port": lo, "endPort": min(65535, lo + width)}, p),
            st.sampled_from((1, 80, 1000, 65535)),
            st.sampled_from((0, 1, 100, 70000)),  # endPort == port, and up to 65535
            proto,
        ),
        st.builds(lambda n, p: with_proto({"port": n}, p), st.sampled_from(PORT_NAMES), proto),
    )


@functools.lru_cache(maxsize=None)
def rule_st(peers_key: str):
    @st.composite
    def build(draw):
        ports = draw(st.lists(policy_port_st(), max_size=3))
        peers = draw(st.lists(peer_st(), max_size=3))
        if ports and draw(st.integers(0, 5)) == 0:
            ports = ports + ports  # duplicate ports
        if peers and draw(st.integers(0, 5)) == 0:
            peers = peers + peers[:1]  # duplicate peers
        rule: dict[str, Any] = {}
        form = draw(st.integers(0, 3))
        if ports or form == 1:
            rule["ports"] = ports
        if peers or form == 2:
            rule[peers_key] = peers
        if form == 3:
            rule["ports"] = None  # null = absent
        return rule

    return build()


def _big_rules(peers_key: str, peer: dict, n: int = 1000) -> list[dict]:
    return [
        {"ports": [{"port": 1 + i * 60, "endPort": 1 + i * 60 + (i % 3)}], peers_key: [peer]} for i in range(n)
    ]


@st.composite
def good_policy_st(draw, name: str, big_rules: float = 0.04):
    ns = draw(st.sampled_from(NAMESPACES))
    spec: dict[str, Any] = {"podSelector": draw(selector_st())}
    if spec["podSelector"] is None and draw(st.booleans()):
        del spec["podSelector"]  # absent: the API server defaults it to {}
    for key, peers_key in (("ingress", "from"), ("egress", "to")):
        shape = draw(st.integers(0, 4))
        if shape == 0:
            continue
        if shape == 1:
            spec[key] = None
        elif shape == 2:
            spec[key] = [{}]  # allow everything in that direction
        else:
            rules = draw(st.lists(rule_st(peers_key), max_size=3))
            if rules and draw(st.integers(0, 6)) == 0:
                rules = rules + rules[:1]  # duplicate rule
            spec[key] = rules
    types = draw(
        st.sampled_from((None, [], ["Ingress"], ["Egress"], ["Ingress", "Egress"], ["Egress", "Ingress", "Egress"]))
    )
    if types is not None:
        spec["policyTypes"] = types
    if big_rules > 0 and draw(st.integers(0, 999)) < big_rules * 1000:
        peer = draw(peer_st())
        spec["ingress"] = _big_rules("from", peer)
        spec.setdefault("policyTypes", ["Ingress"])
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"},
        "spec": spec,
    }


def late_policy(ns: str) -> dict:
    """A default-deny in both directions, added after the poison (issue 10, attack 1)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "late-default-deny", "namespace": ns},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }


# --- pods and namespaces ------------------------------------------------------------------


def good_namespace(name: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


@functools.lru_cache(maxsize=None)
def container_ports_st():
    cport = st.builds(
        lambda n, p, name: {k: v for k, v in (("containerPort", n), ("protocol", p), ("name", name)) if v is not None},
        st.sampled_from((1, 53, 80, 81, 8080, 65535)),
        st.one_of(st.none(), st.sampled_from(PROTOCOLS)),
        st.one_of(st.none(), st.sampled_from(PORT_NAMES)),
    )
    return st.lists(cport, max_size=3)


@st.composite
def good_pod_st(draw, index: int, v4: str, v6: str):
    """A valid pod; status addresses unique (v4/v6 handed in), 0-2 of them."""
    ns = draw(st.sampled_from(NAMESPACES + ("z",)))  # z: a namespace with no (good) object
    name = LONG_NAME[: 253 - 4] + f"-{index:03d}" if draw(st.integers(0, 5)) == 0 else f"pod-{index}"
    node = draw(st.sampled_from((NODE, NODE, OTHER_NODE, None)))
    host_network = draw(st.integers(0, 9)) == 0
    phase = draw(st.sampled_from(("Running", "Running", "Running", "Pending", "Succeeded")))
    ips = draw(st.sampled_from(([v4], [v4], [v4, v6], [v6], [])))
    if host_network:
        ips = [NODE_IPS.get(node or NODE, NODE_IPS[NODE])]
    status: dict[str, Any] = {"phase": phase}
    form = draw(st.integers(0, 2))
    if ips and form == 0:
        status["podIPs"] = [{"ip": ip} for ip in ips]
    elif ips and form == 1:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    elif ips:
        status["podIP"] = ips[0]
    containers = [{"name": "c", "ports": draw(container_ports_st())}]
    spec: dict[str, Any] = {"containers": containers}
    if node is not None:
        spec["nodeName"] = node
    if host_network or draw(st.booleans()):
        spec["hostNetwork"] = host_network
    if draw(st.integers(0, 4)) == 0:
        spec["initContainers"] = [{"name": "i", "ports": draw(container_ports_st())}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": draw(labels_st()), "uid": f"uid-{index}"},
        "spec": spec,
        "status": status,
    }


# --- poison: one or two hostile mutations of a good object --------------------------------


def _set(obj: dict, path: tuple, value: Any) -> dict:
    obj = copy.deepcopy(obj)
    cur = obj
    for p in path[:-1]:
        if isinstance(cur, list):
            cur = cur[p]
        else:
            cur = cur.setdefault(p, {})
    cur[path[-1]] = value
    return obj


def _first_rule_path(pol: dict) -> tuple[str, str] | None:
    for key, peers_key in (("ingress", "from"), ("egress", "to")):
        if pol["spec"].get(key):
            return key, peers_key
    return None


@st.composite
def poison_policy_st(draw, name: str):
    pol = draw(good_policy_st(name, big_rules=0.0))
    pol["metadata"]["name"] = name
    bad_port = st.sampled_from(BAD_PORTS + BAD_PORT_NAMES)
    mutation = draw(st.integers(0, 17))
    key = "ingress" if draw(st.booleans()) else "egress"
    peers_key = "from" if key == "ingress" else "to"

    def add_rule(rule: dict) -> dict:
        p = copy.deepcopy(pol)
        p["spec"].setdefault(key, None)
        p["spec"][key] = list(p["spec"][key] or []) + [rule]
        return p

    if mutation == 0:
        return add_rule({"ports": [{"port": draw(bad_port)}]})
    if mutation == 1:
        lo = draw(st.sampled_from((2, 80, 65535)))
        return add_rule({"ports": [{"port": lo, "endPort": lo - 1}]})  # endPort below port
    if mutation == 2:
        return add_rule({"ports": [{"port": "http", "endPort": 90}]})
    if mutation == 3:
        return add_rule({"ports": [{"port": 80, "protocol": draw(st.sampled_from(("tcp", "ICMP", "", 6)))}]})
    if mutation == 4:
        cidr = draw(st.sampled_from(("10.233.0.0/24", "0.0.0.0/0", "fd00:233::/64", "10.233.0.5/32")))
        return add_rule({peers_key: [{"ipBlock": {"cidr": cidr, "except": [cidr]}}]})  # except == cidr
    if mutation == 5:
        return add_rule({peers_key: [{"ipBlock": {"cidr": "10.233.0.0/24", "except": ["10.233.1.0/25"]}}]})
    if mutation == 6:
        return add_rule({peers_key: [{"ipBlock": {"cidr": "10.233.0.0/24", "except": ["fd00:233::/64"]}}]})
    if mutation == 7:
        bad = draw(st.sampled_from(("010.0.0.0/8", "10.0.0.0/33", "10.0.0.0", "garbage", "", "::ffff:10.0.0.0/97x")))
        return add_rule({peers_key: [{"ipBlock": {"cidr": bad}}]})
    if mutation == 8:
        op = draw(st.sampled_from(("in", "Gt", "Lt", "", None, "Equals")))
        sel = {"matchExpressions": [{"key": "app", "operator": op, "values": ["a"]}]}
        where = draw(st.integers(0, 1))
        if where == 0:
            return _set(pol, ("spec", "podSelector"), sel)  # the selector itself is unreadable
        return add_rule({peers_key: [{"podSelector": sel}]})
    if mutation == 9:
        sel = draw(
            st.sampled_from((
                {"matchExpressions": [{"key": "app", "operator": "In", "values": []}]},
                {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]},
                {"matchExpressions": [{"operator": "Exists"}]},
                {"matchFields": [{"key": "x"}]},
                {"matchLabels": {"app": draw(st.sampled_from(BAD_VALUES))}},
                {"matchLabels": {draw(st.sampled_from(BAD_KEYS)): "a"}},
                "app=a",
                ["app"],
            ))
        )
        if draw(st.booleans()):
            return _set(pol, ("spec", "podSelector"), sel)
        return add_rule({peers_key: [{"namespaceSelector": sel}]})
    if mutation == 10:
        return add_rule({peers_key: [draw(st.sampled_from(({}, {"ipBlock": {}}, {"bogus": 1})))]})
    if mutation == 11:
        return add_rule({peers_key: [{"ipBlock": {"cidr": "10.233.0.0/24"}, "podSelector": {}}]})
    if mutation == 12:
        return _set(pol, ("spec", "policyTypes"), draw(st.sampled_from((["ingress"], ["Both"], "Ingress", [None]))))
    if mutation == 13:
        return _set(pol, ("spec", key), draw(st.sampled_from(({}, "all", 1, [None], [[]]))))
    if mutation == 14:
        return _set(pol, ("spec",), draw(st.sampled_from((None, "x", [], {"podSelector": {}, "ingress": {}}))))
    if mutation == 15:
        # unknown fields only: still a valid policy (the API server prunes them)
        p = _set(pol, ("spec", "bogusField"), {"x": 1})
        return _set(p, ("metadata", "annotations"), {"note": "ü" * 100})
    if mutation == 16:
        return add_rule({"ports": draw(st.sampled_from(({"port": 80}, "80", [80], [{"port": 80, "endPort": 70000}])))})
    return add_rule({peers_key: [{"podSelector": {"matchLabels": {"app": "ü"}}}], "ports": [{"port": 0}]})


@functools.lru_cache(maxsize=None)
def _bad_ip_st():
    return st.sampled_from(BAD_ADDRESSES + GARBAGE_ADDRESSES)


@st.composite
def poison_pod_st(draw, index: int, v4: str, v6: str, victims: list[str]):
    """A pod with a hostile edge; ``victims``: other pods' addresses it may claim."""
    pod = draw(good_pod_st(index, v4, v6))
    pod["spec"]["hostNetwork"] = False
    pod["status"]["phase"] = "Running"
    mutation = draw(st.integers(0, 9))
    claim = st.sampled_from(tuple(victims) + EXTERNAL_IPS + tuple(NODE_IPS.values()) + BAD_ADDRESSES)
    if mutation in (0, 1, 2):
        # No status address, an annotation naming bad classes or other hosts' addresses.
        pod["status"].pop("podIP", None)
        pod["status"].pop("podIPs", None)
        ips = draw(st.lists(st.one_of(claim, _bad_ip_st()), min_size=1, max_size=3))
        pod["metadata"]["annotations"] = {"vpc.amazonaws.com/pod-ips": ",".join(ips)}
    elif mutation == 3:
        pod["status"]["podIPs"] = [{"ip": ip} for ip in draw(st.lists(_bad_ip_st(), min_size=1, max_size=3))]
        pod["status"].pop("podIP", None)
    elif mutation == 4:
        pod["status"] = {"phase": "Running", "podIP": draw(_bad_ip_st())}
    elif mutation == 5:
        pod["spec"]["hostNetwork"] = draw(st.sampled_from(("true", "false", 1, "yes")))
    elif mutation == 6:
        port = draw(st.sampled_from(({"containerPort": 0}, {"containerPort": 80, "name": draw(st.sampled_from(BAD_PORT_NAMES))},
                                     {"containerPort": "80"}, {"containerPort": 80, "protocol": "ICMP"})))
        pod["spec"]["containers"] = [{"name": "c", "ports": [port]}]
    elif mutation == 7:
        pod["metadata"]["labels"] = {"app": draw(st.sampled_from(BAD_VALUES))}
    elif mutation == 8:
        pod["status"]["podIPs"] = draw(st.sampled_from(("10.233.0.9", [None], [{"ip": None}], {"ip": v4})))
    else:
        # status keeps its own (valid) address; the annotation claims another pod's
        pod["metadata"]["annotations"] = {"vpc.amazonaws.com/pod-ips": draw(claim)}
    return pod


@st.composite
def poison_namespace_st(draw, name: str):
    labels = {"team": draw(st.sampled_from(BAD_VALUES))} if draw(st.booleans()) else {draw(st.sampled_from(BAD_KEYS)): "a"}
    return good_namespace(name, labels)


# --- the cluster --------------------------------------------------------------------------


@st.composite
def cluster_st(draw, max_pods: int = 6, max_policies: int = 3, max_poison: int = 3, poison: bool = True,
               big_rules: float = 0.04):
    """{"good": [...], "poison": [...], "late": policy dict} of raw API objects."""
    good: list[dict] = []
    for n in NAMESPACES:
        if draw(st.integers(0, 3)):
            good.append(good_namespace(n, {**draw(labels_st(("team",) + KEYS, max_size=2))}))
    n_pods = draw(st.integers(1, max_pods))
    hosts = draw(st.lists(st.integers(2, 200), min_size=n_pods + 3, max_size=n_pods + 3, unique=True))
    addrs = [(f"10.233.{h % 2}.{h}", f"fd00:233::{h:x}") for h in hosts]
    for i in range(n_pods):
        good.append(draw(good_pod_st(i, *addrs[i])))
    for i in range(draw(st.integers(0, max_policies))):
        good.append(draw(good_policy_st(f"pol-{i}" if i else LONG_NAME, big_rules)))
    bad: list[dict] = []
    if poison:
        victims = [ip for p in good if p["kind"] == "Pod" for ip in _status_ips(p)]
        for j in range(draw(st.integers(0 if max_poison < 1 else 1, max_poison))):
            kind = draw(st.sampled_from(("Pod", "Pod", "NetworkPolicy", "NetworkPolicy", "Namespace")))
            if kind == "Pod":
                bad.append(draw(poison_pod_st(100 + j, *addrs[n_pods + min(j, 2)], victims)))
            elif kind == "NetworkPolicy":
                bad.append(draw(poison_policy_st(f"poison-{j}")))
            else:
                bad.append(draw(poison_namespace_st(draw(st.sampled_from(("z", "w"))))))
    late_ns = draw(st.sampled_from(NAMESPACES))
    return {"good": good, "poison": bad, "late": late_policy(late_ns), "dup_keys": draw(st.booleans())}


def _status_ips(pod: dict) -> list[str]:
    st_ = pod.get("status") or {}
    out = [e["ip"] for e in st_.get("podIPs") or [] if isinstance(e, dict) and isinstance(e.get("ip"), str)]
    if isinstance(st_.get("podIP"), str):
        out.append(st_["podIP"])
    return sorted(set(out))
