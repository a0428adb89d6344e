"""Model and DesiredState builders shared by the dataplane tests (fake kernel and real kernel).

Pure: no kernel, no processes. States come from the real compiler; the poison a test
needs (a member, a set) is put in afterwards with ``with_members`` / ``with_set``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from policy_agent.compiler import compile as compile_policies
from policy_agent.compiler.options import NodeConfig
from policy_agent.desired import DesiredState, IPSet
from policy_agent.model.types import (
    ClusterSnapshot,
    ContainerPort,
    LabelSelector,
    Labels,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    PolicyType,
    Protocol,
)
from policy_agent.model.types import Rule as PRule

NODE = "node-1"
CFG = NodeConfig(node_name=NODE)


def pod(ns: str, name: str, *ips: str, node: str | None = NODE, labels: dict | None = None, web: bool = False) -> Pod:
    """A Running pod labelled ``app=<name>`` (unless ``labels``); ``web``: container port 80 named web."""
    return Pod(ns, name, Labels(labels if labels is not None else {"app": name}), node,
               tuple(ipaddress.ip_address(i) for i in ips),
               ports=(ContainerPort(80, name="web"),) if web else (), phase="Running")


# x/a admits x/b on its named port "web".
ALLOW_WEB = NetworkPolicy(
    "x", "allow-web", LabelSelector(Labels({"app": "a"})), (PolicyType.INGRESS,),
    ingress=(PRule((PolicyPort(Protocol.TCP, "web"),), (Peer(pod_selector=LabelSelector(Labels({"app": "b"}))),)),),
)
# A default-deny in another namespace: proves later applies still land.
DENY_Y = NetworkPolicy("y", "deny-all", LabelSelector(Labels({})), (PolicyType.INGRESS,))


def compile_cluster(pods, policies=(), namespaces=("x", "y"), cfg: NodeConfig = CFG) -> DesiredState:
    return compile_policies(ClusterSnapshot.of([*(Namespace(n) for n in namespaces), *pods, *policies]), cfg)


def set_of(d: DesiredState, kind: str, family: int = 4) -> IPSet:
    """The one set of ``kind`` (naming.ipset_name's letter) and ``family`` in ``d``."""
    (s,) = [s for n, s in d.ipsets.items() if n.startswith(f"pa{family}{kind}-")]
    return s


def with_set(d: DesiredState, s: IPSet) -> DesiredState:
    return replace(d, ipsets={**d.ipsets, s.name: s})


def with_members(d: DesiredState, s: IPSet, *extra: str) -> DesiredState:
    """``d`` with ``extra`` members added to set ``s`` (the poison the compiler never emits)."""
    return with_set(d, replace(s, members=s.members | set(extra)))
