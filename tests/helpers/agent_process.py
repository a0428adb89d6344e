"""Waiting, atomic manifest writes, and `policy-agent run` as a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable


def wait_for(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_atomic(path, text: str) -> None:
    """Replace ``path`` in one rename, so an inotify watcher never reads half a file."""
    tmp = str(path) + ".tmp~"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """`policy-agent run --manifests` as a real process in the node namespace.

    Files live under ``tmp_path``: manifests/, ep/, st/, agent.log and (unless
    ``state_file`` is False) dataplane.json.
    """

    def __init__(self, node_ns: str, tmp_path, extra_env: dict | None = None, state_file: bool = True) -> None:
        self.node_ns = node_ns
        self.mdir = tmp_path / "manifests"
        self.mdir.mkdir(exist_ok=True)
        self.log_path = tmp_path / "agent.log"
        self.port = free_port()
        self.env = {**os.environ, "POLICY_AGENT_METRICS_PORT": str(self.port),
                    "POLICY_AGENT_REFRESH_INTERVAL": "5", **(extra_env or {})}
        self.argv = [sys.executable, "-m", "policy_agent.cli", "--log-format", "json", "run", "--node", "n1",
                     "--manifests", str(self.mdir), "--netns", node_ns,
                     "--endpoint-dir", str(tmp_path / "ep"), "--status-dir", str(tmp_path / "st")]
        if state_file:
            self.argv += ["--state-file", str(tmp_path / "dataplane.json")]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self.ready, 90, "agent ready")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            return False

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if d.get("event") == name:
                out.append(d)
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
