"""The four kernel operations the dataplane needs, for one backend.

``SystemKernel`` runs the real binaries (through a Runner, so optionally in a
network namespace); ``policy_agent.dataplane.fake.FakeKernel`` implements the
same interface in memory for unit tests. Every write is a restore batch:
iptables-restore --noflush (atomic per table) and ipset restore.
"""

from __future__ import annotations

import os
from typing import Protocol

from policy_agent.dataplane.runner import Pending, Runner, Stream

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
    def __init__(self, runner: Runner, backend: str):
        binary(backend, 4, "save")  # validates
        self.runner = runner
        self.backend = backend

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
    def iptables_restore_start(self, family: int, text: str) -> Pending:
        return self.runner.start(self._restore_argv(family), input=text)

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
