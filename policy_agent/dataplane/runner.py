"""Run kernel commands, optionally inside a named network namespace.

The agent runs with ``netns=None`` (host namespace); tests and benchmarks always
pass a private namespace. Children are started from the calling thread after
``setns(2)`` into ``/run/netns/<ns>`` (only that thread moves; it moves back
before the call returns), which costs ~1 ms where ``ip netns exec`` costs ~3-4 ms
per command on this machine; nothing we run needs the /sys remount or
/etc/netns bind mounts ``ip netns exec`` adds. This is the only place the
dataplane starts processes.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import time
from dataclasses import dataclass

import structlog

from policy_agent.dataplane import nftgen
from policy_agent.shared.netns import in_netns

log = structlog.get_logger(__name__)



class CommandError(RuntimeError):
    """A kernel command exited non-zero; carries argv, exit code and stderr."""

    def __init__(self, argv: list[str], returncode: int, stderr: str):
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()[:500]}")


class Pending:
    """A started command: feed its input in a helper thread, ``wait()`` for the result."""

    def __init__(self, argv: list[str], proc: subprocess.Popen | None, input: str | None, timeout: float,
                 error: CommandError | None = None):
        self.argv = argv
        self._proc = proc
        self._out = ""
        self._err = ""
        self._error = error
        self._thread: threading.Thread | None = None
        if proc is not None:
            self._thread = threading.Thread(target=self._talk, args=(input, timeout), daemon=True)
            self._thread.start()

    def _talk(self, input: str | None, timeout: float) -> None:
        assert self._proc is not None
        try:
            self._out, self._err = self._proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._out, self._err = self._proc.communicate()
            self._err = f"timed out after {timeout} s; {self._err}"

    def wait(self) -> str:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._proc is not None
        if self._proc.returncode != 0:
            raise CommandError(self.argv, self._proc.returncode, self._err)
        return self._out


class Stream(Pending):
    """A started command whose input is written piece by piece while it runs.

    ``write`` queues text and returns at once (a helper thread feeds the pipe, so
    the caller never blocks on a slow reader); ``wait`` ends the input and waits.
    The child works on the first pieces while the caller renders the rest: for a
    restore from empty that overlaps our rendering with the kernel's work."""

    def __init__(self, argv: list[str], proc: subprocess.Popen | None, timeout: float,
                 error: CommandError | None = None):
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._closed = False
        super().__init__(argv, proc, None, timeout, error)

    def write(self, text: str) -> None:
        if text and not self._closed:
            self._queue.put(text)

    def kill(self) -> None:
        """Abandon the input (the caller found it bad): the child is killed, not fed the rest."""
        if self._proc is not None and not self._closed:
            self._proc.kill()
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def _talk(self, input: str | None, timeout: float) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        out: list[str] = []
        err: list[str] = []
        # Output is drained while we feed: a child that writes (much) while it reads
        # never blocks on a full pipe with us blocked on its input.
        readers = [threading.Thread(target=lambda f=f, acc=acc: acc.append(f.read()), daemon=True)
                   for f, acc in ((proc.stdout, out), (proc.stderr, err))]
        for t in readers:
            t.start()
        # A child that hangs while we feed it (a lock) is killed after ``timeout`` like
        # any other command; the write then fails and the rest is drained.
        t0 = time.monotonic()
        killer = threading.Timer(timeout, proc.kill)
        killer.daemon = True
        killer.start()
        broken = False
        while (chunk := self._queue.get()) is not None:
            if broken:
                continue  # the child exited early (an error): drain, its stderr says why
            try:
                proc.stdin.write(chunk)
            except (BrokenPipeError, OSError, ValueError):
                broken = True
        try:
            proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            proc.wait(max(0.1, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        killer.cancel()
        for t in readers:
            t.join()
        self._out, self._err = "".join(out), "".join(err)
        if proc.returncode == -9 and time.monotonic() - t0 >= timeout:
            self._err = f"timed out after {timeout} s; {self._err}"

    def wait(self) -> str:
        self.close()
        return super().wait()


@dataclass
class Runner:
    netns: str | None = None
    timeout: float = 60.0

    def argv(self, argv: list[str]) -> list[str]:
        """The command as an operator would type it (for messages)."""
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    def _popen(self, argv: list[str]) -> subprocess.Popen:
        with in_netns(self.netns):
            return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)

    def start(self, argv: list[str], input: str | None = None) -> Pending:
        """Start ``argv`` and return at once; ``Pending.wait()`` raises CommandError on failure."""
        try:
            proc = self._popen(argv)
        except OSError as exc:
            return Pending(self.argv(argv), None, None, self.timeout, CommandError(self.argv(argv), 127, str(exc)))
        return Pending(self.argv(argv), proc, input, self.timeout)

    def stream(self, argv: list[str]) -> Stream:
        """Start ``argv`` to be fed with ``Stream.write``; ``wait()`` raises CommandError on failure."""
        try:
            proc = self._popen(argv)
        except OSError as exc:
            return Stream(self.argv(argv), None, self.timeout, CommandError(self.argv(argv), 127, str(exc)))
        return Stream(self.argv(argv), proc, self.timeout)

    def run(self, argv: list[str], input: str | None = None, check: bool = True) -> str:
        rc, out, err = self.try_run(argv, input)
        if check and rc != 0:
            raise CommandError(self.argv(argv), rc, err)
        return out

    def try_run(self, argv: list[str], input: str | None = None) -> tuple[int, str, str]:
        try:
            proc = self._popen(argv)
        except OSError as exc:
            return 127, "", str(exc)
        try:
            out, err = proc.communicate(input, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return -9, out, f"timed out after {self.timeout} s; {err}"
        return proc.returncode, out, err


# How long a new restore process may take to open its netlink socket.
PORT_WAIT_S = 1.0


class RestoreSession:
    """One long-lived restore process (``ip[6]tables-nft-restore --noflush``) fed one
    batch at a time. A batch is done when the kernel announces its commits (nftgen.py),
    not when a process exits: no process start per batch, and no exit, which after a
    batch that deleted rules waits 10-25 ms for the kernel to free them while holding the
    commit lock the other family and the next batch need. iptables-nft checks the
    table's generation on every commit and re-reads its cache if anyone else committed
    in between, so a long-lived process never writes over a stale view.

    The process is closed after ``idle`` seconds without a batch, when a batch fails
    (its error is raised with line numbers counted from the batch's start, as a fresh
    process would count them), or when announcements cannot be had (then
    ``begin`` returns None and the caller runs a process of its own)."""

    def __init__(self, runner: Runner, argv: list[str], idle: float = 10.0):
        self.runner = runner
        self.argv = argv
        self.idle = idle
        self._lock = threading.Lock()  # the process, its socket and the idle timer
        self._proc: subprocess.Popen | None = None
        self._sock = None
        self._wake = (-1, -1)
        self._err: list[str] = []
        self._fed = 0  # lines this process has read: its messages count from its start
        self._timer: threading.Timer | None = None
        self._exit_thread: threading.Thread | None = None
        self._port = 0
        self._busy: SessionBatch | None = None  # the batch in flight
        self._closing = False
        self.batches = 0  # fed to a running process (the benches count them)
        self.processes = 0

    def _start(self) -> bool:
        with in_netns(self.runner.netns):
            sock = nftgen.open_socket(subscribed=False)
            if sock is None:
                return False
            try:
                proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
            except OSError:
                sock.close()
                return False
        # The port its commits are announced under: it opens its socket as it starts.
        port = None
        deadline = time.monotonic() + PORT_WAIT_S
        while port is None and proc.poll() is None and time.monotonic() < deadline:
            port = nftgen.socket_port(proc.pid)
            if port is None:
                time.sleep(0.002)
        if port is None:
            log.warning("restore_session_unavailable", argv=self.argv, reason="no netlink port found")
            sock.close()
            proc.kill()
            proc.wait()
            return False
        self._proc, self._sock, self._err, self._fed, self._port = proc, sock, [], 0, port
        self._wake = os.pipe2(os.O_CLOEXEC)
        self.processes += 1
        self._exit_thread = threading.Thread(target=self._watch_exit, args=(proc, self._err, self._wake[1]),
                                             daemon=True)
        self._exit_thread.start()
        return True

    @staticmethod
    def _watch_exit(proc: subprocess.Popen, err: list[str], wake_w: int) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:  # drained as it comes: a warning never blocks the child
            if len(err) < 200:
                err.append(line)
        proc.wait()
        try:
            os.write(wake_w, b"x")
        except OSError:
            pass  # closed already: nobody waits

    def _close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()  # EOF: it exits when done with what it has read
            except OSError:
                pass
            try:
                proc.wait(self.runner.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if self._exit_thread is not None:
                self._exit_thread.join()  # it writes to the wake pipe: not once the pipe is closed
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in self._wake:
            if fd >= 0:
                os.close(fd)
        self._wake = (-1, -1)

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            if self._busy is None:
                self._close()
            else:
                self._closing = True  # the batch in flight ends it

    def _idle_close(self) -> None:
        with self._lock:
            if self._busy is None:
                self._close()

    def begin(self, text: str, commits: int) -> SessionBatch | None:
        """Feed ``text`` (``commits`` non-empty table blocks) and return at once; None if no
        session can be had here. One batch at a time: ``wait()`` it before the next."""
        # A table block whose lines change nothing in the kernel commits nothing and so is
        # never announced: after ``patience`` the input is closed, and the exit tells.
        with self._lock:
            earlier = self._busy
        if earlier is not None:  # a caller's bug; never leave the session stuck on it
            log.warning("restore_batch_not_waited", argv=self.argv)
            try:
                earlier.wait()
            except CommandError as exc:
                log.warning("restore_batch_not_waited_failed", argv=self.argv, error=str(exc))
        with self._lock:
            self._closing = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._proc is not None and self._proc.poll() is not None:
                self._close()
            if self._proc is None and not self._start():
                return None
            proc, sock = self._proc, self._sock
            assert proc is not None and proc.stdin is not None and sock is not None
            try:
                nftgen.subscribe(sock, True)
                watch = nftgen.CommitWatch(sock, self._port, commits)
            except OSError:  # cannot listen here: the caller runs a process of its own
                self._close()
                return None
            lines = text.count("\n")
            batch = SessionBatch(self, watch, self._fed, len(self._err), 1.0 + 0.001 * lines)
            self._busy = batch
        # As a process of its own would be: killed if it hangs (the write blocks on a full pipe).
        batch.killer = threading.Timer(self.runner.timeout, proc.kill)
        batch.killer.daemon = True
        batch.killer.start()
        try:
            proc.stdin.write(text)
            proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # it exited: wait() reports why
        self._fed += lines
        return batch

    def _end(self, batch: SessionBatch) -> None:
        proc = self._proc
        assert proc is not None and self._sock is not None
        try:
            try:
                committed = batch.watch.wait(self._wake[0], batch.patience)
            except OSError:
                committed = False  # the socket failed us: the exit tells
            try:
                nftgen.subscribe(self._sock, False)
            except OSError:
                pass
            if committed:
                self.batches += 1
                return
            # Not announced: it refused the batch and exited, or announcements were lost,
            # or it changed nothing, or it hangs. Let it finish what it read; its exit
            # status says which.
            self._close()
            if proc.returncode != 0:
                raise CommandError(self.runner.argv(self.argv), proc.returncode,
                                   _relative_lines("".join(self._err[batch.err_from:]), batch.offset))
        finally:
            if batch.killer is not None:
                batch.killer.cancel()
            with self._lock:
                self._busy = None
                if self._closing:
                    self._closing = False
                    self._close()
                elif self._proc is not None and self.idle > 0:
                    self._timer = threading.Timer(self.idle, self._idle_close)
                    self._timer.daemon = True
                    self._timer.start()


class SessionBatch:
    """One batch fed to a RestoreSession: ``wait()`` until its commits are announced."""

    quick = True  # done in milliseconds: waited for before the next family's batch starts

    def __init__(self, session: RestoreSession, watch: nftgen.CommitWatch, offset: int, err_from: int,
                 patience: float):
        self.session = session
        self.watch = watch
        self.offset = offset  # lines the process had read before: its messages count from its start
        self.err_from = err_from  # its stderr lines before this batch
        self.patience = patience
        self.killer: threading.Timer | None = None
        self._done = False

    def wait(self) -> str:
        if not self._done:
            self._done = True
            self.session._end(self)
        return ""


def _relative_lines(err: str, offset: int) -> str:
    """'line 1207 failed' of a long-lived process, as the batch's own line number."""
    return re.sub(r"\bline (\d+)\b", lambda m: f"line {int(m.group(1)) - offset}", err)
