"""Kubernetes list+watch informers for Namespaces, Pods (all namespaces), NetworkPolicies,
Nodes and ClusterNetworkPolicies.

Rules (the reflector contract, as client-go's, kept small):
1. List, convert, emit ``Replace`` for the kind; once every kind has listed, emit
   ``InSync`` (and again after each completed relist). Which list (docs/scale.md):
   the first from the API server's watch cache (``resourceVersion=0``: no etcd read;
   the cache ignores ``limit`` and answers in one response), a relist after 410 from
   the cache too but not older than what we hold (``resourceVersion=<ours>``,
   ``resourceVersionMatch=NotOlderThan``), and when the cache cannot answer (410, or
   504 "too large resource version") a consistent list from etcd in pages
   (``limit``/``continue``) that restarts from the first page when a ``continue``
   token expires (410 mid-list). Responses are decoded item by item as they stream
   in, so a 50,000-pod list never sits in memory as one JSON document.
2. Watch from the list's resourceVersion with ``allowWatchBookmarks``. Every event and
   bookmark advances our resourceVersion, so a reconnect resumes without a relist.
3. ``410 Gone`` (as an HTTP status or an ERROR event) means our resourceVersion was
   compacted away: relist, and let ``Replace`` diff against what the agent holds, so
   nothing is missed and nothing deleted meanwhile stays.
4. A dropped connection, a server error or a stall (no byte within the client read
   timeout) restarts the watch from our resourceVersion after a jittered exponential
   backoff. The server ends each watch after ``timeoutSeconds`` (randomised, as
   client-go does) and we simply watch again: that is not a restart.
5. Conversion happens here, once: raw JSON → ``policy_agent.model.parse`` → frozen
   model values (see docs/decisions/kube-raw-json.md for why not the client's model
   classes). A bad object becomes a ``SourceError`` naming object and field; the
   last good version of it (if any) is kept, also across relists, other objects are
   unaffected. A NetworkPolicy that never parsed is enforced as its no-allow fallback
   (model.parse.fallback_network_policy): dropping it would open the pods it
   isolates. See docs/decisions/policy-fallback.md. A ClusterNetworkPolicy that never
   parsed is enforced as its deny-all stand-in (fallback_cluster_network_policy;
   docs/decisions/cnp-fallback.md).
6. Updates that change nothing the model holds (e.g. pod conditions, managedFields)
   update the cached resourceVersion silently and emit nothing.
7. An optional resource (ClusterNetworkPolicy, a CRD) answered with 404 is not served:
   it is an empty list (``Replace`` with nothing, counts as listed for ``InSync``), logged
   once (``kube_resource_not_served``) and asked for again every ``not_served_recheck``
   seconds; once served it is listed and watched as any other. A 403 (RBAC without the
   new rule) is not "not served": it is an error, retried, and the source never syncs,
   because enforcing without the admin's guardrails would open what they deny.

The official ``kubernetes`` client provides the configuration (kubeconfig or in-cluster
service account, token refresh) and the transport (its urllib3 pool, TLS, auth headers);
we read the response bodies ourselves.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import structlog
import urllib3

from policy_agent.model.parse import (
    describe_cnp_fallback,
    fallback_cluster_network_policy,
    fallback_namespace,
    fallback_network_policy,
    parse_cluster_network_policy,
    parse_namespace,
    parse_network_policy,
    parse_node,
    parse_pod,
)
from policy_agent.model.types import ClusterNetworkPolicy, ModelError, NetworkPolicy, PodIPPolicy
from policy_agent.sources.events import Delete, InSync, Replace, Sink, SourceError, Upsert

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Resource:
    kind: str
    path: str  # collection path, all namespaces
    parse: Callable[[Mapping[str, Any]], Any]
    namespaced: bool
    # A CRD that may not be installed: 404 = an empty list, in sync, checked again later.
    optional: bool = False


RESOURCES: dict[str, Resource] = {
    "Namespace": Resource("Namespace", "/api/v1/namespaces", parse_namespace, False),
    "Pod": Resource("Pod", "/api/v1/pods", parse_pod, True),
    "NetworkPolicy": Resource(
        "NetworkPolicy", "/apis/networking.k8s.io/v1/networkpolicies", parse_network_policy, True
    ),
    # Labels and addresses only (model.Node): what ClusterNetworkPolicy `nodes` peers need.
    "Node": Resource("Node", "/api/v1/nodes", parse_node, False),
    "ClusterNetworkPolicy": Resource(
        "ClusterNetworkPolicy",
        "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
        parse_cluster_network_policy,
        False,
        optional=True,
    ),
}
DEFAULT_KINDS = ("Namespace", "Pod", "NetworkPolicy", "Node", "ClusterNetworkPolicy")


# Metric label values of degraded_counts (bounded).
DEGRADED_MODES = ("last_good", "fallback")


@dataclass(frozen=True)
class WatchOptions:
    page_size: int = 500
    # Server-side watch timeout, drawn uniformly from [min, 2*min) per watch (client-go).
    watch_timeout_min: float = 300.0
    # Client read timeout beyond the server timeout: a stalled stream is dropped after
    # timeoutSeconds + grace without a byte. Idle watches only get data at bookmarks.
    read_grace: float = 30.0
    connect_timeout: float = 10.0
    list_read_timeout: float = 60.0
    backoff_initial: float = 0.5
    # Short on purpose: after an API server outage the agent must converge within
    # seconds (full jitter, so the expected wait is half of this). client-go uses 30 s;
    # the cost is one refused connect per informer per second while the server is down.
    backoff_max: float = 1.0
    # How often an optional resource the server does not serve (404) is asked for again.
    not_served_recheck: float = 60.0
    # Lists from the API server's watch cache (resourceVersion=0 / NotOlderThan) first;
    # False: always the paginated consistent list from etcd (limit/continue).
    list_from_cache: bool = True
    # A paginated list whose continue token expired (410) is restarted this many times.
    list_restarts_max: int = 3


class _Gone(Exception):
    """Our resourceVersion is too old (410): relist."""


class _Stopped(Exception):
    pass


class _CacheBehind(Exception):
    """The watch cache cannot serve our list (504 "too large resource version", or 410)."""


class _NotServed(Exception):
    """404 for an optional resource: its CRD is not installed (or was removed)."""


class WatchError(Exception):
    """A failed request or a broken stream: reconnect after a backoff."""


def api_client_from_config(kubeconfig: str | None = None, context: str | None = None, in_cluster: bool | None = None):
    """An ``ApiClient`` from a kubeconfig file or the in-cluster service account.

    ``in_cluster=None``: in-cluster when no kubeconfig is given and the pod's
    service-account environment is present, else the kubeconfig (``$KUBECONFIG`` or
    ~/.kube/config) as the official client resolves it.
    """
    import os

    from kubernetes import client, config

    cfg = client.Configuration()
    if in_cluster is None:
        in_cluster = kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ
    if in_cluster:
        config.load_incluster_config(client_configuration=cfg)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


class _Transport:
    """Raw GETs through the official client's REST layer (auth, TLS, pool)."""

    def __init__(self, api_client) -> None:
        self.api = api_client

    def get(self, path: str, query: list[tuple[str, Any]], timeout: tuple[float, float]):
        _method, url, headers, _body, _post = self.api.param_serialize(
            "GET",
            path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            r = self.api.rest_client.request("GET", url, headers=headers, _request_timeout=timeout)
        except Exception as e:  # urllib3 errors, ApiException(status=0) for TLS
            raise WatchError(f"GET {path}: {type(e).__name__}: {e}") from e
        return r.response  # urllib3.HTTPResponse, body not read yet


def _status_error(resp, path: str) -> Exception:
    try:
        body = resp.read(64 * 1024, decode_content=True)
        status = json.loads(body)
        msg = status.get("message", "") if isinstance(status, dict) else ""
    except Exception:  # noqa: BLE001 - the body of an error is best effort
        msg = ""
    finally:
        _close(resp)
    if resp.status == 410:
        return _Gone(msg or "410 Gone")
    err = WatchError(f"GET {path}: HTTP {resp.status} {resp.reason}: {msg}")
    err.status = resp.status
    return err


def _close(resp) -> None:
    try:
        resp.close()
        resp.release_conn()
    except Exception:  # noqa: BLE001 - closing a broken socket may fail; nothing to do
        pass


def _lines(resp) -> Iterator[bytes]:
    """Newline-delimited JSON watch events from a chunked response as they arrive."""
    buf = b""
    for chunk in resp.stream(64 * 1024, decode_content=True):
        buf += chunk
        while True:
            i = buf.find(b"\n")
            if i < 0:
                break
            line, buf = buf[:i], buf[i + 1 :]
            if line.strip():
                yield line
    if buf.strip():
        yield buf


_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def iter_list_items(resp, top: dict, chunk_size: int = 256 * 1024) -> Iterator[Any]:
    """The ``items`` of a JSON list response ({"kind", "metadata", "items": [...]}), one
    by one as the body streams in; the other top-level members land in ``top``.

    Memory: one chunk plus one item, whatever the size of the list. Bad JSON raises
    ValueError (at the end of the body at the latest).
    """
    decode = codecs.getincrementaldecoder("utf-8")()
    chunks = resp.stream(chunk_size, decode_content=True)
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = next(chunks, None)
        if data is None:
            eof = True
            buf = buf[pos:] + decode.decode(b"", final=True)
        else:
            buf = buf[pos:] + decode.decode(data)
        pos = 0
        return True

    def skip_ws() -> str:
        nonlocal pos
        while True:
            pos = _WS.match(buf, pos).end()
            if pos < len(buf):
                return buf[pos]
            if not more():
                raise ValueError("list response: unexpected end of body")

    def value() -> Any:
        nonlocal pos
        skip_ws()
        while True:
            try:
                v, end = _DECODER.raw_decode(buf, pos)
            except ValueError:
                if more():  # most likely cut at the chunk boundary: read on, try again
                    continue
                raise
            # A number at the very end of the buffer may continue in the next chunk.
            if end == len(buf) and not eof and isinstance(v, (int, float)) and more():
                continue
            pos = end
            return v

    def expect(ch: str) -> None:
        nonlocal pos
        if skip_ws() != ch:
            raise ValueError(f"list response: expected {ch!r} at {buf[pos:pos + 40]!r}")
        pos += 1

    expect("{")
    if skip_ws() == "}":
        return
    while True:
        key = value()
        expect(":")
        if key == "items" and skip_ws() == "[":
            pos += 1
            if skip_ws() == "]":
                pos += 1
            else:
                while True:
                    yield value()
                    c = skip_ws()
                    pos += 1
                    if c == "]":
                        break
                    if c != ",":
                        raise ValueError(f"list response: expected ',' or ']' in items, got {c!r}")
        else:
            top[key] = value()
        c = skip_ws()
        pos += 1
        if c == "}":
            return
        if c != ",":
            raise ValueError(f"list response: expected ',' or '}}', got {c!r}")


def _key(kind_res: Resource, d: Mapping[str, Any]):
    meta = d.get("metadata") or {}
    if kind_res.namespaced:
        return (meta.get("namespace") or "", meta.get("name") or "")
    return meta.get("name") or ""


def _strip_rv(obj):
    try:
        return dataclasses.replace(obj, resource_version="")
    except TypeError:
        return obj


class Informer:
    """List+watch of one resource; owns a thread and a cache of model values."""

    def __init__(
        self,
        resource: Resource,
        transport: _Transport,
        sink: Sink,
        *,
        source: str,
        options: WatchOptions,
        on_listed: Callable[["Informer"], None],
    ) -> None:
        self.res = resource
        self.kind = resource.kind
        self._transport = transport
        self._sink = sink
        self._source = source
        self._opts = options
        self._on_listed = on_listed
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._cache: dict[Any, Any] = {}
        self._resp = None
        self.watching = False  # a watch stream is open (for status and tests)
        self.resource_version = ""
        self.listed = threading.Event()
        # Optional resources: None until the first answer, False while the server answers
        # 404 (then this kind is an empty, listed resource), True once it listed.
        self.served: bool | None = None
        # Counters for metrics (read by obs; plain ints, written by this thread only).
        self.watch_restarts = 0
        self.relists = 0  # lists after the first (each after a 410 Gone)
        self.events = 0
        self.list_pages = 0
        self.list_restarts = 0  # paginated lists restarted after their continue token expired
        self.list_mode = ""  # how the last list was served: "cache" or "pages" (for status and tests)
        self.bad_objects = 0
        # key -> "last_good" | "fallback" while the object on the server cannot be
        # parsed (read by degraded_counts() from other threads).
        self.degraded: dict[Any, str] = {}
        # metadata.uid of held objects whose model value has no uid (NetworkPolicy,
        # Namespace): a last good version is only ever the same object's.
        self._uids: dict[Any, str] = {}
        self._thread = threading.Thread(target=self._run, name=f"kube-{self.kind}", daemon=True)
        self._log = log.bind(source=source, kind=self.kind)

    # -- public ---------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            # Unblock a read in progress: shut the socket down under the reader.
            try:
                resp.shutdown()
            except Exception:  # noqa: BLE001 - already closed
                pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def cache(self) -> dict:
        with self._lock:
            return dict(self._cache)

    # -- thread ---------------------------------------------------------------
    def _run(self) -> None:
        backoff = self._opts.backoff_initial
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                    backoff = self._opts.backoff_initial
                self._watch()
                backoff = self._opts.backoff_initial  # a clean server-side end
            except _Stopped:
                break
            except _NotServed as e:
                need_list = True
                backoff = self._opts.backoff_initial
                self._not_served(str(e))
                self._stop.wait(self._opts.not_served_recheck)
            except _Gone as e:
                self._log.info("kube_resource_version_gone", resource_version=self.resource_version, error=str(e))
                need_list = True
                self.relists += 1
            except Exception as e:  # noqa: BLE001 - any failure: back off and retry
                if self._stop.is_set():
                    break
                self.watch_restarts += 1
                delay = random.uniform(0, backoff)  # full jitter
                backoff = min(backoff * 2, self._opts.backoff_max)
                self._log.warning(
                    "kube_watch_failed",
                    listing=need_list,
                    error=f"{type(e).__name__}: {e}",
                    retry_in=round(delay, 3),
                    restarts=self.watch_restarts,
                )
                self._sink(SourceError(self._source, f"{self.kind} watch: {e}", kind=self.kind))
                self._stop.wait(delay)
            finally:
                self._resp = None
        self._log.debug("kube_informer_stopped")

    def _request(self, query, read_timeout):
        if self._stop.is_set():
            raise _Stopped()
        resp = self._transport.get(self.res.path, query, (self._opts.connect_timeout, read_timeout))
        self._resp = resp
        if self._stop.is_set():
            _close(resp)
            raise _Stopped()
        if resp.status == 404 and self.res.optional:
            _close(resp)
            raise _NotServed(f"GET {self.res.path}: HTTP 404")
        if resp.status != 200:
            raise _status_error(resp, self.res.path)
        return resp

    def _not_served(self, why: str) -> None:
        """The server does not serve this optional resource (its CRD is not installed, or
        was deleted): an empty list, in sync, so clusters without the CRD work unchanged.
        Logged and emitted once per outage; the rechecks are silent."""
        if self.served is False:
            self._log.debug("kube_resource_still_not_served", path=self.res.path)
            return
        self.served = False
        self._log.info("kube_resource_not_served", path=self.res.path, error=why,
                       recheck_seconds=self._opts.not_served_recheck)
        with self._lock:
            self._cache = {}
        self.degraded = {}
        self.resource_version = ""
        self._sink(Replace(self._source, self.kind, {}))
        self.listed.set()
        self._on_listed(self)

    def _list(self) -> None:
        """One complete list (see rule 1 for which), then Replace."""
        first = not self.listed.is_set()
        with self._lock:
            old = self._cache
        result = None
        if self._opts.list_from_cache:
            rv = "0" if first or not self.resource_version else self.resource_version
            q: list[tuple[str, Any]] = [("resourceVersion", rv), ("limit", self._opts.page_size)]
            if rv != "0":
                # NotOlderThan with a limit would go to etcd (and page); without one the
                # cache answers, at its own revision, which is never older than ours.
                q = [("resourceVersion", rv), ("resourceVersionMatch", "NotOlderThan")]
            try:
                result = self._list_pages(q, old)
                self.list_mode = "cache"
            except _CacheBehind as e:
                self._log.info("kube_list_cache_unavailable", resource_version=rv, error=str(e))
        if result is None:
            for attempt in range(self._opts.list_restarts_max + 1):
                try:
                    result = self._list_pages([("limit", self._opts.page_size)], old)
                    self.list_mode = "pages"
                    break
                except _CacheBehind as e:  # a continue token expired: start again
                    self.list_restarts += 1
                    self._log.info("kube_list_continue_expired", attempt=attempt + 1, error=str(e))
            else:
                raise WatchError(f"list {self.kind}: continue token expired {self.list_restarts} times")
        new, degraded, rv = result
        with self._lock:
            self._cache = new
        self.degraded = degraded
        self._uids = {k: u for k, u in self._uids.items() if k in new}
        self.resource_version = rv
        if self.served is False:
            self._log.info("kube_resource_served", path=self.res.path)
        self.served = True
        self._log.info("kube_listed", count=len(new), resource_version=rv, first=first, mode=self.list_mode)
        self._sink(Replace(self._source, self.kind, dict(new)))
        self.listed.set()
        self._on_listed(self)

    def _list_pages(self, first_query, old):
        """(objects, degraded, resourceVersion) of one list: ``first_query``, then the
        ``continue`` pages the server hands out. 410 / 504 raise _CacheBehind."""
        new: dict[Any, Any] = {}
        degraded: dict[Any, str] = {}
        cont = ""
        rv = ""
        while True:
            q = [("limit", self._opts.page_size), ("continue", cont)] if cont else first_query
            try:
                resp = self._request(q, self._opts.list_read_timeout)
            except _Gone as e:
                raise _CacheBehind(f"410: {e}") from e
            except WatchError as e:
                if getattr(e, "status", None) == 504:  # "too large resource version": cache behind us
                    raise _CacheBehind(str(e)) from e
                raise
            self.list_pages += 1
            meta: dict[str, Any] = {}
            try:
                # Convert item by item as the body streams in: only model values outlive
                # an item (10,000 raw pods held at once cost ~300 MB; see
                # docs/performance-agent-kube.md).
                for d in iter_list_items(resp, meta):
                    key = _key(self.res, d)
                    obj, mode = self._convert(d, key, old.get(key))
                    if obj is not None:
                        new[key] = obj
                    if mode:
                        degraded[key] = mode
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                raise WatchError(f"list {self.kind}: {type(e).__name__}: {e}") from e
            finally:
                _close(resp)
            md = meta.get("metadata") or {}
            rv = md.get("resourceVersion") or rv
            cont = md.get("continue") or ""
            if not cont:
                return new, degraded, rv

    def _watch(self) -> None:
        timeout = int(self._opts.watch_timeout_min * (1 + random.random()))
        q = [
            ("watch", "true"),
            ("resourceVersion", self.resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", max(1, timeout)),
        ]
        started = time.monotonic()
        lines = 0
        resp = self._request(q, timeout + self._opts.read_grace)
        self.watching = True
        try:
            for line in _lines(resp):
                lines += 1
                self._handle(line)
        except (_Gone, _Stopped, WatchError):
            raise
        except (urllib3.exceptions.HTTPError, OSError) as e:
            if self._stop.is_set():
                raise _Stopped() from e
            raise WatchError(f"watch {self.kind} stream: {type(e).__name__}: {e}") from e
        finally:
            self.watching = False
            _close(resp)
        if self._stop.is_set():
            raise _Stopped()
        if lines == 0 and time.monotonic() - started < 1.0:
            # A server (or middlebox) ending watches at once: back off, do not spin.
            raise WatchError(f"watch {self.kind}: stream ended immediately")

    def _handle(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
            etype = ev["type"]
            d = ev["object"]
        except (ValueError, KeyError, TypeError) as e:
            raise WatchError(f"watch {self.kind}: undecodable event: {e}") from e
        if etype == "ERROR":
            code = d.get("code") if isinstance(d, dict) else None
            if code == 410 or (isinstance(d, dict) and d.get("reason") in ("Expired", "Gone")):
                raise _Gone(d.get("message", "410"))
            raise WatchError(f"watch {self.kind}: error event: {d}")
        rv = (d.get("metadata") or {}).get("resourceVersion")
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        self.events += 1
        key = _key(self.res, d)
        if etype == "DELETED":
            with self._lock:
                existed = self._cache.pop(key, None) is not None
            self.degraded.pop(key, None)  # and its last good version is forgotten
            self._uids.pop(key, None)
            if existed:
                self._sink(Delete(self._source, self.kind, key))
        elif etype in ("ADDED", "MODIFIED"):
            with self._lock:
                prev = self._cache.get(key)
            obj, mode = self._convert(d, key, prev)
            if mode:
                self.degraded[key] = mode
            else:
                self.degraded.pop(key, None)
            if obj is not None:
                with self._lock:
                    old = self._cache.get(key)
                    self._cache[key] = obj
                if old is None or _strip_rv(old) != _strip_rv(obj):
                    self._sink(Upsert(self._source, self.kind, key, obj))
        else:
            raise WatchError(f"watch {self.kind}: unknown event type {etype!r}")
        if rv:
            self.resource_version = rv

    def _convert(self, d: Mapping[str, Any], key, prev: Any = None) -> tuple[Any, str]:
        """(model value or None, mode) for one API object; ``prev``: what we hold for key.

        mode "" when it parsed. Otherwise the error is reported and, in this order:
        ``prev`` when it is a version that parsed (mode "last_good"; for every kind),
        a NetworkPolicy's no-allow fallback or a Namespace's stand-in (mode
        "fallback"), else None: dropped, which for a Pod only narrows
        (docs/decisions/policy-fallback.md).
        """
        uid = ((d.get("metadata") or {}).get("uid") or "") if isinstance(d, Mapping) else ""
        try:
            parsed = self.res.parse(d)
            if uid and not hasattr(parsed, "uid"):
                self._uids[key] = uid
            return parsed, ""
        except ModelError as e:
            err: Exception = e
            msg = str(e)
            field = e.field_path
        except Exception as e:  # noqa: BLE001 - a parser bug must not kill the informer
            err = e
            msg = f"{self.kind} {key}: {type(e).__name__}: {e}"
            field = ""
        self.bad_objects += 1
        obj, mode = None, ""
        # A stand-in we made earlier is never a last good version (self.degraded is the
        # state before this object: _list swaps it in only at the end).
        # The object we hold may be an earlier incarnation of the name (deleted and
        # recreated while the watch was down): then it is no last good version of this one.
        held_uid = getattr(prev, "uid", "") or self._uids.get(key, "")
        if held_uid and uid and held_uid != uid:
            prev = None
        if prev is not None and self.degraded.get(key) != "fallback" and not getattr(prev, "fallback_reason", ""):
            obj, mode = prev, "last_good"
            what = f"keeping its last good version (resourceVersion {getattr(prev, 'resource_version', '')})"
        elif self.kind == "NetworkPolicy":
            try:
                obj = fallback_network_policy(d, err)
            except Exception as e:  # noqa: BLE001 - never let the stand-in fail the informer
                self._log.error("kube_policy_fallback_failed", key=key, error=f"{type(e).__name__}: {e}")
            if isinstance(obj, NetworkPolicy):
                mode = "fallback"
                sel = "all pods of the namespace" if obj.pod_selector.is_empty else obj.pod_selector.canonical()
                dirs = "+".join(t.value for t in obj.policy_types)
                what = f"enforcing a fallback: isolates {sel} for {dirs}, allows nothing"
            else:
                what = "dropped: it cannot be keyed"
        elif self.kind == "ClusterNetworkPolicy":
            # An admin Deny must not open by failing to parse: a fail-closed stand-in
            # (model.parse.fallback_cluster_network_policy; docs/decisions/cnp-fallback.md).
            try:
                obj = fallback_cluster_network_policy(d, err)
            except Exception as e:  # noqa: BLE001 - as above
                self._log.error("kube_cnp_fallback_failed", key=key, error=f"{type(e).__name__}: {e}")
            if isinstance(obj, ClusterNetworkPolicy):
                mode = "fallback"
                what = f"enforcing a fallback: {describe_cnp_fallback(obj)}, accepts nothing"
            else:
                what = "dropped: it cannot be keyed"
        elif self.kind == "Namespace":
            try:
                obj = fallback_namespace(d)
            except Exception as e:  # noqa: BLE001 - as above
                self._log.error("kube_namespace_fallback_failed", key=key, error=f"{type(e).__name__}: {e}")
            mode = "fallback" if obj is not None else ""
            what = "using its readable labels" if obj is not None else "dropped (never parsed)"
        else:
            what = "dropped (never parsed)"
        self._log.warning("kube_bad_object", key=key, field=field, error=msg, enforced=mode or "nothing")
        self._sink(SourceError(self._source, f"{msg} ({what})", kind=self.kind, key=key))
        return obj, mode

    def degraded_counts(self) -> dict[str, int]:
        """How many objects are enforced from their last good version or as a fallback."""
        modes = list(self.degraded.values())
        return {m: modes.count(m) for m in DEGRADED_MODES}


class KubeSource:
    """Informers for the kinds (DEFAULT_KINDS), one thread each, sharing one API client.

    ``InSync`` is emitted once every informer has listed, and again after each relist.
    An optional kind (ClusterNetworkPolicy) that the server does not serve counts as listed.
    """

    def __init__(
        self,
        sink: Sink,
        api_client=None,
        *,
        kinds: tuple[str, ...] = DEFAULT_KINDS,
        source: str = "kube",
        options: WatchOptions | None = None,
        pod_ip_policy: PodIPPolicy | None = None,
    ) -> None:
        self.source = source
        self._sink = sink
        self._api = api_client if api_client is not None else api_client_from_config()
        transport = _Transport(self._api)
        self._lock = threading.Lock()
        self.synced = threading.Event()
        opts = options or WatchOptions()
        resources = dict(RESOURCES)
        if pod_ip_policy is not None:  # the configured pod address check, bound once
            resources["Pod"] = dataclasses.replace(
                resources["Pod"], parse=functools.partial(parse_pod, ip_policy=pod_ip_policy)
            )
        self.informers = {
            k: Informer(resources[k], transport, sink, source=source, options=opts, on_listed=self._listed)
            for k in kinds
        }

    def _listed(self, _inf: Informer) -> None:
        with self._lock:
            if all(i.listed.is_set() for i in self.informers.values()):
                if not self.synced.is_set():
                    log.info("kube_in_sync", source=self.source)
                self._sink(InSync(self.source))
                self.synced.set()

    def start(self) -> "KubeSource":
        for inf in self.informers.values():
            inf.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        for inf in self.informers.values():
            inf._stop.set()
        deadline = time.monotonic() + timeout
        for inf in self.informers.values():
            inf.stop(max(0.1, deadline - time.monotonic()))

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self.synced.wait(timeout)

    def cache(self, kind: str) -> dict:
        return self.informers[kind].cache()

    def degraded_policies(self) -> dict[str, int]:
        """NetworkPolicies and ClusterNetworkPolicies enforced from their last good version /
        as a fallback (stand-in), by mode."""
        out = dict.fromkeys(DEGRADED_MODES, 0)
        for kind in ("NetworkPolicy", "ClusterNetworkPolicy"):
            inf = self.informers.get(kind)
            if inf is not None:
                for mode, n in inf.degraded_counts().items():
                    out[mode] += n
        return out

    @property
    def watch_restarts(self) -> int:
        return sum(i.watch_restarts for i in self.informers.values())

    @property
    def relists(self) -> int:
        return sum(i.relists for i in self.informers.values())

    def close(self) -> None:
        self.stop()
        try:
            self._api.close()
        except Exception:  # noqa: BLE001
            pass
