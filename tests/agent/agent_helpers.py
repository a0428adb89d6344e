"""Builders and waiting helpers for the agent tests."""

from __future__ import annotations

import ipaddress

from helpers.agent_process import wait_for as wait_for  # re-exported: the agent tests import it from here
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
from policy_agent.sources.events import InSync, Replace


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
