"""Events every source emits into the agent's store. Plain frozen values.

A source calls ``sink(event)`` from its own thread; the sink is thread-safe.
Objects are already converted to model values (policy_agent.model.types) or
endpoint records (policy_agent.shared.endpoint) at the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# kind: "Namespace" | "Pod" | "NetworkPolicy" | "Endpoint" | "Link"
# key: Namespace -> name; Pod/NetworkPolicy -> (namespace, name);
#      Endpoint -> (namespace, pod); Link -> interface name


@dataclass(frozen=True)
class Upsert:
    source: str  # e.g. "kube", "manifests:/path", "cni", "links"
    kind: str
    key: Any
    obj: Any  # model value, EndpointRecord, or for Link a dict(ifname=..., index=..., up=...)


@dataclass(frozen=True)
class Delete:
    source: str
    kind: str
    key: Any


@dataclass(frozen=True)
class Replace:
    """A full list of one kind from one source (after a list or relist):
    everything of that kind from that source not in ``objects`` is gone."""

    source: str
    kind: str
    objects: dict  # key -> obj


@dataclass(frozen=True)
class InSync:
    """The source has delivered its complete initial state (sent once per source,
    again after each completed relist)."""

    source: str


@dataclass(frozen=True)
class SourceError:
    """A problem worth surfacing in status/metrics (bad object, dropped watch...)."""

    source: str
    message: str
    kind: str = ""
    key: Any = None


Event = Upsert | Delete | Replace | InSync | SourceError
Sink = Callable[[Event], None]
