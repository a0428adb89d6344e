"""Health, readiness, metrics and status over HTTP: TCP on localhost, and a root-only Unix socket.

  GET /livez    200 while the agent loop runs (it iterates at least once a second)
  GET /readyz   200 once the first apply after every source was in sync is done and while
                applies are not failing (N in a row, or a change waiting too long); else 503
                with the reason in the body. /livez stays 200 then: a restart would not help.
  GET /metrics  Prometheus text format (counts and durations; no pod or policy names). The one
                free-text metric, the last apply error, is left out where /status is.
  GET /status   JSON: in sync?, last apply time and duration, pending events, errors, counts.
                It names pods and policies and carries raw kernel errors, so it is served on
                the Unix socket (0600 in a 0700 directory: root on the node only) and on TCP
                only with ``status_over_tcp``.
  GET /explain  ?from=NS/POD|IP&to=...&port=P&protocol=TCP (or flow=SRC,DST,PORT,PROTO repeated):
                JSON verdict, summary, rule trace with live counters and drift against the
                desired state (policy_agent.live_explain). Served where /status is, same rules.

Both listeners share one accept thread and a fixed pool of worker threads; a
connection that does not fit (all workers busy and the small backlog full) is
answered 503 at once and closed. Each connection gets one request and a total
deadline (``timeout``) for receiving it, so a client that sends nothing, or one
byte a second, holds a worker for ``timeout`` seconds at most.
"""

from __future__ import annotations

import errno
import http.client
import io
import json
import os
import queue
import selectors
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = structlog.get_logger(__name__)

SOCKET_DIR = "/run/policy-agent/private"
WORKERS = 4  # handler threads, shared by both listeners
BACKLOG = 8  # accepted connections that may wait for a worker; more are refused at once
TIMEOUT = 5.0  # seconds to receive a whole request, and per write of the response
# Metric families whose labels carry free text (raw kernel errors may name chains, i.e. namespaces
# and policies): served only where /status is.
PRIVATE_METRICS = frozenset({"policy_agent_last_apply_error"})
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n"


def status_socket_path(configured: str = "", netns: str = "") -> str:
    """The Unix socket path: the setting, or /run/policy-agent/private/agent[-<netns>].sock
    (one per netns, as the dataplane state file, so agents side by side never share it)."""
    path = configured or os.path.join(SOCKET_DIR, f"agent-{netns}.sock" if netns else "agent.sock")
    if len(os.fsencode(path)) > 107:
        raise ValueError(f"setting 'status_socket': {path!r} is longer than a Unix socket path may be (107 bytes)")
    return path


class _DeadlineReader(io.RawIOBase):
    """Socket reads that share one deadline: a trickling client cannot reset it byte by byte."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buf)


class _PublicMetrics:
    """A registry view without the private families (generate_latest only calls collect())."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry

    def collect(self):
        return (fam for fam in self._registry.collect() if fam.name not in PRIVATE_METRICS)


def _render_metrics(metrics: Any, private: bool) -> bytes:
    if private:
        return metrics.render()
    return generate_latest(_PublicMetrics(metrics.registry))  # type: ignore[arg-type]


class _Listener:
    """What a handler needs to know about the socket a connection came in on."""

    def __init__(self, agent: Any, kind: str, serve_status: bool, timeout: float) -> None:
        self.agent = agent
        self.kind = kind  # "tcp" | "unix"
        self.serve_status = serve_status
        self.timeout = timeout


class _Handler(BaseHTTPRequestHandler):
    server: _Listener  # type: ignore[assignment]
    protocol_version = "HTTP/1.0"  # one request per connection: the deadline covers all of it

    def setup(self) -> None:
        self.timeout = self.server.timeout
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + self.timeout))

    def address_string(self) -> str:
        return self.client_address[0] if self.client_address else "unix"

    def log_message(self, fmt: str, *args: Any) -> None:  # route to structlog, quietly
        log.debug("http_request", listener=self.server.kind, client=self.address_string(), line=fmt % args)

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.connection.settimeout(self.timeout)  # a client that does not read cannot hold us either
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
                self._send(200, _render_metrics(agent.metrics, self.server.serve_status), CONTENT_TYPE_LATEST)
            elif path == "/status" and self.server.serve_status:
                body = json.dumps(agent.status(), sort_keys=True, indent=2).encode() + b"\n"
                self._send(200, body, "application/json")
            elif path == "/status":
                self._send(404, b"not found: /status is served on the agent's Unix socket (setting status_socket; "
                                b"`policy-agent status` reads it); TCP only with status_over_tcp\n")
            elif path == "/explain" and self.server.serve_status:
                # Names pods and policies and runs iptables-save: same access as /status.
                from urllib.parse import parse_qs

                from policy_agent.live_explain import serve as serve_explain

                query = self.path.split("?", 1)[1] if "?" in self.path else ""
                code, doc = serve_explain(agent, parse_qs(query, keep_blank_values=True))
                self._send(code, json.dumps(doc, sort_keys=True).encode() + b"\n", "application/json")
            elif path == "/explain":
                self._send(404, b"not found: /explain is served on the agent's Unix socket (`policy-agent explain` "
                                b"without files asks it); TCP only with status_over_tcp\n")
            else:
                more = " /status /explain" if self.server.serve_status else ""
                self._send(404, f"not found: try /livez /readyz /metrics{more}\n".encode())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        except Exception as exc:  # an HTTP bug must not take the agent down
            log.exception("http_handler_failed", path=path)
            self._send(500, f"internal error: {exc}\n".encode())


def _check_socket_dir(path: str) -> None:
    """Make the socket's directory (0700) or require an existing one to be root's own, 0700.

    An existing directory is never chmod-ed: it could be shared (/run, /tmp)."""
    d = os.path.dirname(path) or "."
    if not os.path.isdir(d):
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)  # makedirs' mode is filtered by the umask
    st = os.stat(d)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise OSError(errno.EPERM, f"setting 'status_socket': directory {d} must be owned by uid {os.geteuid()} "
                                   f"with mode 0700 (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); "
                                   "the agent creates it so when it is missing")


def _bind_unix(path: str) -> socket.socket:
    _check_socket_dir(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"setting 'status_socket': {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left by an agent that is gone
        else:
            raise OSError(errno.EADDRINUSE, f"setting 'status_socket': another agent serves {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The directory is 0700, so nobody else can reach the socket between bind and chmod.
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


class ObsServer:
    """The agent's endpoints: TCP ``bind:port`` (/livez /readyz /metrics, and /status only with
    ``status_over_tcp``) and, with ``socket_path``, a root-only Unix socket serving all four."""

    def __init__(self, agent: Any, bind: str = "127.0.0.1", port: int = 9909, *, socket_path: str | None = None,
                 status_over_tcp: bool = False, workers: int = WORKERS, backlog: int = BACKLOG,
                 timeout: float = TIMEOUT) -> None:
        if workers < 1 or backlog < 0 or timeout <= 0:
            raise ValueError("workers must be >= 1, backlog >= 0 and timeout > 0")
        self.socket_path = socket_path
        self.workers = workers
        self._tcp = socket.create_server((bind, port), family=socket.AF_INET6 if ":" in bind else socket.AF_INET,
                                         backlog=64)
        self._listeners: dict[socket.socket, _Listener] = {
            self._tcp: _Listener(agent, "tcp", status_over_tcp, timeout)}
        if socket_path:
            try:
                unix = _bind_unix(socket_path)
            except BaseException:
                self._tcp.close()
                raise
            self._listeners[unix] = _Listener(agent, "unix", True, timeout)
        # Admission: a connection takes a slot until a worker is done with it.
        self._slots = threading.BoundedSemaphore(workers + backlog)
        self._work: queue.SimpleQueue[tuple[socket.socket, Any, _Listener] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.refused = 0  # connections answered "busy" (for tests and debugging)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._tcp.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._accept_loop, name="obs-accept", daemon=True)]
        self._threads += [threading.Thread(target=self._worker, name=f"obs-http-{i}", daemon=True)
                          for i in range(self.workers)]
        for t in self._threads:
            t.start()
        log.info("obs_server_listening", url=self.url, socket=self.socket_path,
                 status_over_tcp=self._listeners[self._tcp].serve_status)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads[:1]:
            t.join(5)
        for _ in self._threads[1:]:
            self._work.put(None)
        deadline = time.monotonic() + self._listeners[self._tcp].timeout + 1  # one bound for all workers
        for t in self._threads[1:]:
            t.join(max(0.0, deadline - time.monotonic()))
        for sock in self._listeners:
            sock.close()
        if self.socket_path:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        for sock in self._listeners:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    lsock = key.fileobj
                    try:
                        conn, addr = lsock.accept()  # type: ignore[union-attr]
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                        log.warning("obs_accept_failed", error=str(exc))
                        time.sleep(0.1)
                        continue
                    if not self._slots.acquire(blocking=False):
                        self._refuse(conn)
                        continue
                    self._work.put((conn, addr, self._listeners[lsock]))  # type: ignore[index]
        finally:
            sel.close()

    def _refuse(self, conn: socket.socket) -> None:
        self.refused += 1
        try:
            conn.setblocking(False)
            conn.send(_BUSY)
        except OSError:
            pass
        finally:
            conn.close()
        log.debug("obs_connection_refused", reason="busy", refused=self.refused)

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            conn, addr, listener = item
            try:
                conn.setblocking(True)
                if self._stop.is_set():
                    continue
                _Handler(conn, addr, listener)  # type: ignore[arg-type]
            except Exception as exc:  # a broken client must not end the worker
                log.debug("obs_connection_failed", error=str(exc))
            finally:
                try:
                    conn.close()
                finally:
                    self._slots.release()


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix stream socket (stdlib only)."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def get(target: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``path`` from ``target``: a Unix socket path (starts with /) or an http://host:port URL."""
    if target.startswith("/"):
        conn: http.client.HTTPConnection = UnixHTTPConnection(target, timeout=timeout)
    else:
        from urllib.parse import urlsplit

        u = urlsplit(target)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"not an http:// URL or a socket path: {target!r}")
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def fetch_status(target: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET /status from a Unix socket path or a base URL and decode it (``policy-agent status``)."""
    code, body = get(target, "/status", timeout)
    if code != 200:
        raise ValueError(f"HTTP {code}: {body.decode(errors='replace').strip()}")
    return json.loads(body.decode())
