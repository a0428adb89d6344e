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

import subprocess
import threading
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
