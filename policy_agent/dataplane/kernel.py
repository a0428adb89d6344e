"""The four kernel operations the dataplane needs, for one backend.

``SystemKernel`` runs the real binaries (through a Runner, so optionally in a
network namespace); ``policy_agent.dataplane.fake.FakeKernel`` implements the
same interface in memory for unit tests. Every write is a restore batch:
iptables-restore --noflush (atomic per table) and ipset restore.
"""

from __future__ import annotations

import os
from typing import Protocol

from policy_agent.dataplane import nftgen
from policy_agent.dataplane.runner import Pending, RestoreSession, Runner, SessionBatch, Stream
from policy_agent.shared.netns import in_netns

BACKENDS = ("nft", "legacy")
LEGACY_PROBE_FILE = "/proc/net/ip_tables_names"
LOCK_WAIT_S = 10
LOCK_PROBE_US = 50_000


class Kernel(Protocol):
    backend: str

    def iptables_save(self, family: int) -> str: ...

    def iptables_restore(self, family: int, text: str) -> None: ...

    def ipset_save(self) -> str: ...

    def ipset_restore(self, text: str) -> None: ...


def binary(backend: str, family: int, verb: str) -> str:
    """e.g. binary("nft", 6, "restore") -> "ip6tables-nft-restore"."""
    if backend not in BACKENDS:
        raise ValueError(f"iptables backend must be one of {BACKENDS}, not {backend!r}")
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    return f"ip{'' if family == 4 else '6'}tables-{backend}-{verb}"


def legacy_available() -> bool:
    # Probing legacy tables when the module is absent would load it (Calico's caveat).
    return os.path.exists(LEGACY_PROBE_FILE)


class SystemKernel:
    def __init__(self, runner: Runner, backend: str, sessions: bool = True):
        binary(backend, 4, "save")  # validates
        self.runner = runner
        self.backend = backend
        self.sessions = sessions  # benches turn them off to measure what they save
        self._sessions: dict[int, RestoreSession] = {}
        self._unsettled = False

    def iptables_save(self, family: int) -> str:
        return self.runner.run([binary(self.backend, family, "save"), "-c"])

    def _restore_argv(self, family: int) -> list[str]:
        argv = [binary(self.backend, family, "restore"), "--noflush"]
        if self.backend == "legacy":
            # Only legacy has the xtables lock; nft transactions are atomic in the kernel.
            argv += ["--wait", str(LOCK_WAIT_S), "--wait-interval", str(LOCK_PROBE_US)]
        return argv

    def iptables_restore(self, family: int, text: str) -> None:
        self.runner.run(self._restore_argv(family), input=text)

    # Started, not finished: the dataplane overlaps a restore with its own planning
    # (ipsets) or with the other family's restore (v4 and v6 are separate tables).
    # nft, a delta: fed to the family's long-lived restore, done at its commit (nftgen.py).
    def iptables_restore_start(self, family: int, text: str) -> Pending | SessionBatch:
        if self.backend == "nft" and self.sessions and nftgen.wanted(text):
            commits = nftgen.count_commits(text)
            if commits:
                session = self._sessions.get(family)
                if session is None:
                    session = self._sessions[family] = RestoreSession(self.runner, self._restore_argv(family))
                batch = session.begin(text, commits)
                if batch is not None:
                    self._unsettled = True
                    return batch
        return self.runner.start(self._restore_argv(family), input=text)

    def settle(self) -> None:
        """Make the kernel free the rules our long-lived restores deleted (nftgen.settle):
        an ipset one of them used can be destroyed only then. A restore that exits does it."""
        if self._unsettled:
            self._unsettled = False
            with in_netns(self.runner.netns):
                nftgen.settle()

    def close(self) -> None:
        """End the long-lived restores (each also frees what it deleted as it exits)."""
        for session in self._sessions.values():
            session.close()
        self._unsettled = False

    def ipset_restore_start(self, text: str) -> Pending:
        return self.runner.start(["ipset", "restore"], input=text)

    def ipset_restore_stream(self) -> Stream:
        # Fed set by set while the rest is still being rendered (from empty, the
        # kernel's work on the first sets overlaps our rendering of the others).
        return self.runner.stream(["ipset", "restore"])

    # The read-back's three saves are independent: started together, waited together.
    def iptables_save_start(self, family: int) -> Pending:
        return self.runner.start([binary(self.backend, family, "save"), "-c"])

    def ipset_save_start(self) -> Pending:
        return self.runner.start(["ipset", "save"])

    def ipset_save(self) -> str:
        return self.runner.run(["ipset", "save"])

    def ipset_restore(self, text: str) -> None:
        self.runner.run(["ipset", "restore"], input=text)
