"""Manifest-directory and CNI endpoint-record sources: real files, real watchdog (inotify)."""

from __future__ import annotations

import os
import queue
import threading

import pytest
from agent_helpers import wait_for

from policy_agent.model.types import PolicyType, Protocol
from policy_agent.shared import endpoint as ep
from policy_agent.sources.cni import CniSource
from policy_agent.sources.events import Delete, InSync, Replace, SourceError, Upsert
from policy_agent.sources.manifests import ManifestSource


class Collector:
    """A thread-safe sink plus the state the store would build from it."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.state: dict[str, dict] = {}
        self.errors: list[SourceError] = []
        self.in_sync = 0
        self.lock = threading.Lock()

    def __call__(self, e) -> None:
        with self.lock:
            if isinstance(e, Replace):
                self.state[e.kind] = dict(e.objects)
            elif isinstance(e, Upsert):
                self.state.setdefault(e.kind, {})[e.key] = e.obj
            elif isinstance(e, Delete):
                self.state.setdefault(e.kind, {}).pop(e.key, None)
            elif isinstance(e, SourceError):
                self.errors.append(e)
            elif isinstance(e, InSync):
                self.in_sync += 1
        self.events.put(e)

    def get(self, kind: str) -> dict:
        with self.lock:
            return dict(self.state.get(kind, {}))


NS_AND_POD = """\
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: x, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, image: i, ports: [{containerPort: 80, name: http}]}]}
status: {podIPs: [{ip: 10.233.0.5}]}
"""

POLICY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - ports: [{port: 80}]
"""

BROKEN_POLICY = POLICY.replace("port: 80", "port: 70000")


def _write(path, text: str) -> None:
    tmp = str(path) + ".tmp~"  # editors' temp names are ignored
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@pytest.fixture
def mdir(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    return d


def test_initial_scan_defaults_and_in_sync(mdir):
    (mdir / "a.yaml").write_text(NS_AND_POD)
    (mdir / "sub").mkdir()
    (mdir / "sub" / "p.yml").write_text(POLICY)
    (mdir / "notes.txt").write_text("not yaml: [")
    c = Collector()
    src = ManifestSource(str(mdir))
    src.start(c)
    try:
        assert c.in_sync == 1
        assert set(c.get("Namespace")) == {"x"}
        pod = c.get("Pod")[("x", "web")]
        assert str(pod.ips[0]) == "10.233.0.5" and pod.node_name == "n1"
        pol = c.get("NetworkPolicy")[("x", "allow-web")]
        # API-server defaults applied: policyTypes from the rules, protocol TCP.
        assert pol.policy_types == (PolicyType.INGRESS,)
        assert pol.ingress[0].ports[0].protocol is Protocol.TCP
        assert c.get("Namespace")["x"].labels["kubernetes.io/metadata.name"] == "x"
        assert c.errors == []
    finally:
        src.stop()


def test_changes_are_followed(mdir):
    (mdir / "a.yaml").write_text(NS_AND_POD)
    c = Collector()
    src = ManifestSource(str(mdir))
    src.start(c)
    try:
        _write(mdir / "p.yaml", POLICY)
        wait_for(lambda: ("x", "allow-web") in c.get("NetworkPolicy"), what="policy added")
        _write(mdir / "a.yaml", NS_AND_POD.replace("app: web", "app: api"))
        wait_for(lambda: c.get("Pod")[("x", "web")].labels.get("app") == "api", what="label change")
        os.unlink(mdir / "p.yaml")
        wait_for(lambda: not c.get("NetworkPolicy"), what="policy removed with its file")
    finally:
        src.stop()


def test_broken_file_keeps_last_good_content_and_others_unaffected(mdir):
    (mdir / "a.yaml").write_text(NS_AND_POD)
    (mdir / "p.yaml").write_text(POLICY)
    c = Collector()
    src = ManifestSource(str(mdir))
    src.start(c)
    try:
        _write(mdir / "p.yaml", BROKEN_POLICY)
        err = wait_for(lambda: c.errors and c.errors[-1], what="error reported")
        msg = err.message
        # file, object and field are named
        assert "p.yaml" in msg and "NetworkPolicy x/allow-web" in msg and "spec.ingress[0].ports[0].port" in msg
        assert err.kind == "NetworkPolicy" and "last good content" in msg
        # The other file still works while this one is broken...
        _write(mdir / "a.yaml", NS_AND_POD.replace("10.233.0.5", "10.233.0.6"))
        wait_for(lambda: str(c.get("Pod")[("x", "web")].ips[0]) == "10.233.0.6", what="other file followed")
        # ...and the broken file's last good policy is still there.
        assert c.get("NetworkPolicy")[("x", "allow-web")].ingress[0].ports[0].port == 80
        # A YAML syntax error is reported too, still keeping the good content.
        _write(mdir / "p.yaml", "kind: [\n")
        wait_for(lambda: "cannot parse" in c.errors[-1].message, what="syntax error reported")
        assert ("x", "allow-web") in c.get("NetworkPolicy")
        # Fixing it takes the new content.
        _write(mdir / "p.yaml", POLICY.replace("port: 80", "port: 8080"))
        wait_for(lambda: c.get("NetworkPolicy")[("x", "allow-web")].ingress[0].ports[0].port == 8080,
                 what="fixed file used")
    finally:
        src.stop()


def test_file_broken_from_the_start_contributes_its_policies_and_fallbacks(mdir):
    (mdir / "a.yaml").write_text(NS_AND_POD)
    (mdir / "p.yaml").write_text(POLICY + "---\n" + BROKEN_POLICY.replace("allow-web", "other"))
    c = Collector()
    src = ManifestSource(str(mdir))
    src.start(c)
    try:
        assert c.in_sync == 1
        # Its policies that parse are enforced as written (NetworkPolicies only add allows,
        # so a subset of a file's policies is never wider than the whole, while dropping
        # them would leave their pods open); the bad one isolates its pods, allowing nothing.
        pols = c.get("NetworkPolicy")
        assert sorted(pols) == [("x", "allow-web"), ("x", "other")]
        assert not pols[("x", "allow-web")].fallback_reason
        assert pols[("x", "other")].fallback_reason and pols[("x", "other")].ingress == ()
        assert len(c.errors) == 1 and "document 2" in c.errors[0].message
        assert ("x", "web") in c.get("Pod")
    finally:
        src.stop()


def test_duplicate_object_reported_first_file_wins(mdir):
    (mdir / "a.yaml").write_text(POLICY)
    (mdir / "b.yaml").write_text(POLICY.replace("port: 80", "port: 81"))
    c = Collector()
    src = ManifestSource(str(mdir))
    src.start(c)
    try:
        assert c.get("NetworkPolicy")[("x", "allow-web")].ingress[0].ports[0].port == 80
        assert any("also defined in a.yaml" in e.message for e in c.errors)
    finally:
        src.stop()


# --- CNI endpoint records -------------------------------------------------------------


def _rec(ns, pod, ips, cid="c1"):
    return ep.EndpointRecord(ns, pod, cid, f"eni{pod}", tuple(ips), created=1.0)


def test_cni_records_scanned_then_watched(tmp_path):
    d = str(tmp_path / "endpoints")
    ep.write_record(d, _rec("x", "a", ["10.233.0.1"]))
    c = Collector()
    src = CniSource(d)
    src.start(c)
    try:
        assert c.in_sync == 1
        assert c.get("Endpoint")[("x", "a")].ips == ("10.233.0.1",)
        ep.write_record(d, _rec("x", "b", ["10.233.0.2", "fd00:233::2"]))
        wait_for(lambda: ("x", "b") in c.get("Endpoint"), what="new record")
        ep.write_record(d, _rec("x", "b", ["10.233.0.3"], cid="c2"))
        wait_for(lambda: c.get("Endpoint")[("x", "b")].container_id == "c2", what="replaced record")
        ep.remove_record(d, "x", "a")
        wait_for(lambda: ("x", "a") not in c.get("Endpoint"), what="record removed")
    finally:
        src.stop()


def test_cni_bad_records_reported_and_ignored(tmp_path):
    d = tmp_path / "endpoints"
    d.mkdir()
    (d / "x.bad.json").write_text("{not json")
    c = Collector()
    src = CniSource(str(d))
    src.start(c)
    try:
        assert c.in_sync == 1 and c.get("Endpoint") == {}
        assert "x.bad.json" in c.errors[0].message
        # Content naming another pod than the file name.
        ep.atomic_write(str(d / "x.one.json"), _rec("x", "two", ["10.233.0.9"]).to_json())
        wait_for(lambda: any("expected file x.two.json" in e.message for e in c.errors), what="mismatch reported")
        assert c.get("Endpoint") == {}
        ep.write_record(str(d), _rec("x", "ok", ["10.233.0.8"]))
        wait_for(lambda: ("x", "ok") in c.get("Endpoint"), what="good record still works")
    finally:
        src.stop()


def test_cni_missing_directory_is_created(tmp_path):
    d = str(tmp_path / "deep" / "endpoints")
    c = Collector()
    src = CniSource(d)
    src.start(c)
    try:
        assert c.in_sync == 1 and os.path.isdir(d)
        ep.write_record(d, _rec("y", "p", ["10.233.0.7"]))
        wait_for(lambda: ("y", "p") in c.get("Endpoint"), what="record in new dir")
    finally:
        src.stop()
