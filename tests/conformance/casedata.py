"""Conformance cases as data: load, run the state forward step by step, expand expectations.

A case file (cases/NN-*.yaml) holds ``name``, ``upstream`` (the ginkgo text it ports),
optional ``note`` and ``sctp_dump``, and ``steps``. Each step may ``apply`` objects
(full Kubernetes objects), ``delete`` objects ({kind, namespace, name}), ``label``
namespaces/pods (labels merged into the cluster spec's object), then states what is
expected afterwards, as upstream's Reachability builder does::

    expect:
      default: true                 # every pair, every port/protocol
      rules:                        # in order, later wins (ExpectPeer)
      - {from: "*", to: "x/a", connected: false}
      - {from: "y/*", to: "x/a", connected: true, ports: [81], protocols: [TCP]}

Peers: ``*`` (every pod), ``x/*`` (namespace), ``*/a`` (pod name anywhere), ``x/a``.
Loopback pairs (a pod to itself) are ignored, as upstream ignores them: that traffic
never leaves the pod's network namespace. ``{ip:NS/POD}`` inside a string is replaced
by the pod's IPv4 address when the case runs, ``{ip6:NS/POD}`` by its IPv6 address.

ClusterNetworkPolicy ``nodes`` peers: a case may apply Node objects (other than the lab's
own node) with ``status.addresses`` in the lab networks; the lab wires a namespace that
stands for each (policy_agent.lab.lab, "peer node"), and every such Node is then also a
*target* ``node/<name>`` (never a source): ``to: node/*`` in rules, ``*`` includes them.
``family: 6`` (case level) probes IPv6 addresses instead of IPv4 (pods and nodes).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import os
import re
from dataclasses import dataclass, field

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CASES_DIR = os.path.join(HERE, "cases")
CLUSTER_SPEC = os.path.join(HERE, "cluster.yaml")
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")
_IP_RE = re.compile(r"\{ip(6?):([a-z0-9-]+/[a-z0-9-]+)\}")
CLUSTER_SCOPED = ("Namespace", "ClusterNetworkPolicy", "Node")


@dataclass
class Case:
    path: str
    name: str
    upstream: str
    steps: list
    note: str = ""
    sctp_dump: dict | None = None
    family: int = 4

    @property
    def id(self) -> str:
        return os.path.basename(self.path)[:-5]


@dataclass
class State:
    """The cluster's objects after some steps: base spec + applied changes."""

    objects: dict = field(default_factory=dict)  # (kind, ns, name) -> dict

    def copy(self) -> "State":
        return State(copy.deepcopy(self.objects))


def key_of(obj: dict) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    cluster_scoped = obj["kind"] in CLUSTER_SCOPED
    ns = "" if cluster_scoped else meta.get("namespace", "default")
    return (obj["kind"], ns, meta["name"])


def load_cluster(path: str = CLUSTER_SPEC) -> State:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return State({key_of(d): d for d in docs})


def load_cases(directory: str = CASES_DIR) -> list[Case]:
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".yaml"):
            continue
        path = os.path.join(directory, name)
        with open(path) as f:
            d = yaml.safe_load(f)
        out.append(Case(path, d["name"], d["upstream"], d["steps"], d.get("note", ""), d.get("sctp_dump"),
                        int(d.get("family", 4))))
    return out


def pod_names(state: State) -> list[str]:
    return sorted(f"{ns}/{name}" for (kind, ns, name) in state.objects if kind == "Pod")


def node_targets(state: State, family: int = 4) -> dict[str, str]:
    """{"node/<name>": its first address of ``family``} for the Nodes of the state."""
    out = {}
    for (kind, _ns, name), d in sorted(state.objects.items()):
        if kind != "Node":
            continue
        addrs = [a.get("address", "") for a in (d.get("status") or {}).get("addresses") or []]
        fam = [a for a in addrs if (":" in a) == (family == 6) and any(c.isdigit() for c in a)]
        if fam:
            out[f"node/{name}"] = fam[0]
    return out


def substitute(obj, ips: dict[str, str], ips6: dict[str, str] | None = None):
    """Replace {ip:NS/POD} ({ip6:NS/POD}) in every string of obj with the pod's IPv4 (IPv6) address."""
    if isinstance(obj, str):
        return _IP_RE.sub(lambda m: (ips6 or {})[m.group(2)] if m.group(1) else ips[m.group(2)], obj)
    if isinstance(obj, list):
        return [substitute(o, ips, ips6) for o in obj]
    if isinstance(obj, dict):
        return {k: substitute(v, ips, ips6) for k, v in obj.items()}
    return obj


def step_changes(state: State, step: dict) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """The objects a step applies (labels turned into full objects) and the keys it deletes."""
    applied = [copy.deepcopy(o) for o in step.get("apply", [])]
    for lab in step.get("label", []):
        ns = "" if lab["kind"] in CLUSTER_SCOPED else lab["namespace"]
        base = copy.deepcopy(state.objects[(lab["kind"], ns, lab["name"])])
        meta = base.setdefault("metadata", {})
        meta["labels"] = {**(meta.get("labels") or {}), **lab["labels"]}
        applied.append(base)
    deleted = [(d["kind"], d.get("namespace", ""), d["name"]) for d in step.get("delete", [])]
    return applied, deleted


def advance(state: State, step: dict) -> State:
    new = state.copy()
    applied, deleted = step_changes(state, step)
    for o in applied:
        new.objects[key_of(o)] = o
    for k in deleted:
        new.objects.pop(k, None)
    return new


def _match(pattern: str, pod: str) -> bool:
    if pattern == "*":
        return True
    return fnmatch.fnmatchcase(pod, pattern)


def expand(expect: dict, pods: list[str], targets: list[str] | None = None
           ) -> dict[tuple[int, str], dict[tuple[str, str], bool]]:
    """{(port, protocol): {(from, to): connected}} for every non-loopback pair; ``targets``:
    the destinations (default the pods; node/<name> entries are destinations only)."""
    out: dict = {}
    dsts = pods if targets is None else targets
    for port in PORTS:
        for proto in PROTOCOLS:
            m = {(a, b): bool(expect.get("default", True)) for a in pods for b in dsts if a != b}
            for rule in expect.get("rules", []):
                if "ports" in rule and port not in rule["ports"]:
                    continue
                if "protocols" in rule and proto not in rule["protocols"]:
                    continue
                for (a, b) in m:
                    if _match(rule["from"], a) and _match(rule["to"], b):
                        m[(a, b)] = bool(rule["connected"])
            out[(port, proto)] = m
    return out


def format_matrix(pods: list[str], results: dict[tuple[str, str], bool], expected=None,
                  targets: list[str] | None = None) -> str:
    """Rows from, columns to; '.' connected, 'X' blocked, '-' loopback; a wrong cell is marked '!'."""
    cols = pods if targets is None else targets
    width = max(len(p) for p in list(pods) + list(cols))
    lines = [" " * width + " " + " ".join(p.rjust(width) for p in cols)]
    for a in pods:
        cells = []
        for b in cols:
            if a == b or (a, b) not in results:
                c = "-"
            else:
                c = "." if results[(a, b)] else "X"
                if expected is not None and expected.get((a, b)) is not None and expected[(a, b)] != results[(a, b)]:
                    c += "!"
            cells.append(c.rjust(width))
        lines.append(a.ljust(width) + " " + " ".join(cells))
    return "\n".join(lines)


@contextlib.contextmanager
def model_lab(name: str):
    """A lab named ``name`` running the cluster.yaml model (x/y/z × a/b/c), torn down after."""
    from policy_agent.lab import lab as L  # the lab only where a test runs one

    L.down(name)
    lab = L.Lab(name)
    try:
        lab.up(L.load_docs([CLUSTER_SPEC]), timeout=300)
        yield lab
    finally:
        L.down(name)
