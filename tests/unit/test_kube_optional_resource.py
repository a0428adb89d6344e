"""An optional resource (ClusterNetworkPolicy: a CRD that may not be installed) in the
kube informer, against a scripted transport (the apiserver tests do it for real):
404 = an empty, listed kind, reported once; 200 later = listed and watched; 404 again
(the CRD deleted) = emptied, reported once more; 403 = an error, never listed."""

from __future__ import annotations

import json
import threading
import time

from structlog.testing import capture_logs

from policy_agent.sources.events import Replace, SourceError
from policy_agent.sources.kube import RESOURCES, Informer, WatchOptions

CNP = {
    "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
    "metadata": {"name": "deny-x", "resourceVersion": "7"},
    "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
             "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]},
}


class _Resp:
    def __init__(self, status: int, body: dict, stream_until: threading.Event | None = None) -> None:
        self.status = status
        self.reason = {200: "OK", 403: "Forbidden", 404: "Not Found"}[status]
        self._body = json.dumps(body).encode()
        self._until = stream_until

    def read(self, *a, **k) -> bytes:
        return self._body

    def stream(self, *a, **k):
        if self._until is None:  # a list body: the informer decodes lists as they stream
            return iter((self._body,))
        # A watch that stays open (no events) until the test ends it.
        self._until.wait(10)
        return iter(())

    def shutdown(self) -> None:
        self._until.set()

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class _Server:
    def __init__(self, status: int) -> None:
        self.status = status
        self.items: list[dict] = []
        self.lists = 0
        self.watches = 0
        self.end_watch = threading.Event()

    def get(self, path, query, timeout):
        assert path == "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies"
        q = dict(query)
        if self.status != 200:
            return _Resp(self.status, {"kind": "Status", "code": self.status, "message": "nope"})
        if q.get("watch"):
            self.watches += 1
            self.end_watch.clear()
            return _Resp(200, {}, stream_until=self.end_watch)
        self.lists += 1
        return _Resp(200, {"metadata": {"resourceVersion": "10"}, "items": self.items})


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError("timed out")


def _start(server: _Server):
    events: list = []
    listed: list = []
    inf = Informer(RESOURCES["ClusterNetworkPolicy"], server, events.append, source="kube",
                   options=WatchOptions(not_served_recheck=0.05, backoff_initial=0.01, backoff_max=0.05),
                   on_listed=listed.append)
    inf.start()
    return inf, events, listed


def _replaces(events):
    return [e.objects for e in events if isinstance(e, Replace)]


def test_not_served_is_an_empty_listed_kind_reported_once_then_followed():
    server = _Server(404)
    with capture_logs() as logs:
        inf, events, listed = _start(server)
        try:
            _wait(lambda: inf.listed.is_set())
            assert inf.served is False and _replaces(events) == [{}] and len(listed) == 1
            time.sleep(0.5)  # ~10 rechecks
            assert _replaces(events) == [{}] and len(listed) == 1
            assert not [e for e in events if isinstance(e, SourceError)]
            assert [e["event"] for e in logs].count("kube_resource_not_served") == 1
            assert inf.watch_restarts == 0

            # The CRD is installed: listed and watched, without a restart.
            server.items = [CNP]
            server.status = 200
            _wait(lambda: inf.served is True and inf.watching)
            assert list(_replaces(events)[-1]) == ["deny-x"] and len(listed) == 2
            assert [e["event"] for e in logs].count("kube_resource_served") == 1

            # The CRD is deleted: the watch ends, the next request is a 404. (After a
            # second: a watch ending at once is a server misbehaving, backed off and reported.)
            time.sleep(1.1)
            server.status = 404
            server.end_watch.set()
            _wait(lambda: inf.served is False)
            assert _replaces(events)[-1] == {} and inf.cache() == {} and len(listed) == 3
            time.sleep(0.3)
            assert [e["event"] for e in logs].count("kube_resource_not_served") == 2
            assert not [e for e in events if isinstance(e, SourceError)]
        finally:
            inf.stop(5)


def test_forbidden_is_an_error_and_never_in_sync():
    server = _Server(403)
    inf, events, listed = _start(server)
    try:
        _wait(lambda: any(isinstance(e, SourceError) for e in events))
        time.sleep(0.3)
        assert not inf.listed.is_set() and listed == [] and _replaces(events) == []
        err = next(e for e in events if isinstance(e, SourceError))
        assert err.kind == "ClusterNetworkPolicy" and "403" in err.message
    finally:
        inf.stop(5)


def test_required_kinds_are_not_optional():
    assert RESOURCES["ClusterNetworkPolicy"].optional
    assert not any(RESOURCES[k].optional for k in ("Namespace", "Pod", "NetworkPolicy", "Node"))
