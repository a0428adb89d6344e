"""A node netns with pod netns behind eni veths, servers in them, and probes between them.

Only private network namespaces (policy_agent.lab.netns); every one created is
deleted again, on success and on failure.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Hashable, Iterable, Iterator

import pytest

from policy_agent.dataplane.kernel import legacy_available
from policy_agent.lab import netns


def backends() -> list:
    """Both iptables backends; legacy skipped only where the host has none (a CI failure)."""
    return ["nft", pytest.param("legacy", marks=pytest.mark.skipif(not legacy_available(), reason="no legacy iptables"))]


@contextlib.contextmanager
def node_with_pods(
    node: str,
    pods: dict[Hashable, str],
    addrs: dict[Hashable, Iterable[str]],
    iface: Callable[[Hashable], str],
    serve: Iterable[Hashable] = (),
    tcp_ports: Iterable[int] = (),
    udp_ports: Iterable[int] = (),
    setup_node: Callable[[str], None] | None = None,
    server_name: Callable[[Hashable], str] | None = None,
) -> Iterator[tuple[str, dict[Hashable, str]]]:
    """Create ``node`` (forwarding on), then each pod netns ``pods[key]`` behind veth
    ``iface(key)`` with ``addrs[key]``; start a server in each pod of ``serve``.

    ``setup_node(node)`` runs before the pods are wired (node addresses, links).
    ``server_name(key)``: the server's name (its log tag).
    Yields (node, pods); deletes what it made in reverse order, reporting (not raising)
    a failed delete so the others still go.
    """
    made: list[str] = []
    servers = []
    try:
        netns.create(node)
        made.append(node)
        netns.enable_forwarding(node)
        if setup_node is not None:
            setup_node(node)
        for key, pns in pods.items():
            netns.create(pns)
            made.append(pns)
            netns.add_veth(node, pns, iface(key), list(addrs[key]))
        for key in serve:
            servers.append(netns.start_server(pods[key], tcp_ports=tuple(tcp_ports), udp_ports=tuple(udp_ports),
                                              name=server_name(key) if server_name else None))
        yield node, pods
    finally:
        for s in servers:
            netns.stop_server(s)
        for ns in reversed(made):
            try:
                netns.delete(ns)
            except Exception as exc:  # keep deleting the others
                print(f"cleanup of {ns} failed: {exc}", file=sys.stderr)


def pods_yaml(ips: dict[str, str], namespace: str = "x", node: str = "n1") -> str:
    """Manifest text: ``namespace`` and one pod per ``ips`` entry (label app=<pod>) on ``node``."""
    docs = [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"]
    for pod, ip in ips.items():
        docs.append(
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {namespace}, labels: {{app: {pod}}}}}\n"
            f"spec: {{nodeName: {node}, containers: [{{name: c, image: i}}]}}\nstatus: {{podIPs: [{{ip: {ip}}}]}}\n"
        )
    return "---\n".join(docs)


def can(ns: str, ip: str, port: int, proto: str = "TCP", timeout: float = 0.7, attempts: int = 2) -> bool:
    """Did a connection from inside ``ns`` to ip:port get through (best of ``attempts``)?"""
    p = netns.Probe(ns, ip, port, proto)
    return netns.probe_many([p], timeout=timeout, attempts=attempts)[p]

