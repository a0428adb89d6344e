"""A loopback TCP proxy for fault injection between a client and the API server.

Bytes pass through untouched (TLS end to end). Faults:
- ``drop()``: close every open connection now (a dropped watch mid-stream);
- ``stall()`` / ``resume()``: stop forwarding in both directions, keep sockets open
  (a hung connection or a black-holed server); new connections stall too;
- ``refuse()`` / ``accept()``: new connections are closed at once (server unreachable);
- ``delay``: seconds slept before forwarding each chunk (a slow server).
"""

from __future__ import annotations

import select
import socket
import threading


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(64)
        self.port = self._lsock.getsockname()[1]
        self._conns: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._running.set()  # cleared = stalled
        self._closed = False
        self._refusing = False
        self.delay = 0.0
        self.connections = 0  # accepted so far
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # -- faults -----------------------------------------------------------------
    def drop(self) -> int:
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for a, b in conns:
            for s in (a, b):
                _kill(s)
        return len(conns)

    def stall(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def refuse(self) -> None:
        self._refusing = True

    def accept(self) -> None:
        self._refusing = False

    def close(self) -> None:
        self._closed = True
        self._running.set()
        _kill(self._lsock)
        self.drop()

    # -- plumbing ---------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            if self._refusing:
                _kill(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _kill(client)
                continue
            pair = (client, upstream)
            with self._lock:
                self._conns.add(pair)
                self.connections += 1
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket]) -> None:
        client, upstream = pair
        peer = {client: upstream, upstream: client}
        try:
            while not self._closed:
                try:
                    readable, _, _ = select.select([client, upstream], [], [], 0.5)
                except (OSError, ValueError):
                    return
                if not self._running.is_set():
                    # Stalled: keep the sockets open, move no byte.
                    self._running.wait(0.5)
                    continue
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    if self.delay:
                        threading.Event().wait(self.delay)
                    if not self._running.is_set():
                        self._running.wait()
                    peer[s].sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(pair)
            _kill(client)
            _kill(upstream)


def _kill(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
