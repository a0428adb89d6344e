"""A node netns with three pod netns behind eni<11 hex> veths (AWS VPC CNI style),
servers on TCP/UDP 80 and 81 in every pod, and foreign rules/sets in the node.

Parametrised over both iptables backends; legacy is skipped only when the host
has no legacy iptables (in CI that skip is a failure, see tests/conftest.py).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import pytest

from policy_agent.lab import specs as s
from policy_agent.dataplane.kernel import binary, legacy_available
from policy_agent.lab import netns

AREA = "dp"
PODS = {
    "a": ("10.233.50.1", "fd00:233::50:1"),
    "b": ("10.233.50.2", "fd00:233::50:2"),
    "c": ("10.233.50.3", "fd00:233::50:3"),
}

FOREIGN = """*filter
:KUBE-FOO - [0:0]
-A KUBE-FOO -s {net} -j DROP
-A FORWARD -m comment --comment "kube foo" -j KUBE-FOO
COMMIT
"""


@dataclass
class Lab:
    backend: str
    node: str
    pods: dict[str, str]  # pod name -> netns
    ips: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(PODS))

    def pod(self, name: str, labels: set[str] | None = None, local: bool = True) -> s.Pod:
        return s.Pod("x", name, self.ips[name], frozenset(labels or {f"app={name}"}), local)

    def all_pods(self) -> list[s.Pod]:
        return [self.pod(n) for n in sorted(self.pods)]

    def can(self, src: str, dst: str, port: int, proto: str = "TCP", family: int = 4, timeout: float = 1.0) -> bool:
        ip = self.ips[dst][0 if family == 4 else 1]
        return netns.probe_many([netns.Probe(self.pods[src], ip, port, proto)], timeout=timeout, attempts=2)[
            netns.Probe(self.pods[src], ip, port, proto)
        ]

    def save(self, family: int = 4, counters: bool = False) -> str:
        argv = [binary(self.backend, family, "save")] + (["-c"] if counters else [])
        return netns.run(self.node, *argv).stdout

    def ipset_save(self) -> str:
        return netns.run(self.node, "ipset", "save").stdout

    def snapshot(self) -> tuple:
        """Both families' tables and all sets, without counters, timestamps or set initvals."""
        def clean(text: str) -> list[str]:
            out = []
            for ln in text.splitlines():
                if ln.startswith("#"):
                    continue
                ln = re.sub(r"\[\d+:\d+\]", "[0:0]", ln)
                ln = re.sub(r" initval 0x[0-9a-f]+", "", ln)
                out.append(ln)
            return out

        return clean(self.save(4)), clean(self.save(6)), clean(self.ipset_save())

    def foreign(self) -> tuple:
        """Everything in the node that is not ours."""
        v4, v6, sets = self.snapshot()
        keep = lambda ln: "pa-" not in ln and "pa:" not in ln and not re.search(r"\bpa[46][a-z]-", ln)  # noqa: E731
        return [x for x in v4 if keep(x)], [x for x in v6 if keep(x)], [x for x in sets if keep(x)]


def backends() -> list:
    return ["nft", pytest.param("legacy", marks=pytest.mark.skipif(not legacy_available(), reason="no legacy iptables"))]


@pytest.fixture(params=backends())
def bare_node(request):
    """(backend, netns): an empty node namespace, no pods."""
    with netns.scratch(AREA, "bare") as name:
        yield request.param, name


@pytest.fixture(params=backends())
def lab(request):
    backend = request.param
    node = netns.unique_name(AREA, "node")
    pods = {n: netns.unique_name(AREA, f"pod{n}") for n in PODS}
    made = []
    try:
        netns.create(node)
        made.append(node)
        netns.enable_forwarding(node)
        for name, ns in pods.items():
            netns.create(ns)
            made.append(ns)
            iface = s.Pod("x", name, PODS[name]).iface
            netns.add_veth(node, ns, iface, PODS[name])
            netns.start_server(ns, tcp_ports=(80, 81), udp_ports=(80, 81), name=name)
        netns.run(node, binary(backend, 4, "restore"), "--noflush", input=FOREIGN.format(net="10.9.9.9/32"))
        netns.run(node, binary(backend, 6, "restore"), "--noflush", input=FOREIGN.format(net="fd00:9::9/128"))
        netns.run(node, "ipset", "restore", input="create KUBE-SET hash:ip family inet\nadd KUBE-SET 10.9.9.9\n")
        yield Lab(backend, node, pods)
    finally:
        for ns in reversed(made):
            try:
                netns.delete(ns)
            except Exception as exc:  # keep deleting the others
                print(f"cleanup of {ns} failed: {exc}", file=sys.stderr)
