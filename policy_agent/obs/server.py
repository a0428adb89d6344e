"""Health, readiness, metrics and status over HTTP (localhost by default).

  GET /livez    200 while the agent loop runs (it iterates at least once a second)
  GET /readyz   200 once the first apply after every source was in sync is done and while
                applies are not failing (N in a row, or a change waiting too long); else 503
                with the reason in the body. /livez stays 200 then: a restart would not help.
  GET /metrics  Prometheus text format
  GET /status   JSON: in sync?, last apply time and duration, pending events, errors, counts
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

log = structlog.get_logger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type, agent: Any) -> None:
        if ":" in addr[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)
        self.agent = agent


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, fmt: str, *args: Any) -> None:  # route to structlog, quietly
        log.debug("http_request", client=self.client_address[0], line=fmt % args)

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        agent = self.server.agent
        path = self.path.split("?", 1)[0]
        try:
            if path == "/livez":
                ok = agent.alive
                self._send(200 if ok else 503, b"ok\n" if ok else b"agent loop not running\n")
            elif path == "/readyz":
                ok, why = agent.readiness()
                self._send(200 if ok else 503, f"{why}\n".encode())
            elif path == "/metrics":
                self._send(200, agent.metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/status":
                body = json.dumps(agent.status(), sort_keys=True, indent=2).encode() + b"\n"
                self._send(200, body, "application/json")
            else:
                self._send(404, b"not found: try /livez /readyz /metrics /status\n")
        except BrokenPipeError:
            pass
        except Exception as exc:  # an HTTP bug must not take the agent down
            log.exception("http_handler_failed", path=path)
            self._send(500, f"internal error: {exc}\n".encode())


class ObsServer:
    def __init__(self, agent: Any, bind: str = "127.0.0.1", port: int = 9909) -> None:
        self._httpd = _Server((bind, port), _Handler, agent)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="obs-http", daemon=True)
        self._thread.start()
        log.info("obs_server_listening", url=self.url)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)


def fetch_status(url: str, timeout: float = 5.0, opener: Callable | None = None) -> dict[str, Any]:
    """GET <url>/status and decode it (used by ``policy-agent status``)."""
    import urllib.request

    with (opener or urllib.request.urlopen)(url.rstrip("/") + "/status", timeout=timeout) as resp:
        return json.loads(resp.read().decode())
