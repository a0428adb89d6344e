"""The control plane in pa-cl-ctl: PKI, kubeconfigs, etcd, kube-apiserver, controller-manager,
scheduler, and the root-loopback forwarder that makes the API server reachable from the root
namespace without a link or route there.

Processes run under `nsenter --net=/run/netns/pa-cl-ctl` (they need no cgroup or mount
namespace of their own), in their own session so they outlive `cluster.sh up`; every pid is
recorded before we wait on it. Certificates are EC P-256 (fast to make on a busy machine);
the service-account key pair is RSA 2048.
"""

from __future__ import annotations

import base64
import contextlib
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog
import yaml

from policy_agent.lab.cluster import network
from policy_agent.shared import netns as shared_netns

log = structlog.get_logger(__name__)

API_PORT = 6443
ETCD_CLIENT = "http://127.0.0.1:2379"
ETCD_PEER = "http://127.0.0.1:2380"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
KUBERNETES_SVC_IP = "10.96.0.1"
DAYS = "3650"
_REPO = Path(__file__).resolve().parents[3]

Record = Callable[[str, object], None]


class ControlError(RuntimeError):
    """A control-plane step failed; the message names the step and the log to read."""


# --- PKI ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    dir: Path

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.crt("ca")


def _openssl(*args: str) -> None:
    p = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise ControlError(f"openssl {' '.join(args[:2])} failed: {p.stderr.strip()[-800:]}")


def _cert(pki: Pki, name: str, subject: dict, usage: str, sans: list[str] = (), ca: bool = False) -> None:
    """One certificate + EC key, signed by the CA (or self-signed for the CA itself)."""
    cfg = pki.dir / f"{name}.cnf"
    dn = "\n".join(f"{k} = {v}" for k, v in subject.items())
    ext = ["basicConstraints = critical,CA:TRUE" if ca else "basicConstraints = critical,CA:FALSE",
           "keyUsage = critical,keyCertSign,cRLSign,digitalSignature" if ca
           else "keyUsage = critical,digitalSignature,keyEncipherment",
           "subjectKeyIdentifier = hash"]
    if not ca:
        ext.append(f"extendedKeyUsage = {usage}")
    if sans:
        ext.append("subjectAltName = " + ",".join(sans))
    cfg.write_text(f"[req]\nprompt = no\ndistinguished_name = dn\n[dn]\n{dn}\n[ext]\n" + "\n".join(ext) + "\n")
    args = ["req", "-x509", "-new", "-config", str(cfg), "-extensions", "ext", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", DAYS,
            "-keyout", str(pki.key(name)), "-out", str(pki.crt(name))]
    if not ca:
        args += ["-CA", str(pki.ca), "-CAkey", str(pki.key("ca"))]
    _openssl(*args)
    os.chmod(pki.key(name), 0o600)
    cfg.unlink()


def make_pki(pki_dir: Path, node_names: list[str]) -> Pki:
    """CA, serving and client certificates, and the service-account key pair."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(pki_dir, 0o700)
    pki = Pki(pki_dir)
    _cert(pki, "ca", {"CN": "policy-agent-cluster-ca"}, "", ca=True)
    sans = ["DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local", "DNS:localhost",
            f"IP:{network.CTL_IP}", f"IP:{KUBERNETES_SVC_IP}", "IP:127.0.0.1"]
    _cert(pki, "apiserver", {"CN": "kube-apiserver"}, "serverAuth", sans)
    # system:masters: the kubelet's Webhook authorizer then needs no extra RBAC (as kubeadm).
    _cert(pki, "apiserver-kubelet-client", {"O": "system:masters", "CN": "kube-apiserver-kubelet-client"},
          "clientAuth")
    _cert(pki, "admin", {"O": "system:masters", "CN": "admin"}, "clientAuth")
    _cert(pki, "controller-manager", {"CN": "system:kube-controller-manager"}, "clientAuth")
    _cert(pki, "scheduler", {"CN": "system:kube-scheduler"}, "clientAuth")
    _cert(pki, "kube-proxy", {"CN": "system:kube-proxy"}, "clientAuth")
    for n in node_names:
        _cert(pki, f"kubelet-{n}", {"O": "system:nodes", "CN": f"system:node:{n}"}, "clientAuth")
    _openssl("genrsa", "-out", str(pki.key("sa")), "2048")
    os.chmod(pki.key("sa"), 0o600)
    _openssl("rsa", "-in", str(pki.key("sa")), "-pubout", "-out", str(pki.dir / "sa.pub"))
    return pki


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, pki: Pki, user: str, name: str = "pa-cluster") -> Path:
    """A kubeconfig with the CA and the client certificate inline (it can be copied anywhere)."""
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": _b64(pki.ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": _b64(pki.crt(user)),
                                          "client-key-data": _b64(pki.key(user))}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user}}],
        "current-context": name,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    os.chmod(path, 0o600)
    return path


# --- processes ------------------------------------------------------------------------


def spawn(argv: list[str], log_path: Path, record: Record, name: str, netns: str | None = None,
          env: dict | None = None) -> int:
    """Start argv (inside ``netns`` via nsenter, which execs: the pid is the program's),
    detached in its own session; the pid is recorded at once."""
    full = ["nsenter", f"--net={shared_netns.NETNS_DIR}/{netns}", "--", *argv] if netns else argv
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(_REPO), env=env)
    record("pid", {"pid": proc.pid, "name": name})
    # Popen's object is dropped: the process outlives us; `down` stops it by its recorded pid.
    proc.returncode = 0
    return proc.pid


def alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class ControlPlane:
    work: Path
    kube_bin: Path
    pki: Pki
    admin_kubeconfig: Path
    ctl_kubeconfigs: dict  # user -> kubeconfig used inside pa-cl-ctl
    forward_port: int
    pids: dict  # component -> pid

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.forward_port}"

    def log(self, component: str) -> Path:
        return self.work / "logs" / f"{component}.log"


def _argv(cp: ControlPlane, component: str) -> list[str]:
    pki, b = cp.pki, cp.kube_bin
    if component == "etcd":
        return ["etcd", "--name", "ctl", "--data-dir", str(cp.work / "etcd"),
                "--listen-client-urls", ETCD_CLIENT, "--advertise-client-urls", ETCD_CLIENT,
                "--listen-peer-urls", ETCD_PEER, "--initial-advertise-peer-urls", ETCD_PEER,
                "--initial-cluster", f"ctl={ETCD_PEER}", "--log-level", "warn"]
    if component == "kube-apiserver":
        return [str(b / "kube-apiserver"), "--etcd-servers", ETCD_CLIENT,
                "--advertise-address", network.CTL_IP, "--bind-address", "0.0.0.0",
                "--secure-port", str(API_PORT), "--insecure-port", "0",
                "--client-ca-file", str(pki.ca),
                "--tls-cert-file", str(pki.crt("apiserver")), "--tls-private-key-file", str(pki.key("apiserver")),
                "--kubelet-client-certificate", str(pki.crt("apiserver-kubelet-client")),
                "--kubelet-client-key", str(pki.key("apiserver-kubelet-client")),
                "--kubelet-preferred-address-types", "InternalIP,Hostname",
                "--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction",
                "--allow-privileged=true", "--service-cluster-ip-range", network.SERVICE_CIDR,
                "--service-account-issuer", SA_ISSUER,
                "--service-account-key-file", str(pki.dir / "sa.pub"),
                "--service-account-signing-key-file", str(pki.key("sa")),
                "--profiling=false", "--v", "1"]
    if component == "kube-controller-manager":
        kc = str(cp.ctl_kubeconfigs["controller-manager"])
        return [str(b / "kube-controller-manager"), "--kubeconfig", kc,
                "--authentication-kubeconfig", kc, "--authorization-kubeconfig", kc,
                "--bind-address", "127.0.0.1", "--address", "127.0.0.1", "--leader-elect=false",
                "--use-service-account-credentials=true",
                "--service-account-private-key-file", str(pki.key("sa")), "--root-ca-file", str(pki.ca),
                "--cluster-signing-cert-file", str(pki.ca), "--cluster-signing-key-file", str(pki.key("ca")),
                "--cluster-cidr", network.VPC_CIDR, "--allocate-node-cidrs=false",
                "--service-cluster-ip-range", network.SERVICE_CIDR,
                "--profiling=false", "--v", "1"]
    if component == "kube-scheduler":
        kc = str(cp.ctl_kubeconfigs["scheduler"])
        return [str(b / "kube-scheduler"), "--kubeconfig", kc,
                "--authentication-kubeconfig", kc, "--authorization-kubeconfig", kc,
                "--bind-address", "127.0.0.1", "--address", "127.0.0.1", "--leader-elect=false",
                "--profiling=false", "--v", "1"]
    raise ValueError(f"unknown component {component!r}")


COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
HEALTH_PORTS = {"kube-controller-manager": 10257, "kube-scheduler": 10259}


def prepare(work: Path, kube_bin: Path, node_names: list[str]) -> ControlPlane:
    """PKI and kubeconfigs (files only)."""
    pki = make_pki(work / "pki", node_names)
    inside = f"https://{network.CTL_IP}:{API_PORT}"
    kcs = {u: write_kubeconfig(work / "kubeconfigs" / f"{u}.kubeconfig", inside, pki, u)
           for u in ("controller-manager", "scheduler", "kube-proxy", "admin")}
    for n in node_names:
        kcs[f"kubelet-{n}"] = write_kubeconfig(work / "kubeconfigs" / f"kubelet-{n}.kubeconfig", inside, pki,
                                               f"kubelet-{n}")
    return ControlPlane(work, kube_bin, pki, work / "admin.kubeconfig", kcs, 0, {})


def start(cp: ControlPlane, record: Record) -> None:
    """Start etcd, kube-apiserver (it waits for etcd by itself) and the forwarder; returns
    without waiting (``wait_ready``). The controller-manager and the scheduler come after the
    API server is ready (``start_controllers``): they exit if it does not answer at start."""
    for c in ("etcd", "kube-apiserver"):
        cp.pids[c] = spawn(_argv(cp, c), cp.log(c), record, c, netns=network.CTL_NS)
    cp.forward_port, cp.pids["forwarder"] = start_forwarder(cp.work, record)
    write_kubeconfig(cp.admin_kubeconfig, cp.server, cp.pki, "admin")


def start_controllers(cp: ControlPlane, record: Record) -> None:
    for c in ("kube-controller-manager", "kube-scheduler"):
        cp.pids[c] = spawn(_argv(cp, c), cp.log(c), record, c, netns=network.CTL_NS)


def _https_ok(url: str, ctx: ssl.SSLContext, netns: str | None = None, timeout: float = 3.0) -> bool:
    with shared_netns.in_netns(netns):
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False


def _tail(path: Path, n: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def wait_ready(cp: ControlPlane, components: tuple[str, ...], timeout: float = 180.0) -> dict:
    """Poll until each of ``components`` is ready: the API server's /readyz through the
    forwarder, the controller-manager's and scheduler's /healthz inside pa-cl-ctl; returns
    seconds each took. Fails naming the component, with the tail of its log, if one exits or
    the time runs out."""
    t0 = time.monotonic()
    admin = ssl.create_default_context(cafile=str(cp.pki.ca))
    admin.load_cert_chain(str(cp.pki.crt("admin")), str(cp.pki.key("admin")))
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    checks = {}
    for c in components:
        if c == "kube-apiserver":
            checks[c] = lambda: _https_ok(f"{cp.server}/readyz", admin)
        else:
            checks[c] = (lambda port=HEALTH_PORTS[c]: _https_ok(f"https://127.0.0.1:{port}/healthz", insecure,
                                                                network.CTL_NS))
    took: dict = {}
    deadline = t0 + timeout
    while checks:
        for c in list(checks):
            if checks[c]():
                took[c] = round(time.monotonic() - t0, 1)
                del checks[c]
        for c, pid in cp.pids.items():
            if not alive(pid):
                what = "forwarder" if c == "forwarder" else c
                raise ControlError(f"{what} (pid {pid}) exited during start-up; {cp.log(what)}:\n{_tail(cp.log(what))}")
        if not checks:
            break
        if time.monotonic() > deadline:
            c = next(iter(checks))
            raise ControlError(f"timed out after {timeout:.0f}s waiting for {', '.join(checks)}; "
                               f"{cp.log(c)}:\n{_tail(cp.log(c))}")
        time.sleep(0.25)
    log.info("cluster_control_plane_ready", seconds=took)
    return took


# --- the root-loopback forwarder -------------------------------------------------------


def start_forwarder(work: Path, record: Record) -> tuple[int, int]:
    """A listening socket on 127.0.0.1 (root namespace), handed to a detached
    `python -m policy_agent.lab.cluster forward` that connects each client inside pa-cl-ctl."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    port = lsock.getsockname()[1]
    fd = lsock.fileno()
    os.set_inheritable(fd, True)
    argv = [sys.executable, "-m", "policy_agent.lab.cluster", "forward", "--fd", str(fd),
            "--netns", network.CTL_NS, "--to", f"{network.CTL_IP}:{API_PORT}"]
    log_path = work / "logs" / "forwarder.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(_REPO)}
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(_REPO), pass_fds=(fd,), env=env)
    record("pid", {"pid": proc.pid, "name": "forwarder"})
    proc.returncode = 0
    lsock.close()
    return port, proc.pid


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both directions are closed (half-close passed on)."""
    open_r = {a: b, b: a}
    try:
        while open_r:
            ready, _, _ = select.select(list(open_r), [], [], 300)
            if not ready:
                continue
            for s in ready:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                peer = open_r.get(s)
                if peer is None:
                    continue
                if data:
                    try:
                        peer.sendall(data)
                        continue
                    except OSError:
                        return
                del open_r[s]
                with contextlib.suppress(OSError):
                    peer.shutdown(socket.SHUT_WR)
    finally:
        a.close()
        b.close()


def serve_forwarder(fd: int, netns: str, to: str) -> None:
    """Accept on the inherited socket; each connection's upstream socket is made in ``netns``."""
    host, port = to.rsplit(":", 1)
    lsock = socket.socket(fileno=fd)
    target = os.open(os.path.join(shared_netns.NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)

    def one(client: socket.socket) -> None:
        try:
            with shared_netns.entered(target):
                up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.settimeout(10)
            up.connect((host, int(port)))
            up.settimeout(None)
        except OSError as exc:
            print(f"forward_connect_failed to={to} error={exc}", file=sys.stderr, flush=True)
            client.close()
            return
        for s in (client, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _pump(client, up)

    print(f"forwarder_ready listen={lsock.getsockname()} netns={netns} to={to}", file=sys.stderr, flush=True)
    while True:
        client, _ = lsock.accept()
        threading.Thread(target=one, args=(client,), daemon=True).start()
