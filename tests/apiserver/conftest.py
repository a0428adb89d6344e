"""A real kube-apiserver + etcd on 127.0.0.1 for the session (or ``$KUBECONFIG``'s cluster).

Local cluster: etcd (Debian ``etcd-server``) on random loopback ports with its data in a
tmp dir; kube-apiserver built from Debian's ``kubernetes`` source package by
scripts/build-kube.sh (cached by version under /var/cache/policy-agent), TLS
with a self-signed certificate made here, a static token (system:masters), the
ServiceAccount admission plugin disabled (no controller-manager to create the
``default`` ServiceAccount). NetworkPolicies are served without the watch cache
(``--watch-cache-sizes=networkpolicies...#0``) so that a compacted etcd revision
gives a deterministic ``410 Gone`` on resume; Pods and Namespaces use the watch cache
(bookmarks, cache-window 410s), as clusters do.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from kube_cluster import Cluster, ensure_binaries, start_local


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, request):
    external = os.environ.get("KUBECONFIG")
    if external:
        kubectl = shutil.which("kubectl") or str(ensure_binaries() / "kubectl")
        cl = Cluster(Path(external), kubectl, "", "", None)
        cl.server = cl.api_client().configuration.host
        cl.version = cl.kubectl("version", "-o", "json")
        _report(request, f"external cluster from KUBECONFIG={external}: {_server_version(cl)}")
        try:
            yield cl
        finally:
            from kube_helpers import TEST_LABEL

            cl.kubectl("delete", "namespace", "-l", f"{TEST_LABEL}={os.getpid()}", "--wait=false", check=False)
        return
    if os.geteuid() != 0:
        pytest.skip("needs root to build/run the local kube-apiserver (or set KUBECONFIG)")
    if shutil.which("etcd") is None:
        pytest.skip("etcd not installed (Debian etcd-server; scripts/setup.sh installs it)")
    local = None
    try:
        cl = start_local(tmp_path_factory.mktemp("kube"))
        local = cl.local
        _report(request, f"local kube-apiserver at {cl.server}: {_server_version(cl)}")
        yield cl
    finally:
        if local is not None:
            local.stop()


def _server_version(cl: Cluster) -> str:
    try:
        v = json.loads(cl.version)["serverVersion"]
        return f"server {v['gitVersion']} ({v.get('platform', '')}, {v.get('goVersion', '')})"
    except Exception:  # noqa: BLE001
        return "server version unknown"


_REPORTED: list[str] = []


def _report(request, line: str) -> None:
    """Print past output capture now, and again in the terminal summary."""
    _REPORTED.append(line)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(f"\n[apiserver] {line}", flush=True)
    else:
        print(f"[apiserver] {line}")


def pytest_terminal_summary(terminalreporter):
    for line in _REPORTED:
        terminalreporter.write_line(f"[apiserver] {line}")


@pytest.fixture
def proxy(cluster):
    """A fault-injecting loopback TCP proxy in front of the API server."""
    from kube_proxy import TcpProxy

    host, port = cluster.server_hostport()
    p = TcpProxy(host, port)
    yield p
    p.close()
