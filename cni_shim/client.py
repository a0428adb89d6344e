"""The executable's side of the daemon socket: one JSON line out, one JSON line back. Stdlib only."""

from __future__ import annotations

import json
import socket
from typing import Any

MAX_LINE = 4 << 20


class DaemonUnavailable(Exception):
    """Nobody listens on the socket: nothing was asked, nothing was built."""


class DaemonFailed(Exception):
    """The daemon took the request but gave no (complete) answer."""


def call(path: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError, socket.timeout) as exc:
            raise DaemonUnavailable(f"vpcip-ipamd is not reachable at {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise DaemonFailed("vpcip-ipamd answer too long")
        except socket.timeout:
            raise DaemonFailed(f"vpcip-ipamd did not answer within {timeout:g}s") from None
        except OSError as exc:
            raise DaemonFailed(f"vpcip-ipamd connection failed: {exc}") from None
        if not buf.endswith(b"\n"):
            raise DaemonFailed("vpcip-ipamd closed the connection without an answer")
        try:
            answer = json.loads(buf)
        except ValueError:
            raise DaemonFailed("vpcip-ipamd sent a malformed answer") from None
        if not isinstance(answer, dict):
            raise DaemonFailed("vpcip-ipamd sent a malformed answer")
        return answer
    finally:
        sock.close()
