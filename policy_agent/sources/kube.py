"""Kubernetes list+watch informers for Namespaces, Pods (all namespaces) and NetworkPolicies.

Rules (the reflector contract, as client-go's, kept small):
1. List (paginated: ``limit``/``continue``), convert, emit ``Replace`` for the kind; once
   every kind has listed, emit ``InSync`` (and again after each completed relist).
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
   last good version of it (if any) is kept, other objects are unaffected.
6. Updates that change nothing the model holds (e.g. pod conditions, managedFields)
   update the cached resourceVersion silently and emit nothing.

The official ``kubernetes`` client provides the configuration (kubeconfig or in-cluster
service account, token refresh) and the transport (its urllib3 pool, TLS, auth headers);
we read the response bodies ourselves.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import structlog
import urllib3

from policy_agent.model.parse import parse_namespace, parse_network_policy, parse_pod
from policy_agent.model.types import ModelError
from policy_agent.sources.events import Delete, InSync, Replace, Sink, SourceError, Upsert

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Resource:
    kind: str
    path: str  # collection path, all namespaces
    parse: Callable[[Mapping[str, Any]], Any]
    namespaced: bool


RESOURCES: dict[str, Resource] = {
    "Namespace": Resource("Namespace", "/api/v1/namespaces", parse_namespace, False),
    "Pod": Resource("Pod", "/api/v1/pods", parse_pod, True),
    "NetworkPolicy": Resource(
        "NetworkPolicy", "/apis/networking.k8s.io/v1/networkpolicies", parse_network_policy, True
    ),
}


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
    backoff_max: float = 30.0


class _Gone(Exception):
    """Our resourceVersion is too old (410): relist."""


class _Stopped(Exception):
    pass


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
    return WatchError(f"GET {path}: HTTP {resp.status} {resp.reason}: {msg}")


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
        # Counters for metrics (read by obs; plain ints, written by this thread only).
        self.watch_restarts = 0
        self.relists = 0  # lists after the first (each after a 410 Gone)
        self.events = 0
        self.list_pages = 0
        self.bad_objects = 0
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
        if resp.status != 200:
            raise _status_error(resp, self.res.path)
        return resp

    def _list(self) -> None:
        first = not self.listed.is_set()
        with self._lock:
            old = self._cache
        new: dict[Any, Any] = {}
        cont = ""
        rv = ""
        while True:
            q: list[tuple[str, Any]] = [("limit", self._opts.page_size)]
            if cont:
                q.append(("continue", cont))
            resp = self._request(q, self._opts.list_read_timeout)
            self.list_pages += 1
            try:
                body = json.loads(resp.read(decode_content=True))
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                raise WatchError(f"list {self.kind}: {type(e).__name__}: {e}") from e
            finally:
                _close(resp)
            # Convert page by page: only model values outlive a page (10,000 raw pods
            # held at once cost ~300 MB; see docs/performance-agent-kube.md).
            for d in body.get("items") or ():
                key = _key(self.res, d)
                obj = self._convert(d, key)
                if obj is not None:
                    new[key] = obj
                elif key in old:
                    new[key] = old[key]  # keep the last good version of a now-bad object
            meta = body.get("metadata") or {}
            rv = meta.get("resourceVersion") or rv
            cont = meta.get("continue") or ""
            del body
            if not cont:
                break
        with self._lock:
            self._cache = new
        self.resource_version = rv
        self._log.info("kube_listed", count=len(new), resource_version=rv, first=first)
        self._sink(Replace(self._source, self.kind, dict(new)))
        self.listed.set()
        self._on_listed(self)

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
            if existed:
                self._sink(Delete(self._source, self.kind, key))
        elif etype in ("ADDED", "MODIFIED"):
            obj = self._convert(d, key)
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

    def _convert(self, d: Mapping[str, Any], key):
        try:
            return self.res.parse(d)
        except ModelError as e:
            msg = str(e)
        except Exception as e:  # noqa: BLE001 - a parser bug must not kill the informer
            msg = f"{self.kind} {key}: {type(e).__name__}: {e}"
        self.bad_objects += 1
        self._log.warning("kube_bad_object", key=key, error=msg)
        self._sink(SourceError(self._source, msg, kind=self.kind, key=key))
        return None


class KubeSource:
    """Informers for the three kinds, one thread each, sharing one API client.

    ``InSync`` is emitted once every informer has listed, and again after each relist.
    """

    def __init__(
        self,
        sink: Sink,
        api_client=None,
        *,
        kinds: tuple[str, ...] = ("Namespace", "Pod", "NetworkPolicy"),
        source: str = "kube",
        options: WatchOptions | None = None,
    ) -> None:
        self.source = source
        self._sink = sink
        self._api = api_client if api_client is not None else api_client_from_config()
        transport = _Transport(self._api)
        self._lock = threading.Lock()
        self.synced = threading.Event()
        opts = options or WatchOptions()
        self.informers = {
            k: Informer(RESOURCES[k], transport, sink, source=source, options=opts, on_listed=self._listed)
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
