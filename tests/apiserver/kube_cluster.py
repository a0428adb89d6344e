"""Start and drive a local etcd + kube-apiserver (used by conftest.py and bench/agent).

kube-apiserver comes from scripts/build-kube.sh (Debian's kubernetes source
package, cached by version); etcd from Debian's etcd-server. Processes are stopped by pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KUBE_VERSION = os.environ.get("KUBE_VERSION", "1.20.2")
CACHE = Path(os.environ.get("POLICY_AGENT_CACHE", "/var/cache/policy-agent")) / f"kube-{KUBE_VERSION}"
TOKEN = "policy-agent-test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


# Written by scripts/build-kube.sh into binaries that carry its reflect2 fix
# (without it the first custom resource written crashes the server): older ones are rebuilt.
BUILD_STAMP = ".reflect2-go118"


def ensure_binaries() -> Path:
    if not all((CACHE / f).exists() for f in ("kube-apiserver", "kubectl", BUILD_STAMP)):
        print(f"\nbuilding kube-apiserver {KUBE_VERSION} (first run only)...", file=sys.stderr)
        subprocess.run(
            ["bash", str(REPO / "scripts" / "build-kube.sh")],
            check=True,
            env={**os.environ, "KUBE_VERSION": KUBE_VERSION},
        )
    return CACHE


@dataclass
class LocalCluster:
    """etcd + kube-apiserver processes we started (stopped by pid)."""

    workdir: Path
    bin_dir: Path
    etcd_port: int = field(default_factory=_free_port)
    etcd_peer_port: int = field(default_factory=_free_port)
    api_port: int = field(default_factory=_free_port)
    etcd: subprocess.Popen | None = None
    apiserver: subprocess.Popen | None = None

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def make_pki(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir()
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=policy-agent-test-apiserver",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc",
                "-keyout",
                str(pki / "server.key"),
                "-out",
                str(pki / "server.crt"),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(["openssl", "genrsa", "-out", str(pki / "sa.key"), "2048"], check=True, capture_output=True)
        (self.workdir / "tokens.csv").write_text(f'{TOKEN},policy-agent-test,1,"system:masters"\n')

    def start_etcd(self) -> None:
        log = open(self.workdir / "etcd.log", "ab")
        self.etcd = subprocess.Popen(
            [
                "etcd",
                "--name",
                "pa-test",
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                self.etcd_url,
                "--advertise-client-urls",
                self.etcd_url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{self.etcd_peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{self.etcd_peer_port}",
                "--initial-cluster",
                f"pa-test=http://127.0.0.1:{self.etcd_peer_port}",
                "--log-level",
                "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _wait(
            lambda: urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2).status == 200,
            60,
            "etcd /health",
        )

    def start_apiserver(self) -> None:
        pki = self.workdir / "pki"
        log = open(self.workdir / "kube-apiserver.log", "ab")
        self.apiserver = subprocess.Popen(
            [
                str(self.bin_dir / "kube-apiserver"),
                "--etcd-servers",
                self.etcd_url,
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--secure-port",
                str(self.api_port),
                "--insecure-port",
                "0",
                "--tls-cert-file",
                str(pki / "server.crt"),
                "--tls-private-key-file",
                str(pki / "server.key"),
                "--token-auth-file",
                str(self.workdir / "tokens.csv"),
                "--authorization-mode",
                "RBAC",
                "--disable-admission-plugins",
                "ServiceAccount",
                "--service-account-issuer",
                "https://kubernetes.default.svc",
                "--service-account-key-file",
                str(pki / "sa.key"),
                "--service-account-signing-key-file",
                str(pki / "sa.key"),
                "--service-cluster-ip-range",
                "10.233.240.0/24",
                "--endpoint-reconciler-type",
                "none",
                "--etcd-compaction-interval",
                "0",
                "--watch-cache-sizes",
                "networkpolicies.networking.k8s.io#0",
                "--profiling=false",
                "--v",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        ctx = ssl.create_default_context(cafile=str(pki / "server.crt"))

        def ready():
            if self.apiserver.poll() is not None:
                raise RuntimeError(
                    f"kube-apiserver exited {self.apiserver.returncode}; see {self.workdir}/kube-apiserver.log"
                )
            req = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
            return urllib.request.urlopen(req, timeout=5, context=ctx).status == 200

        try:
            _wait(ready, 180, "kube-apiserver /readyz", interval=0.5)
        except (TimeoutError, RuntimeError):
            tail = (self.workdir / "kube-apiserver.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"kube-apiserver did not become ready:\n{tail}") from None

    def stop_apiserver(self) -> None:
        _stop(self.apiserver)
        self.apiserver = None

    def restart_apiserver(self) -> None:
        self.stop_apiserver()
        self.start_apiserver()

    def etcd_revision(self) -> int:
        out = subprocess.run(
            ["etcdctl", "--endpoints", self.etcd_url, "endpoint", "status", "-w", "json"],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "ETCDCTL_API": "3"},
        ).stdout
        return int(json.loads(out)[0]["Status"]["header"]["revision"])

    def compact(self) -> int:
        """Compact etcd up to its current revision: older resourceVersions are gone."""
        rev = self.etcd_revision()
        subprocess.run(
            ["etcdctl", "--endpoints", self.etcd_url, "compact", str(rev), "--physical"],
            check=True,
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        return rev

    def stop(self) -> None:
        _stop(self.apiserver)
        _stop(self.etcd)


def _stop(p: subprocess.Popen | None) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)


@dataclass
class Cluster:
    """What the tests use: a kubeconfig, kubectl, an API client factory, faults."""

    kubeconfig: Path
    kubectl_bin: str
    server: str
    version: str
    local: LocalCluster | None

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        p = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), "--request-timeout=60s", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p.stdout

    def api_client(self, host: str | None = None):
        """An official-client ApiClient from the kubeconfig, optionally via a proxy.

        The proxy is set in the kubeconfig itself (server + tls-server-name): the
        client's token-refresh hook copies the kubeconfig's server back into the
        configuration on every request, so overriding ``configuration.host`` does not stick.
        """
        from urllib.parse import urlparse

        import yaml
        from kubernetes import client, config

        cfg = client.Configuration()
        if host is None:
            config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
            return client.ApiClient(configuration=cfg)
        kc = yaml.safe_load(self.kubeconfig.read_text())
        ctx_name = kc.get("current-context")
        ctx = next(c["context"] for c in kc["contexts"] if c["name"] == ctx_name)
        cl = next(c["cluster"] for c in kc["clusters"] if c["name"] == ctx["cluster"])
        cl.setdefault("tls-server-name", urlparse(cl["server"]).hostname)
        cl["server"] = host
        config.load_kube_config_from_dict(kc, client_configuration=cfg)
        return client.ApiClient(configuration=cfg)

    def server_hostport(self) -> tuple[str, int]:
        from urllib.parse import urlparse

        u = urlparse(self.server)
        return u.hostname, u.port or 443


def _write_kubeconfig(path: Path, server: str, ca: Path) -> None:
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "pa-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
                "users": [{"name": "pa-test", "user": {"token": TOKEN}}],
                "contexts": [{"name": "pa-test", "context": {"cluster": "pa-test", "user": "pa-test"}}],
                "current-context": "pa-test",
            }
        )
    )


def start_local(work: Path) -> Cluster:
    """etcd + kube-apiserver in ``work``, ready, with a kubeconfig; caller stops ``.local``."""
    local = LocalCluster(work, ensure_binaries())
    try:
        local.make_pki()
        local.start_etcd()
        local.start_apiserver()
        kubeconfig = work / "kubeconfig"
        _write_kubeconfig(kubeconfig, local.server, work / "pki" / "server.crt")
        cl = Cluster(kubeconfig, str(local.bin_dir / "kubectl"), local.server, "", local)
        _wait(lambda: cl.kubectl("get", "namespace", "default", "-o", "name").strip(), 120, "namespace default")
        cl.version = cl.kubectl("version", "-o", "json")
        return cl
    except BaseException:
        local.stop()
        raise
