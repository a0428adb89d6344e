"""Kubernetes Events on NetworkPolicies and ClusterNetworkPolicies the agent cannot enforce
as written (a ClusterNetworkPolicy is cluster-scoped: its Events go to namespace "default",
as client-go's recorder does for cluster-scoped objects).

Two causes, each one Event per policy, reason and field (or chain):

* the policy does not parse (``SourceError`` from the kube informer, which names the
  field): ``PolicyFallback`` when it is enforced as its no-allow fallback,
  ``PolicyLastGood`` when its last good version stays enforced, ``PolicyInvalid``
  otherwise;
* the kernel refused the policy's chain (the dataplane set it aside; the agent's
  ``set_aside`` list): ``PolicyNotProgrammed``.

Rules: ``report`` never blocks (it runs in the informers' threads): a bounded queue,
and a full queue drops the Event (counted) instead of waiting. One Event per key per
``interval`` (10 minutes): relists and watch restarts re-report the same error and are
suppressed. Event names are deterministic (policy + hash of uid, reason, field, node),
so a restarted agent finds its Event (409) and refreshes its lastTimestamp and message
with a patch instead of creating another. A 403 (no RBAC for events) is logged once and posting stops: Events
are a courtesy, never a reason to fail. core/v1 Events (``create``/``patch`` on
``events``): the one write permission the agent has.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

import structlog

log = structlog.get_logger(__name__)

INTERVAL = 600.0  # seconds between two Events of the same policy, reason and field
QUEUE = 64  # Events waiting to be posted; more are dropped (and counted)
REMEMBERED = 4096  # keys whose last post time is kept (oldest forgotten first)
COMPONENT = "policy-agent"

# "NetworkPolicy ns/name: spec.ingress[0]...: message (what the agent does)" (ModelError + kube.py)
_FIELD_RE = re.compile(r"^(?:Cluster)?NetworkPolicy \S+: (?P<field>(?:spec|metadata)[^\s:]*): ")
CNP_GROUP, CNP_VERSION, CNP_PLURAL = "policy.networking.k8s.io", "v1alpha2", "clusternetworkpolicies"
# Namespace of the Events about a cluster-scoped object.
CLUSTER_EVENT_NAMESPACE = "default"


def field_of(message: str) -> str:
    m = _FIELD_RE.match(message)
    return m.group("field") if m else ""


def reason_of(message: str) -> str:
    if "keeping its last good version" in message:
        return "PolicyLastGood"
    if "enforcing a fallback" in message:
        return "PolicyFallback"
    return "PolicyInvalid"


def _now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class EventRecorder:
    """Posts Warning Events about NetworkPolicies from a thread of its own."""

    def __init__(self, api_client: Any, node: str, *, interval: float = INTERVAL, max_queue: int = QUEUE,
                 clock: Callable[[], float] = time.monotonic,
                 set_aside: Callable[[], list[dict[str, Any]]] | None = None, poll: float = 5.0) -> None:
        self._api = api_client
        self.node = node
        self.interval = interval
        self.clock = clock
        self.set_aside = set_aside
        self.poll = poll
        self._q: queue.Queue[tuple[str, str, str, str, str, str] | None] = queue.Queue(max_queue)
        self._last: OrderedDict[tuple, float] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.forbidden = False
        self.posted = 0  # created or patched
        self.suppressed = 0  # within the interval of an earlier one
        self.dropped = 0  # queue full
        self.failed = 0

    # --- any thread ---------------------------------------------------------------------

    def observe(self, event: Any) -> None:
        """Sink wrapper: a SourceError about a (Cluster)NetworkPolicy becomes an Event."""
        if type(event).__name__ != "SourceError":
            return
        kind = getattr(event, "kind", "")
        key = getattr(event, "key", None)
        msg = str(getattr(event, "message", ""))
        if kind == "NetworkPolicy" and isinstance(key, tuple) and len(key) == 2:
            self.report(key[0], key[1], reason_of(msg), msg, field_of(msg))
        elif kind == "ClusterNetworkPolicy" and isinstance(key, str) and key:
            self.report("", key, reason_of(msg), msg, field_of(msg), kind=kind)

    def report(self, namespace: str, name: str, reason: str, message: str, field: str = "",
               kind: str = "NetworkPolicy") -> bool:
        """Queue one Event unless the same one was queued within ``interval``; never blocks.
        ``kind`` ClusterNetworkPolicy: ``namespace`` is "" (cluster-scoped)."""
        if self.forbidden:
            return False
        key = (namespace, name, reason, field) if kind == "NetworkPolicy" else (kind, name, reason, field)
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self.suppressed += 1
                return False
            self._last[key] = now
            self._last.move_to_end(key)
            while len(self._last) > REMEMBERED:
                self._last.popitem(last=False)
        try:
            self._q.put_nowait((namespace, name, reason, message, field, kind))
        except queue.Full:
            with self._lock:
                self._last.pop(key, None)  # not posted: the next report may try again
            self.dropped += 1
            log.warning("kube_event_dropped", reason=reason, policy=f"{namespace}/{name}", queue=self._q.maxsize)
            return False
        return True

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> "EventRecorder":
        self._thread = threading.Thread(target=self._run, name="kube-events", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._q.get(timeout=self.poll)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    self._post(*item)
                if self.set_aside is not None:
                    self._check_set_aside()
            except Exception:  # noqa: BLE001 - the recorder thread must outlive any bug of its own
                self.failed += 1
                log.exception("kube_event_recorder_error")

    def _check_set_aside(self) -> None:
        try:
            aside = list(self.set_aside() or ()) if self.set_aside else []
        except Exception:  # noqa: BLE001 - a status read must not end the thread
            return
        for a in aside:
            name = str(a.get("name", ""))
            if a.get("kind") != "chain" or not name.startswith(("pa-pi-", "pa-po-")):
                continue
            ref = str(a.get("origin", "")).split(" ", 1)[0]  # "ns/name ingress rule 0 ..."
            ns, slash, pol = ref.partition("/")
            if not slash:
                continue
            msg = (f"the kernel refused chain {name} (IPv{a.get('family')}) of this policy: {a.get('error')}; "
                   "its previous version (or nothing, for a new policy) stays in the kernel")
            self.report(ns, pol, "PolicyNotProgrammed", msg, name)

    # --- posting ------------------------------------------------------------------------

    def _post(self, namespace: str, name: str, reason: str, message: str, field: str,
              kind: str = "NetworkPolicy") -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(self._api)
        try:
            if kind == "ClusterNetworkPolicy":
                # get is in the ClusterRole (clusternetworkpolicies: get/list/watch)
                raw = client.CustomObjectsApi(self._api).get_cluster_custom_object(
                    CNP_GROUP, CNP_VERSION, CNP_PLURAL, name)
                meta = raw.get("metadata") or {}
                uid, rv = meta.get("uid") or "", meta.get("resourceVersion") or ""
                api_version = f"{CNP_GROUP}/{CNP_VERSION}"
            else:
                pol = client.NetworkingV1Api(self._api).read_namespaced_network_policy(name, namespace)
                uid, rv = pol.metadata.uid or "", pol.metadata.resource_version or ""
                api_version = "networking.k8s.io/v1"
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile: nothing to say
            self._failed(exc, reason, namespace, name)
            return
        except Exception as exc:  # noqa: BLE001 - network trouble: count, never raise
            self._failed(exc, reason, namespace, name)
            return
        digest = hashlib.sha256(f"{uid}|{reason}|{field}|{self.node}".encode()).hexdigest()[:16]
        ev_name = f"{name}.{digest}"
        now = _now_rfc3339()
        involved = {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "resourceVersion": rv}
        if kind == "NetworkPolicy":
            involved["namespace"] = namespace
        else:
            namespace = CLUSTER_EVENT_NAMESPACE
        body = {
            "metadata": {"name": ev_name, "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1024],
            "type": "Warning",
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            try:
                core.create_namespaced_event(namespace, body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                # Ours from before (a restart, or the interval passed): refresh it. No read:
                # create and patch are the only verbs the agent has on events.
                core.patch_namespaced_event(ev_name, namespace, {"lastTimestamp": now, "message": message[:1024]})
        except ApiException as exc:
            self._failed(exc, reason, namespace, name)
            return
        except Exception as exc:  # noqa: BLE001
            self._failed(exc, reason, namespace, name)
            return
        self.posted += 1
        log.info("kube_event_posted", policy=f"{namespace}/{name}", reason=reason, field=field, name=ev_name)

    def _failed(self, exc: Exception, reason: str, namespace: str, name: str) -> None:
        status = getattr(exc, "status", None)
        if status == 403:
            self.forbidden = True
            log.error("kube_events_forbidden", note="no create/patch on events (RBAC): posting stops",
                      policy=f"{namespace}/{name}", reason=reason)
            return
        self.failed += 1
        log.warning("kube_event_failed", policy=f"{namespace}/{name}", reason=reason, status=status,
                    error=str(exc)[:300])
