"""Helpers for the CNI tests: a node netns running vpcip-ipamd, pod netns, the real vpcip-cni."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

VENV_BIN = os.path.dirname(sys.executable)
VPCIP_CNI = os.path.join(VENV_BIN, "vpcip-cni")
VPCIP_IPAMD = os.path.join(VENV_BIN, "vpcip-ipamd")
CNI_BIN = "/usr/lib/cni"

_counter = itertools.count()


def have_root_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


kernel = pytest.mark.skipif(not have_root_netns(), reason="needs root and iproute2")


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def pool_doc(enis: int = 2, per_eni: int = 4, limits: tuple[int, int] | None = (3, 10), base: int = 200,
             ipv6: bool = True) -> dict:
    """ENIs numbered from 0; ENI d gets 10.233.(base+d).11.. and fd00:233::(base+d):11.."""
    doc: dict = {"enis": []}
    if limits:
        doc["limits"] = {"maxENIs": limits[0], "ipsPerENI": limits[1]}
    for d in range(enis):
        e = {
            "id": f"eni-{d}",
            "deviceNumber": d,
            "primaryIP": f"10.233.{base + d}.10",
            "secondaryIPs": [f"10.233.{base + d}.{11 + i}" for i in range(per_eni)],
        }
        if ipv6:
            e["secondaryIPv6"] = [f"fd00:233::{base + d}:{11 + i:x}" for i in range(per_eni)]
        doc["enis"].append(e)
    return doc


@dataclass
class Lab:
    tag: str
    tmp: str
    node: str
    socket: str
    state_dir: str
    pool_file: str
    endpoint_dir: str
    status_dir: str
    daemon: subprocess.Popen | None = None
    daemon_log: str = ""
    netns: list[str] = field(default_factory=list)
    extra_conf: dict = field(default_factory=dict)

    # --- namespaces ----------------------------------------------------------------
    def new_pod_netns(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        sh("ip", "netns", "add", ns)
        self.netns.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def in_node(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.node, *args, check=check)

    # --- daemon --------------------------------------------------------------------
    def start_daemon(self, *extra: str, env: dict | None = None, wait: bool = True) -> subprocess.Popen:
        log = open(self.daemon_log, "a")
        self.daemon = subprocess.Popen(
            ["ip", "netns", "exec", self.node, VPCIP_IPAMD, "--socket", self.socket, "--state-dir",
             self.state_dir, "--pool-file", self.pool_file, "--log-format", "json", "--cooldown-seconds", "0",
             *extra],
            stdout=log, stderr=log, env={**os.environ, **(env or {})},
        )
        log.close()
        if wait:
            self.wait_daemon()
        return self.daemon

    def wait_daemon(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.daemon is not None and self.daemon.poll() is not None:
                raise AssertionError(f"vpcip-ipamd exited {self.daemon.returncode}: {self.log_text()}")
            try:
                if self.ask({"op": "ping"}).get("ok"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"vpcip-ipamd did not come up: {self.log_text()}")

    def stop_daemon(self, sig: int = signal.SIGTERM) -> None:
        if self.daemon is None:
            return
        if self.daemon.poll() is None:
            self.daemon.send_signal(sig)
            try:
                self.daemon.wait(20)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(20)
        self.daemon = None

    def log_text(self) -> str:
        try:
            with open(self.daemon_log) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def ask(self, msg: dict, timeout: float = 30.0) -> dict:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.socket)
            s.sendall(json.dumps(msg).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return json.loads(buf)
        finally:
            s.close()

    def dump(self) -> dict:
        return self.ask({"op": "dump"})["result"]

    # --- CNI -----------------------------------------------------------------------
    def conf(self, version: str = "1.0.0", **over) -> dict:
        c = {
            "cniVersion": version, "name": "vpcip-test", "type": "vpcip-cni", "ipamSocket": self.socket,
            "endpointDir": self.endpoint_dir, "statusDir": self.status_dir, "mtu": 1500,
        }
        c.update(self.extra_conf)
        c.update(over)
        return c

    def env(self, command: str, cid: str = "", netns: str = "", pod: str = "", ns: str = "default",
            ifname: str = "eth0", uid: str = "") -> dict:
        e = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        e.update(CNI_COMMAND=command, CNI_PATH=CNI_BIN, CNI_IFNAME=ifname)
        if cid:
            e["CNI_CONTAINERID"] = cid
        if netns:
            e["CNI_NETNS"] = netns if netns.startswith("/") else f"/var/run/netns/{netns}"
        if pod:
            e["CNI_ARGS"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={cid}"
            if uid:
                e["CNI_ARGS"] += f";K8S_POD_UID={uid}"
        return e

    def cni(self, command: str, conf: dict | str | None = None, **envkw) -> tuple[int, dict | None, str]:
        """Run the real executable; returns (exit code, parsed stdout or None, stderr)."""
        stdin = conf if isinstance(conf, str) else json.dumps(conf if conf is not None else self.conf())
        p = subprocess.run([VPCIP_CNI], input=stdin, env=self.env(command, **envkw), capture_output=True,
                           text=True, timeout=120)
        out = json.loads(p.stdout) if p.stdout.strip() else None
        return p.returncode, out, p.stderr

    def add_pod(self, pod: str, ns: str = "default", **conf_over) -> tuple[str, dict]:
        netns = self.new_pod_netns(pod)
        rc, out, err = self.cni("ADD", self.conf(**conf_over), cid=f"cid-{pod}", netns=netns, pod=pod, ns=ns)
        assert rc == 0, (out, err, self.log_text())
        return netns, out

    def del_pod(self, pod: str, netns: str, ns: str = "default") -> None:
        rc, out, err = self.cni("DEL", cid=f"cid-{pod}", netns=netns, pod=pod, ns=ns)
        assert rc == 0 and out is None, (out, err)
