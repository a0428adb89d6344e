"""etcd + kube-apiserver for `policy-agent lab up --apiserver` (processes stopped by pid).

The same server the agent's tests use: kube-apiserver built from Debian's `kubernetes`
source package by scripts/build-kube.sh (cached under /var/cache/policy-agent),
etcd from Debian's etcd-server; TLS with a self-signed certificate, a static token
(system:masters), the ServiceAccount admission plugin off (no controller-manager). Both
listen on free 127.0.0.1 ports; their data, certificate and kubeconfig live in the lab's
state directory and their pids in its state.json, so `lab down` stops them after a crash.
As there is no kubelet, the lab sets spec.nodeName and writes status.podIPs itself.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.request

import yaml

KUBE_VERSION = os.environ.get("KUBE_VERSION", "1.20.2")
TOKEN = "policy-agent-lab-token"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ApiserverError(RuntimeError):
    pass


def bin_dir(build: bool = True) -> str:
    cache = os.path.join(os.environ.get("POLICY_AGENT_CACHE", "/var/cache/policy-agent"), f"kube-{KUBE_VERSION}")
    # The stamp marks binaries built with the script's reflect2 fix (custom resources).
    if not all(os.path.exists(os.path.join(cache, f)) for f in ("kube-apiserver", ".reflect2-go118")):
        script = os.path.join(_REPO, "scripts", "build-kube.sh")
        if not build or not os.path.exists(script):
            raise ApiserverError(f"kube-apiserver {KUBE_VERSION} is not built ({cache}); run scripts/build-kube.sh")
        print(f"building kube-apiserver {KUBE_VERSION} (first time only, a few minutes)...", flush=True)
        subprocess.run(["bash", script], check=True, env={**os.environ, "KUBE_VERSION": KUBE_VERSION})
    return cache


def kubectl_bin() -> str:
    local = os.path.join(bin_dir(build=False), "kubectl")
    if os.path.exists(local):
        return local
    found = shutil.which("kubectl")
    if not found:
        raise ApiserverError("kubectl not found")
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last = exc
        if pid and not os.path.exists(f"/proc/{pid}"):
            raise ApiserverError(f"{what}: the process exited")
        time.sleep(0.3)
    raise ApiserverError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


def start(workdir: str, spawn, record) -> dict:
    """Start etcd and kube-apiserver; ``spawn(argv, log)`` -> pid, ``record(key, pid)`` saves it
    at once (crash safety). Returns {"server", "kubeconfig", "ca"}."""
    bins = bin_dir()
    os.makedirs(workdir, exist_ok=True)
    pki = os.path.join(workdir, "pki")
    os.makedirs(pki, exist_ok=True)
    crt, key, sa = (os.path.join(pki, n) for n in ("server.crt", "server.key", "sa.key"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                    "-subj", "/CN=policy-agent-lab-apiserver",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", key, "-out", crt], check=True, capture_output=True)
    subprocess.run(["openssl", "genrsa", "-out", sa, "2048"], check=True, capture_output=True)
    tokens = os.path.join(workdir, "tokens.csv")
    with open(tokens, "w") as f:
        f.write(f'{TOKEN},lab-admin,1,"system:masters"\n')
    os.chmod(tokens, 0o600)

    etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    pid = spawn(["etcd", "--name", "palab", "--data-dir", os.path.join(workdir, "etcd"),
                 "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                 "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                 "--initial-cluster", f"palab=http://127.0.0.1:{peer_port}", "--log-level", "warn"],
                os.path.join(workdir, "etcd.log"))
    record("etcd", pid)
    _wait(lambda: urllib.request.urlopen(f"{etcd_url}/health", timeout=2).status == 200, 60, "etcd /health", pid)

    server = f"https://127.0.0.1:{api_port}"
    argv = [os.path.join(bins, "kube-apiserver"), "--etcd-servers", etcd_url,
                 "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
                 "--secure-port", str(api_port), "--insecure-port", "0",
                 "--tls-cert-file", crt, "--tls-private-key-file", key, "--token-auth-file", tokens,
                 "--authorization-mode", "RBAC", "--disable-admission-plugins", "ServiceAccount",
                 "--service-account-issuer", "https://kubernetes.default.svc",
                 "--service-account-key-file", sa, "--service-account-signing-key-file", sa,
                 "--service-cluster-ip-range", "10.233.240.0/24", "--endpoint-reconciler-type", "none",
                 "--profiling=false", "--v", "1"]
    info = {"server": server, "ca": crt, "argv": argv, "log": os.path.join(workdir, "kube-apiserver.log")}
    launch(info, spawn, record)
    kubeconfig = os.path.join(workdir, "kubeconfig")
    with open(kubeconfig, "w") as f:
        yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "lab", "cluster": {"server": server, "certificate-authority": crt}}],
            "users": [{"name": "lab-admin", "user": {"token": TOKEN}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab-admin"}}],
            "current-context": "lab",
        }, f)
    os.chmod(kubeconfig, 0o600)
    _wait(lambda: kubectl(kubeconfig, "get", "namespace", "default", "-o", "name").returncode == 0, 120,
          "namespace default")
    return {**info, "kubeconfig": kubeconfig}


def ready(info: dict, timeout: float = 5.0) -> bool:
    """The apiserver answers /readyz with 200."""
    ctx = ssl.create_default_context(cafile=info["ca"])
    req = urllib.request.Request(f"{info['server']}/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        return urllib.request.urlopen(req, timeout=timeout, context=ctx).status == 200
    except (OSError, ValueError):
        return False


def launch(info: dict, spawn, record, timeout: float = 240) -> int:
    """Start kube-apiserver from ``info`` (``start``'s argv, same port and data); returns once ready.
    Also how the lab brings it back after stopping it (the churn benchmark's outage)."""
    pid = spawn(info["argv"], info["log"])
    record("kube-apiserver", pid)
    _wait(lambda: ready(info), timeout, f"kube-apiserver /readyz (see {info['log']})", pid)
    return pid


def _as_json_list(docs: list[dict]) -> str:
    # JSON, not YAML: kubectl's YAML 1.1 reads an unquoted `y` (namespace y!) as a boolean.
    import json

    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def kubectl(kubeconfig: str, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl_bin(), "--kubeconfig", kubeconfig, "--request-timeout=60s", *args],
                          input=input, capture_output=True, text=True, timeout=timeout)


def apply_objects(kubeconfig: str, docs: list[dict]) -> None:
    if not docs:
        return
    p = kubectl(kubeconfig, "apply", "-f", "-", input=_as_json_list(docs))
    if p.returncode != 0:
        raise ApiserverError(f"kubectl apply failed: {p.stderr.strip()}")


def delete_objects(kubeconfig: str, docs: list[dict]) -> None:
    if not docs:
        return
    p = kubectl(kubeconfig, "delete", "--ignore-not-found", "--wait=false", "-f", "-", input=_as_json_list(docs))
    if p.returncode != 0:
        raise ApiserverError(f"kubectl delete failed: {p.stderr.strip()}")


def set_pod_status(server: str, ca: str, namespace: str, name: str, ips: list[str]) -> None:
    """What a kubelet does: PATCH the status subresource with the pod's phase and IPs."""
    import json

    body = json.dumps({"status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}}).encode()
    req = urllib.request.Request(f"{server}/api/v1/namespaces/{namespace}/pods/{name}/status", data=body, method="PATCH",
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/merge-patch+json"})
    ctx = ssl.create_default_context(cafile=ca)
    with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
        if resp.status != 200:
            raise ApiserverError(f"pod {namespace}/{name} status patch: HTTP {resp.status}")
