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

import queue
import subprocess
import threading
import time
from dataclasses import dataclass

import structlog

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
