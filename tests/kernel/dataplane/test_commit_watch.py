"""Deltas fed to a long-lived ``iptables-nft-restore`` (runner.RestoreSession), done when
the kernel announces their commits (policy_agent/dataplane/nftgen.py): real restores in
a private namespace.

What is proved: batch after batch goes to one process and every batch's rules are in
the kernel when ``wait()`` returns; a refused batch fails with its own line number and
leaves the table as it was, and the next batch gets a new process; a batch of two
tables is not done at the first commit; a write by someone else between two batches is
not overwritten from a stale view; a batch that changes nothing ends by the exit, and
not by another process's commit; a killed process is replaced; an idle session ends its
process; the socket hears nothing but commit announcements; a set
whose last rule a batch deleted can be destroyed after ``settle``, through the dataplane.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

import pytest
from structlog.testing import capture_logs

from policy_agent.dataplane import nftgen
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.kernel import SystemKernel
from policy_agent.dataplane.runner import CommandError, RestoreSession, Runner
from policy_agent.desired import ACCEPT, Chain, DesiredState, Hook, IPSet, Match, Rule
from policy_agent.lab import netns
from policy_agent.shared.naming import ipset_name
from policy_agent.shared.netns import in_netns

pytestmark = pytest.mark.kernel

FW = "pa-fw-commit"
STALE = ipset_name(4, "s", "commit-stale")
SEED = "*filter\n:pa-cw - [0:0]\n-A pa-cw -j ACCEPT\n-A pa-cw -j DROP\nCOMMIT\n"
RESEED = "*filter\n-F pa-cw\n-A pa-cw -j ACCEPT\n-A pa-cw -j DROP\nCOMMIT\n"
# A delete and a replace: what a process that exits after its commit would wait 10-25 ms for.
CHANGE = "*filter\n-D pa-cw 1\n-R pa-cw 1 -p udp -j DROP\n-A pa-cw -p tcp -j ACCEPT\nCOMMIT\n"


@pytest.fixture
def ns():
    with netns.scratch("cw", "node") as name:
        yield name


@pytest.fixture
def kernel(ns):
    k = SystemKernel(Runner(ns), "nft")
    k.iptables_restore(4, SEED)
    try:
        yield k
    finally:
        k.close()


def _rules(ns: str, chain: str = "pa-cw", table: str = "filter") -> list[str]:
    out = netns.run(ns, "iptables-nft-save", "-t", table).stdout
    return [ln for ln in out.splitlines() if ln.startswith(f"-A {chain} ")]


def _session(k: SystemKernel, family: int = 4) -> RestoreSession:
    return k._sessions[family]


def test_batches_go_to_one_process_and_are_in_place_when_waited(ns, kernel):
    for _ in range(5):
        kernel.iptables_restore_start(4, CHANGE).wait()
        assert _rules(ns) == ["-A pa-cw -p udp -j DROP", "-A pa-cw -p tcp -j ACCEPT"]
        kernel.iptables_restore_start(4, RESEED).wait()
        assert _rules(ns) == ["-A pa-cw -j ACCEPT", "-A pa-cw -j DROP"]
    s = _session(kernel)
    assert (s.processes, s.batches) == (1, 10)


def test_a_refused_batch_fails_with_its_own_line_number_and_the_next_gets_a_new_process(ns, kernel):
    kernel.iptables_restore_start(4, RESEED).wait()  # the process has read 5 lines before
    with pytest.raises(CommandError, match=r"line 3 failed"):
        kernel.iptables_restore_start(4, "*filter\n-D pa-cw 1\n-A pa-cw-missing -j ACCEPT\nCOMMIT\n").wait()
    assert _rules(ns) == ["-A pa-cw -j ACCEPT", "-A pa-cw -j DROP"]  # atomic: the delete is not in
    kernel.iptables_restore_start(4, CHANGE).wait()
    assert _rules(ns)[-1] == "-A pa-cw -p tcp -j ACCEPT"
    assert _session(kernel).processes == 2


def test_two_tables_are_not_done_at_the_first_commit(ns, kernel):
    """filter commits, then raw is refused: two tables, one announcement, an error."""
    text = "*filter\n-D pa-cw 1\nCOMMIT\n*raw\n-A pa-raw-missing -j ACCEPT\nCOMMIT\n"
    with pytest.raises(CommandError):
        kernel.iptables_restore_start(4, text).wait()
    assert _rules(ns) == ["-A pa-cw -j DROP"]  # the first table was committed on its own
    kernel.iptables_restore_start(
        4, "*filter\n-I pa-cw 1 -j ACCEPT\nCOMMIT\n*raw\n:pa-raw - [0:0]\n-A pa-raw -j ACCEPT\nCOMMIT\n").wait()
    assert _rules(ns, "pa-raw", "raw") == ["-A pa-raw -j ACCEPT"]
    assert _rules(ns) == ["-A pa-cw -j ACCEPT", "-A pa-cw -j DROP"]


def test_a_write_by_someone_else_between_batches_is_not_overwritten(ns, kernel):
    kernel.iptables_restore_start(4, RESEED).wait()  # the session's view: ACCEPT, DROP
    netns.run(ns, "iptables-nft", "-I", "pa-cw", "1", "-p", "icmp", "-j", "DROP")  # someone else
    kernel.iptables_restore_start(4, "*filter\n-D pa-cw 1\nCOMMIT\n").wait()
    # rule 1 is the foreign rule now: a stale view would have deleted ACCEPT instead
    assert _rules(ns) == ["-A pa-cw -j ACCEPT", "-A pa-cw -j DROP"]


def test_a_batch_that_changes_nothing_ends_by_the_exit_not_by_anyone_elses_commit(ns, kernel):
    kernel.iptables_restore(4, "*filter\n:pa-empty - [0:0]\nCOMMIT\n")
    kernel.iptables_restore_start(4, RESEED).wait()
    s = _session(kernel)
    # Someone else commits in this namespace while our batch (flushing an empty chain,
    # which commits nothing) waits for an announcement that never comes.
    other = threading.Timer(0.2, netns.run, args=(ns, "iptables-nft", "-A", "pa-empty", "-j", "ACCEPT"))
    other.start()
    t0 = time.monotonic()
    kernel.iptables_restore_start(4, "*filter\n:pa-empty - [0:0]\nCOMMIT\n").wait()
    other.join()
    assert time.monotonic() - t0 >= 0.9, "ended by another process's commit"
    assert s.batches == 1 and s._proc is None  # ended by closing the input; exit status 0
    kernel.iptables_restore_start(4, CHANGE).wait()
    assert _rules(ns)[-1] == "-A pa-cw -p tcp -j ACCEPT"
    assert s.processes == 2


def test_a_session_process_killed_between_batches_is_replaced(ns, kernel):
    kernel.iptables_restore_start(4, RESEED).wait()
    s = _session(kernel)
    os.kill(s._proc.pid, signal.SIGKILL)  # our own child, by pid
    s._proc.wait()
    kernel.iptables_restore_start(4, CHANGE).wait()
    assert _rules(ns) == ["-A pa-cw -p udp -j DROP", "-A pa-cw -p tcp -j ACCEPT"]
    assert s.processes == 2


def test_the_port_a_restore_commits_under_is_read_from_the_kernel(ns, kernel):
    kernel.iptables_restore_start(4, RESEED).wait()
    s = _session(kernel)
    port = nftgen.socket_port(s._proc.pid)
    assert port is not None and port == s._port


def test_an_idle_session_ends_its_process(ns):
    s = RestoreSession(Runner(ns), ["iptables-nft-restore", "--noflush"], idle=0.3)
    try:
        s.begin(SEED, 1).wait()
        pid = s._proc.pid
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}")
        s.begin(RESEED, 1).wait()
        assert s.processes == 2 and _rules(ns) == ["-A pa-cw -j ACCEPT", "-A pa-cw -j DROP"]
    finally:
        s.close()


def test_the_socket_hears_commit_announcements_only(ns):
    with in_netns(ns):
        sock = nftgen.open_socket()
    assert sock is not None
    try:
        rules = "".join(f"-A pa-many -s 10.9.{i // 250}.{i % 250 + 1}/32 -j ACCEPT\n" for i in range(300))
        k = SystemKernel(Runner(ns), "nft", sessions=False)
        k.iptables_restore(4, "*filter\n:pa-many - [0:0]\n" + rules + "COMMIT\n")
        k.iptables_restore(4, "*filter\n-F pa-many\nCOMMIT\n")
        grams = []
        while select.select([sock], [], [], 0.2)[0]:
            grams.append(sock.recv(65536))
        # 300 rule notifications were sent to the group; two commits were announced
        assert [len(nftgen.committing_ports(g)) for g in grams] == [1, 1]
    finally:
        sock.close()


# --- the dataplane: a set its last rule stopped using is destroyed once that rule is freed


@pytest.fixture
def node(bare_node):
    return bare_node


def _with_set(name: str) -> DesiredState:
    s = IPSet(name, 4, "hash:net", frozenset({"10.71.0.1/32", "10.71.0.2/32"}), "test")
    chain = Chain(FW, (Rule(Match(src_set=name), ACCEPT), Rule(Match(protocol="udp"), ACCEPT)))
    return DesiredState(chains={(4, "filter"): {FW: chain}}, hooks=(Hook("filter", "FORWARD", FW),),
                        ipsets={name: s})


def _without_set() -> DesiredState:
    chain = Chain(FW, (Rule(Match(protocol="udp"), ACCEPT),))
    return DesiredState(chains={(4, "filter"): {FW: chain}}, hooks=(Hook("filter", "FORWARD", FW),), ipsets={})


def _sets(ns: str) -> set[str]:
    return {ln.split()[1] for ln in netns.run(ns, "ipset", "save").stdout.splitlines() if ln.startswith("create ")}


@pytest.mark.parametrize("defer", [False, True])
def test_a_set_made_stale_is_destroyed_after_its_rule_is_freed(node, defer, request):
    backend, ns = node
    dp = Dataplane(netns=ns, backend=backend)
    request.addfinalizer(dp.close)
    for _round in range(3):  # the kernel's RCU delay varies: a race would show in one of them
        dp.apply(_with_set(STALE), allow_sweep=True)
        assert STALE in _sets(ns)
        with capture_logs() as logs:
            rep = dp.apply(_without_set(), allow_sweep=True, defer=defer)
            done = dp.finish()
        assert not [e for e in logs if e["event"] in ("dataplane_ipset_destroy_failed", "dataplane_stale_ipset_kept")]
        assert STALE not in _sets(ns)
        destroyed = rep.ipsets_destroyed + (done.ipsets_destroyed if done is not None else [])
        assert destroyed == [STALE]
        if defer:
            assert rep.ipsets_destroyed == [], "finish() destroys them, after the commit was reported"
