"""Run kernel commands, optionally inside a named network namespace.

The agent runs with ``netns=None`` (host namespace); tests and benchmarks always
pass a private namespace, and every command is then wrapped in
``ip netns exec <ns>``. This is the only place the dataplane starts processes.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)


class CommandError(RuntimeError):
    """A kernel command exited non-zero; carries argv, exit code and stderr."""

    def __init__(self, argv: list[str], returncode: int, stderr: str):
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()[:500]}")


@dataclass
class Runner:
    netns: str | None = None
    timeout: float = 60.0

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    def run(self, argv: list[str], input: str | None = None, check: bool = True) -> str:
        full = self.argv(argv)
        proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=self.timeout)
        if check and proc.returncode != 0:
            raise CommandError(full, proc.returncode, proc.stderr)
        return proc.stdout

    def try_run(self, argv: list[str], input: str | None = None) -> tuple[int, str, str]:
        full = self.argv(argv)
        try:
            proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=self.timeout)
        except FileNotFoundError as exc:
            return 127, "", str(exc)
        return proc.returncode, proc.stdout, proc.stderr
