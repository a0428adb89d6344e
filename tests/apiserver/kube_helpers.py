"""Test helpers: an event recorder that applies events like the agent's store, manifests,
a kubelet-style status writer, and the convergence check."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any

from policy_agent.model.parse import parse_namespace, parse_network_policy, parse_pod
from policy_agent.sources.events import Delete, InSync, Replace, SourceError, Upsert

KINDS = ("Namespace", "Pod", "NetworkPolicy")
_LIST_ARGS = {
    "Namespace": ("namespaces",),
    "Pod": ("pods", "--all-namespaces"),
    "NetworkPolicy": ("networkpolicies.networking.k8s.io", "--all-namespaces"),
}
_PARSE = {"Namespace": parse_namespace, "Pod": parse_pod, "NetworkPolicy": parse_network_policy}


class Recorder:
    """A thread-safe sink that applies events to a view, as the agent's store does."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list = []
        self.view: dict[tuple[str, str], dict[Any, Any]] = {}  # (source, kind) -> key -> obj
        self.in_sync = 0
        self.errors: list[SourceError] = []

    def __call__(self, ev) -> None:
        with self.lock:
            self.events.append(ev)
            if isinstance(ev, Replace):
                self.view[(ev.source, ev.kind)] = dict(ev.objects)
            elif isinstance(ev, Upsert):
                self.view.setdefault((ev.source, ev.kind), {})[ev.key] = ev.obj
            elif isinstance(ev, Delete):
                self.view.setdefault((ev.source, ev.kind), {}).pop(ev.key, None)
            elif isinstance(ev, InSync):
                self.in_sync += 1
            elif isinstance(ev, SourceError):
                self.errors.append(ev)

    def objects(self, kind: str, source: str = "kube") -> dict:
        with self.lock:
            return dict(self.view.get((source, kind), {}))


def server_state(cluster, kind: str) -> dict:
    """key -> resourceVersion from a fresh list (kubectl get -o json)."""
    out = json.loads(cluster.kubectl("get", *_LIST_ARGS[kind], "-o", "json"))
    state = {}
    for d in out["items"]:
        m = d["metadata"]
        key = (m["namespace"], m["name"]) if kind != "Namespace" else m["name"]
        state[key] = m["resourceVersion"]
    return state


def rv_map(objs: dict) -> dict:
    return {k: o.resource_version for k, o in objs.items()}


def diff(a: dict, b: dict) -> str:
    missing = sorted(set(a) - set(b), key=str)[:5]
    extra = sorted(set(b) - set(a), key=str)[:5]
    changed = sorted((k for k in set(a) & set(b) if a[k] != b[k]), key=str)[:5]
    return f"missing={missing} stale={extra} changed={[(k, a[k], b[k]) for k in changed]}"


def _content(objs: dict) -> dict:
    # Updates that change nothing the model holds are not re-emitted (see kube.py),
    # so the applied view is compared by content, the cache by resourceVersion.
    return {k: dataclasses.replace(o, resource_version="") for k, o in objs.items()}


def wait_converged(cluster, source, recorder: Recorder, timeout: float = 120.0, kinds=KINDS) -> None:
    """Until the informer cache equals a fresh list (same keys, same resourceVersions)
    and the view built from the emitted events holds exactly the cache's content, for
    every kind: nothing missed, nothing stale."""
    deadline = time.monotonic() + timeout
    problem = ""
    while time.monotonic() < deadline:
        problem = ""
        for kind in kinds:
            want = server_state(cluster, kind)
            cache_objs = source.cache(kind)
            cache = rv_map(cache_objs)
            if cache != want:
                problem += f" {kind} cache: {diff(want, cache)}"
            view = _content(recorder.objects(kind))
            expected = _content(cache_objs)
            if view != expected:
                problem += f" {kind} events: {diff(expected, view)}"
        if not problem:
            return
        time.sleep(0.5)
    raise AssertionError(f"source did not converge to the server within {timeout}s:{problem}")


def wait_for(pred, timeout: float = 60.0, what: str = "condition", interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# Every namespace a test creates carries this label, so the session can delete them
# (matters on a real cluster given by KUBECONFIG).
TEST_LABEL = "policy-agent.test/run"


def namespace_yaml(name: str, labels: dict | None = None) -> str:
    labels = {**(labels or {}), TEST_LABEL: str(os.getpid())}
    return json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})


def pod_yaml(ns: str, name: str, labels: dict | None = None, node: str = "node-a", annotations=None) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "labels": labels or {}, "annotations": annotations or {}},
            "spec": {
                "nodeName": node,
                "containers": [
                    {"name": "c", "image": "registry.invalid/pause:1", "ports": [{"name": "http", "containerPort": 80}]}
                ],
            },
        }
    )


def policy_yaml(ns: str, name: str, app: str = "web", port: int = 80) -> str:
    return json.dumps(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name},
            "spec": {
                "podSelector": {"matchLabels": {"app": app}},
                "ingress": [
                    {"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": port}]}
                ],
            },
        }
    )


def apply(cluster, *docs: str) -> None:
    """kubectl apply of a List of JSON objects, as an operator would."""
    items = [json.loads(d) for d in docs]
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def set_pod_ips(api_client, ns: str, name: str, *ips: str) -> None:
    """Write status.podIPs through the status subresource, as a kubelet would."""
    from kubernetes import client

    body = {"status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}}
    client.CoreV1Api(api_client).patch_namespaced_pod_status(name, ns, body)
