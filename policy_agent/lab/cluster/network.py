"""The cluster's "VPC": a router namespace, the control-plane namespace and one per node.

Every link, address, route and sysctl lives inside these namespaces; the root namespace
is never touched. Layout (10.240.0.0/16 is the VPC):

  (names with the default prefix "pa-cl-"; env POLICY_AGENT_CLUSTER_PREFIX changes it)
  pa-cl-vpc        router: veth `ctl` to pa-cl-ctl, veth `n<i>` to pa-cl-node-<i>, each with
                   10.240.0.1/32; routes 10.240.0.2/32 dev ctl, 10.240.<i>.10/32 dev n<i> and
                   the node's pod range 10.240.<i>.0/24 via 10.240.<i>.10; ip_forward=1.
  pa-cl-ctl        eth0 10.240.0.2/32, 10.240.0.1 on-link, default via it (etcd, apiserver,
                   controller-manager, scheduler).
  pa-cl-node-<i>   eth0 10.240.<i>.10/32, 10.240.0.1 on-link, default via it; ip_forward=1
                   (the CNI daemon does not set it, docs/install.md). Pods get
                   10.240.<i>.32-95 (the node's pool file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import structlog

from policy_agent.lab import netns

log = structlog.get_logger(__name__)


def _prefix() -> str:
    # Another prefix lets a test run a second (control-plane-only) cluster beside the default
    # one: the namespaces are the only global names a cluster without nodes has.
    p = os.environ.get("POLICY_AGENT_CLUSTER_PREFIX", "pa-cl-")
    if not (2 <= len(p) <= 8 and p.endswith("-") and set(p) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")):
        raise ValueError(f"POLICY_AGENT_CLUSTER_PREFIX: {p!r} must be 2-8 characters of [a-z0-9-] ending in '-'")
    return p


PREFIX = _prefix()
VPC_NS = f"{PREFIX}vpc"
CTL_NS = f"{PREFIX}ctl"
VPC_CIDR = "10.240.0.0/16"
ROUTER_IP = "10.240.0.1"
CTL_IP = "10.240.0.2"
SERVICE_CIDR = "10.96.0.0/16"
POD_FIRST, POD_LAST = 32, 95  # host part of a node's pod addresses (64 of them)
MAX_NODES = 200


def node_ns(i: int) -> str:
    return f"{PREFIX}node-{i}"


def node_name(i: int) -> str:
    return f"node-{i}"


def node_ip(i: int) -> str:
    return f"10.240.{i}.10"


def pod_range(i: int) -> str:
    return f"10.240.{i}.0/24"


def pod_ips(i: int) -> list[str]:
    return [f"10.240.{i}.{h}" for h in range(POD_FIRST, POD_LAST + 1)]


def pool_json(i: int) -> dict:
    """The node's static pool (docs/cni.md "Pool file"): one primary ENI, 64 pod addresses."""
    ips = pod_ips(i)
    return {"limits": {"maxENIs": 1, "ipsPerENI": len(ips) + 1},
            "enis": [{"id": f"eni-node-{i}", "deviceNumber": 0, "primaryIP": node_ip(i), "secondaryIPs": ips}]}


@dataclass(frozen=True)
class Network:
    nodes: int

    def namespaces(self) -> list[str]:
        return [VPC_NS, CTL_NS, *(node_ns(i) for i in range(1, self.nodes + 1))]


def _link(router_if: str, ns: str, addr: str) -> None:
    """veth router_if (in the router) <-> eth0 (in ns), /32 addresses, routes both ways."""
    netns.ip(VPC_NS, "link", "add", router_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
    netns.ip(VPC_NS, "addr", "add", f"{ROUTER_IP}/32", "dev", router_if)
    netns.ip(VPC_NS, "link", "set", router_if, "up")
    netns.ip(VPC_NS, "route", "replace", f"{addr}/32", "dev", router_if, "scope", "link")
    netns.ip(ns, "addr", "add", f"{addr}/32", "dev", "eth0")
    netns.ip(ns, "link", "set", "eth0", "up")
    netns.ip(ns, "route", "replace", f"{ROUTER_IP}/32", "dev", "eth0", "scope", "link")
    netns.ip(ns, "route", "replace", "default", "via", ROUTER_IP, "dev", "eth0")


def build(nodes: int, record: Callable[[str, object], None]) -> Network:
    """Create the namespaces and links; each namespace is recorded before it is created."""
    if not 0 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes: {nodes} is out of range (0-{MAX_NODES})")
    net = Network(nodes)
    for name in net.namespaces():
        if netns.exists(name):
            raise RuntimeError(f"network namespace {name} already exists: another cluster is up "
                               "(run `scripts/cluster.sh down`, with its --work if it was not the default)")
    for name in net.namespaces():
        record("netns", name)
        netns.create(name)
    netns.enable_forwarding(VPC_NS)
    _link("ctl", CTL_NS, CTL_IP)
    for i in range(1, nodes + 1):
        ns = node_ns(i)
        _link(f"n{i}", ns, node_ip(i))
        netns.ip(VPC_NS, "route", "replace", pod_range(i), "via", node_ip(i), "dev", f"n{i}")
        netns.enable_forwarding(ns)
    log.info("cluster_network_built", nodes=nodes, namespaces=net.namespaces())
    return net
