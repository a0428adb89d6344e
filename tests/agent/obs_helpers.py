"""Clients for the agent's endpoints in tests: TCP URLs and the Unix socket."""

from __future__ import annotations

import contextlib
import http.client
import shutil
import socket
import tempfile
from typing import Iterator
from urllib.parse import urlsplit

def http_get(target: str, path: str, timeout: float = 10.0) -> tuple[int, str, str]:
    """(status, content type, body) from a base URL or a Unix socket path."""
    if target.startswith("/"):
        conn: http.client.HTTPConnection = _UnixConnection(target, timeout)
    else:
        u = urlsplit(target)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    finally:
        conn.close()


class _UnixConnection(http.client.HTTPConnection):
    # Independent of policy_agent.obs.server.UnixHTTPConnection on purpose: the test client
    # must not share a bug with the code under test.
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


@contextlib.contextmanager
def short_dir() -> Iterator[str]:
    """A short private directory (0700) for a Unix socket: pytest's tmp_path can exceed 107 bytes."""
    d = tempfile.mkdtemp(prefix="pa-h6-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
