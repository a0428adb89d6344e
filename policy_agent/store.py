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
(a leftover of an earlier pod of the same name here). A record and a Pod whose
UIDs are both known and differ (the pod was recreated under the same name) are
not merged, and the Pod has no addresses here until they agree (fail closed:
docs/decisions/cni-identity.md).

Pod addresses are checked at the edge (policy_agent.model.parse, PodIPPolicy);
the record's addresses pass the same check here. Every refused address
(``Pod.rejected_ips``) is reported once per (pod, field, address, reason) until
the pod's set of rejections changes: a ``pod_ip_rejected`` warning, an entry in
``errors`` (shown by ``policy-agent status``) and ``on_pod_ip_rejected(reason)``
(the agent's metric).

``take_changes()`` returns only keys whose *effective* value changed since the
last call, so a relist that brings nothing new causes no apply at all.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from policy_agent.model.parse import check_pod_ip
from policy_agent.model.types import (
    ClusterNetworkPolicy,
    ClusterSnapshot,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    PodIPPolicy,
    RejectedIP,
)
from policy_agent.shared.endpoint import EndpointRecord
from policy_agent.sources.events import Delete, Event, InSync, Replace, SourceError, Upsert

log = structlog.get_logger(__name__)

MODEL_KINDS = ("Namespace", "Pod", "NetworkPolicy", "ClusterNetworkPolicy", "Node")
KINDS = MODEL_KINDS + ("Endpoint", "Link")
ERROR_HISTORY = 50
_RECORD_PATH = "endpoint record"  # field path prefix of a CNI endpoint record's addresses


@dataclass
class Changes:
    """Effective changes since the last take: key -> new value, or None when gone."""

    namespaces: dict[str, Namespace | None] = field(default_factory=dict)
    pods: dict[tuple[str, str], Pod | None] = field(default_factory=dict)
    policies: dict[tuple[str, str], NetworkPolicy | None] = field(default_factory=dict)
    endpoints: dict[tuple[str, str], EndpointRecord | None] = field(default_factory=dict)
    links: dict[str, Any] = field(default_factory=dict)
    cluster_policies: dict[str, ClusterNetworkPolicy | None] = field(default_factory=dict)
    nodes: dict[str, Node | None] = field(default_factory=dict)

    @property
    def model_changed(self) -> bool:
        return bool(self.namespaces or self.pods or self.policies or self.cluster_policies or self.nodes)

    def __bool__(self) -> bool:
        return self.model_changed or bool(self.endpoints or self.links)

    def count(self) -> int:
        return (len(self.namespaces) + len(self.pods) + len(self.policies) + len(self.endpoints) + len(self.links)
                + len(self.cluster_policies) + len(self.nodes))


def _priority(source: str) -> tuple[int, str]:
    return (0 if source == "kube" else 1, source)


class Store:
    """Not thread-safe: only the agent loop touches it (sources talk through the queue)."""

    def __init__(
        self,
        node_name: str,
        pod_ip_policy: PodIPPolicy | None = None,
        on_pod_ip_rejected: Callable[[str], None] | None = None,
    ) -> None:
        self.node_name = node_name
        # Endpoint-record addresses pass the same check as the API's (model.parse).
        self.pod_ip_policy = pod_ip_policy or PodIPPolicy()
        self.on_pod_ip_rejected = on_pod_ip_rejected  # reason -> (metrics)
        self._rejections_reported: dict[tuple[str, str], frozenset[RejectedIP]] = {}
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
        pod = self._merged_pod(key)
        self._report_rejections(key, pod)
        return pod

    def _report_rejections(self, key: tuple[str, str], pod: Pod | None) -> None:
        """Log, count and record each rejected pod address once, until the pod's set changes."""
        now = frozenset(pod.rejected_ips) if pod is not None else frozenset()
        before = self._rejections_reported.get(key, frozenset())
        if now == before:
            return
        if now:
            self._rejections_reported[key] = now
        else:
            self._rejections_reported.pop(key, None)
        ref = f"{key[0]}/{key[1]}"
        for r in sorted(now - before, key=lambda r: (r.path, r.address)):
            source = "endpoint-record" if r.path.startswith(_RECORD_PATH) else self._pod_source(key)
            log.warning("pod_ip_rejected", pod=ref, field=r.path, address=r.address, reason=r.reason,
                        source=source)
            self.error_count += 1
            self.errors.append({"source": source, "kind": "Pod", "key": ref,
                                "message": f"Pod {ref}: {r.path}: address {r.address!r} rejected ({r.reason}); "
                                           "left out of the pod's addresses"})
            if self.on_pod_ip_rejected is not None:
                self.on_pod_ip_rejected(r.reason)

    def _pod_source(self, key: tuple[str, str]) -> str:
        for source in self._sources_sorted:
            if key in self._by_source[source]["Pod"]:
                return source
        return ""

    def _merged_pod(self, key: tuple[str, str]) -> Pod | None:
        pod = self._first("Pod", key)
        if pod is None:
            return None
        rec = self._effective["Endpoint"].get(key)  # taken before pods in take_changes()
        if rec is None or (rec.namespace, rec.pod) != key or pod.node_name not in (None, self.node_name):
            self._mismatch_logged.pop(key, None)
            return pod
        if rec.pod_uid and pod.uid and rec.pod_uid != pod.uid:
            # The sandbox here is another incarnation of the name (pod deleted and
            # recreated): its record must not take this object's labels, and this
            # object's API addresses are stale here. No addresses: the interface stays
            # unknown (dropped, fail closed) and gets no status file until they agree.
            self._mismatch_logged.pop(key, None)
            log.warning("endpoint_pod_uid_mismatch", pod=f"{key[0]}/{key[1]}", record_pod_uid=rec.pod_uid,
                        pod_uid=pod.uid, container_id=rec.container_id)
            return dataclasses.replace(pod, ips=()) if pod.ips else pod
        updates: dict[str, Any] = {}
        ips: list = []
        rejected: list[RejectedIP] = []
        for i, text in enumerate(rec.ips):
            # Our CNI wrote it, but it passes the same edge check as the API's
            # addresses: one bad member would make the kernel refuse a whole batch.
            ip, reason, shown = check_pod_ip(text.split("/")[0], self.pod_ip_policy)
            if ip is None:
                rejected.append(RejectedIP(f"{_RECORD_PATH}.ips[{i}]", shown, reason))
            elif ip not in ips:
                ips.append(ip)
        if rejected:
            updates["rejected_ips"] = pod.rejected_ips + tuple(rejected)
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
                          ("NetworkPolicy", ch.policies), ("ClusterNetworkPolicy", ch.cluster_policies),
                          ("Node", ch.nodes), ("Pod", ch.pods)):
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
            cluster_policies=dict(self._effective["ClusterNetworkPolicy"]),
            nodes=dict(self._effective["Node"]),
        )

    def endpoint(self, namespace: str, pod: str) -> EndpointRecord | None:
        return self._effective["Endpoint"].get((namespace, pod))

    def pod(self, namespace: str, name: str) -> Pod | None:
        """The effective Pod as of the last take_changes() (what was compiled)."""
        return self._effective["Pod"].get((namespace, name))

    def count(self, kind: str) -> int:
        return len(self._effective[kind])

    def pods(self) -> list[Pod]:
        """The effective pods (flow logs resolve addresses from another thread: one
        C-level copy of the values, which the GIL keeps whole)."""
        return list(self._effective["Pod"].values())

    def links(self) -> dict[str, Any]:
        return dict(self._effective["Link"])


def _key_text(key: Any) -> str:
    if key is None:
        return ""
    if isinstance(key, tuple):
        return "/".join(str(k) for k in key)
    return str(key)
