"""Builders and waiting helpers for the agent tests."""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path
from typing import Iterator

from helpers.agent_process import wait_for as wait_for  # re-exported: the agent tests import it from here
from policy_agent.agent import Agent
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.model.types import (
    LabelSelector,
    Labels,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    PolicyType,
    Rule,
)
from policy_agent.shared.naming import veth_name
from policy_agent.sources.cni import CniSource
from policy_agent.sources.events import InSync, Replace
from policy_agent.sources.manifests import ManifestSource


def make_pod(ns: str, name: str, ips=(), node: str | None = "n1", labels=None) -> Pod:
    return Pod(ns, name, Labels(labels or {"app": name}), node, tuple(ipaddress.ip_address(i) for i in ips),
               phase="Running")


def make_ns(name: str, labels=None) -> Namespace:
    return Namespace(name, Labels({"kubernetes.io/metadata.name": name, **(labels or {})}))


def allow_from(ns: str, name: str, target: dict, sources: dict, port: int | None = None) -> NetworkPolicy:
    """Ingress to pods matching ``target`` only from pods matching ``sources`` (same namespace)."""
    ports = (PolicyPort(port=port),) if port else ()
    return NetworkPolicy(
        ns, name, LabelSelector(Labels(target)), (PolicyType.INGRESS,),
        (Rule(ports, (Peer(pod_selector=LabelSelector(Labels(sources))),)),),
    )


def deny_all(ns: str, name: str = "deny-all") -> NetworkPolicy:
    return NetworkPolicy(ns, name, LabelSelector(), (PolicyType.INGRESS,), ())


def iface(ns: str, pod: str, prefix: str = "eni") -> str:
    return veth_name(prefix, ns, pod)


class ManualSource:
    """A source that says InSync only when told (to test the sync barrier)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sink = None

    def start(self, sink) -> None:
        self.sink = sink

    def stop(self) -> None:
        pass

    def replace(self, kind: str, objects: dict) -> None:
        self.sink(Replace(self.name, kind, objects))

    def in_sync(self) -> None:
        self.sink(InSync(self.name))


@contextlib.contextmanager
def manifest_agent(node_ns: str, workdir: Path, files: dict[str, str]) -> Iterator[tuple[Agent, Path]]:
    """A started agent for node n1 in ``node_ns``, reading manifests from ``workdir/manifests``
    (seeded with ``files``) and CNI records from ``workdir/ep``; stopped on exit."""
    mdir = workdir / "manifests"
    mdir.mkdir()
    for name, text in files.items():
        (mdir / name).write_text(text)
    agent = Agent(
        NodeConfig("n1"), Dataplane(netns=node_ns), [ManifestSource(str(mdir)), CniSource(str(workdir / "ep"))],
        min_interval=0.02, refresh_interval=5,
    )
    agent.start()
    try:
        yield agent, mdir
    finally:
        agent.stop()


def degraded(agent: Agent, mode: str) -> float:
    """The agent's policy_agent_policies_degraded gauge for ``mode`` (last_good, fallback)."""
    return agent.metrics.registry.get_sample_value("policy_agent_policies_degraded", {"mode": mode})
