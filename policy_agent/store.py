"""The agent's one store: every source's objects, merged into one effective view.

Each source owns its own slice (``source -> kind -> key -> obj``); a Replace
swaps a source's whole slice of one kind, so a relist can never leave stale
objects behind. The effective object for a key is the one from the
highest-priority source holding it ("kube" first, then the others by name),
and a local Pod is merged with this node's endpoint record (matched by
namespace/pod): the record's IPs are authoritative, because the CNI assigned
them. The API's ``status.podIPs`` lags after ADD and can be stale after a
sandbox was recreated with a new address; anti-spoofing built from a stale
address would drop the pod's own traffic. A mismatch is logged
(``endpoint_ip_mismatch``, once per pair). When the record goes (CNI DEL) the
API's IPs apply again. A pod with a record but no ``spec.nodeName`` yet is
known to be local; a pod the API places on another node ignores the record
(a leftover of an earlier pod of the same name here).

``take_changes()`` returns only keys whose *effective* value changed since the
last call, so a relist that brings nothing new causes no apply at all.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog

from policy_agent.model.types import ClusterSnapshot, Namespace, NetworkPolicy, Pod
from policy_agent.shared.endpoint import EndpointRecord
from policy_agent.sources.events import Delete, Event, InSync, Replace, SourceError, Upsert

log = structlog.get_logger(__name__)

MODEL_KINDS = ("Namespace", "Pod", "NetworkPolicy")
KINDS = MODEL_KINDS + ("Endpoint", "Link")
ERROR_HISTORY = 50


@dataclass
class Changes:
    """Effective changes since the last take: key -> new value, or None when gone."""

    namespaces: dict[str, Namespace | None] = field(default_factory=dict)
    pods: dict[tuple[str, str], Pod | None] = field(default_factory=dict)
    policies: dict[tuple[str, str], NetworkPolicy | None] = field(default_factory=dict)
    endpoints: dict[tuple[str, str], EndpointRecord | None] = field(default_factory=dict)
    links: dict[str, Any] = field(default_factory=dict)

    @property
    def model_changed(self) -> bool:
        return bool(self.namespaces or self.pods or self.policies)

    def __bool__(self) -> bool:
        return self.model_changed or bool(self.endpoints or self.links)

    def count(self) -> int:
        return len(self.namespaces) + len(self.pods) + len(self.policies) + len(self.endpoints) + len(self.links)


def _priority(source: str) -> tuple[int, str]:
    return (0 if source == "kube" else 1, source)


class Store:
    """Not thread-safe: only the agent loop touches it (sources talk through the queue)."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        self._by_source: dict[str, dict[str, dict[Any, Any]]] = {}
        self._sources_sorted: list[str] = []
        self._effective: dict[str, dict[Any, Any]] = {k: {} for k in KINDS}
        self._dirty: dict[str, set] = {k: set() for k in KINDS}
        self.in_sync_sources: set[str] = set()
        self.sync_counts: dict[str, int] = {}
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERROR_HISTORY)
        self.error_count = 0
        self._changed = False
        self._mismatch_logged: dict[tuple[str, str], tuple] = {}

    # --- input -----------------------------------------------------------------

    def _slice(self, source: str, kind: str) -> dict[Any, Any]:
        per = self._by_source.get(source)
        if per is None:
            per = self._by_source[source] = {k: {} for k in KINDS}
            self._sources_sorted = sorted(self._by_source, key=_priority)
        if kind not in per:
            raise ValueError(f"unknown kind {kind!r} from source {source!r}")
        return per[kind]

    def _mark(self, kind: str, key: Any) -> None:
        self._changed = True
        self._dirty[kind].add(key)
        if kind == "Endpoint":
            self._dirty["Pod"].add(key)  # the record feeds the effective pod

    def apply(self, event: Event) -> bool:
        """Take one event; True if it changed a source's objects."""
        self._changed = False
        if isinstance(event, Upsert):
            sl = self._slice(event.source, event.kind)
            if sl.get(event.key) != event.obj:
                sl[event.key] = event.obj
                self._mark(event.kind, event.key)
        elif isinstance(event, Delete):
            sl = self._slice(event.source, event.kind)
            if sl.pop(event.key, None) is not None:
                self._mark(event.kind, event.key)
        elif isinstance(event, Replace):
            sl = self._slice(event.source, event.kind)
            new = event.objects
            for key in [k for k in sl if k not in new]:
                del sl[key]
                self._mark(event.kind, key)
            for key, obj in new.items():
                if sl.get(key) != obj:
                    sl[key] = obj
                    self._mark(event.kind, key)
        elif isinstance(event, InSync):
            self.in_sync_sources.add(event.source)
            self.sync_counts[event.source] = self.sync_counts.get(event.source, 0) + 1
        elif isinstance(event, SourceError):
            self.error_count += 1
            self.errors.append(
                {"source": event.source, "kind": event.kind, "key": _key_text(event.key), "message": event.message}
            )
        else:
            raise TypeError(f"not an event: {event!r}")
        return self._changed

    # --- effective view ----------------------------------------------------------

    def _first(self, kind: str, key: Any) -> Any:
        for source in self._sources_sorted:
            obj = self._by_source[source][kind].get(key)
            if obj is not None:
                return obj
        return None

    def _effective_pod(self, key: tuple[str, str]) -> Pod | None:
        pod = self._first("Pod", key)
        if pod is None:
            return None
        rec = self._effective["Endpoint"].get(key)  # taken before pods in take_changes()
        if rec is None or (rec.namespace, rec.pod) != key or pod.node_name not in (None, self.node_name):
            self._mismatch_logged.pop(key, None)
            return pod
        updates: dict[str, Any] = {}
        ips = []
        for text in rec.ips:
            try:
                ip = ipaddress.ip_address(text.split("/")[0])
            except ValueError:
                log.warning("endpoint_record_bad_ip", pod=f"{key[0]}/{key[1]}", ip=text)
                continue
            if ip not in ips:
                ips.append(ip)
        if ips and tuple(ips) != pod.ips:
            if pod.ips and set(ips) != set(pod.ips):
                pair = (tuple(ips), pod.ips)
                if self._mismatch_logged.get(key) != pair:
                    self._mismatch_logged[key] = pair
                    log.warning("endpoint_ip_mismatch", pod=f"{key[0]}/{key[1]}", record_ips=[str(i) for i in ips],
                                api_ips=[str(i) for i in pod.ips], container_id=rec.container_id,
                                using="record")
            updates["ips"] = tuple(ips)
        if pod.node_name is None:
            updates["node_name"] = self.node_name
        return dataclasses.replace(pod, **updates) if updates else pod

    def take_changes(self) -> Changes:
        ch = Changes()
        # Endpoints first: effective pods read them.
        for kind, out in (("Endpoint", ch.endpoints), ("Link", ch.links), ("Namespace", ch.namespaces),
                          ("NetworkPolicy", ch.policies), ("Pod", ch.pods)):
            eff = self._effective[kind]
            for key in self._dirty[kind]:
                new = self._effective_pod(key) if kind == "Pod" else self._first(kind, key)
                if new == eff.get(key):
                    continue
                if new is None:
                    eff.pop(key, None)
                else:
                    eff[key] = new
                out[key] = new
            self._dirty[kind].clear()
        return ch

    @property
    def has_dirty(self) -> bool:
        return any(self._dirty.values())

    def snapshot(self) -> ClusterSnapshot:
        """The effective model objects as of the last take_changes()."""
        return ClusterSnapshot(
            namespaces=dict(self._effective["Namespace"]),
            pods=dict(self._effective["Pod"]),
            policies=dict(self._effective["NetworkPolicy"]),
        )

    def endpoint(self, namespace: str, pod: str) -> EndpointRecord | None:
        return self._effective["Endpoint"].get((namespace, pod))

    def count(self, kind: str) -> int:
        return len(self._effective[kind])

    def links(self) -> dict[str, Any]:
        return dict(self._effective["Link"])


def _key_text(key: Any) -> str:
    if key is None:
        return ""
    if isinstance(key, tuple):
        return "/".join(str(k) for k in key)
    return str(key)
