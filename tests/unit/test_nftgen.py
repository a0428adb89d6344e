"""Reading nf_tables commit announcements (NFT_MSG_NEWGEN), as the kernel lays them out."""

from __future__ import annotations

import errno
import os
import socket
import struct

from policy_agent.dataplane import nftgen


def _attr(atype: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _msg(mtype: int, portid: int, attrs: bytes) -> bytes:
    body = b"\0\0\0\x02" + attrs  # nfgenmsg: family, version, res_id (big endian)
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, portid) + body


def _newgen(portid: int, pid: int, comm: bytes = b"iptables-nft-re\0") -> bytes:
    return _msg(nftgen.NEWGEN_TYPE, portid,
                _attr(1, struct.pack(">I", 7)) + _attr(2, struct.pack(">I", pid)) + _attr(3, comm))


def test_a_newgen_names_its_socket():
    assert nftgen.committing_ports(_newgen(4242, 99_001)) == [4242]


def test_other_messages_and_truncation_are_skipped():
    newrule = _msg((10 << 8) | 6, 4242, _attr(1, b"filter\0"))
    data = newrule + _newgen(7, 8, b"x\0") + newrule
    assert nftgen.committing_ports(data) == [7]
    assert nftgen.committing_ports(_newgen(7, 8)[:18]) == []  # a message cut short
    assert nftgen.committing_ports(b"") == []


def test_a_newgen_without_the_process_attribute_still_counts_by_port():
    assert nftgen.committing_ports(_msg(nftgen.NEWGEN_TYPE, 31, _attr(1, struct.pack(">I", 3)))) == [31]


def test_commits_are_counted_by_table_block_and_big_batches_are_left_to_a_process():
    assert nftgen.count_commits("*filter\n-A x\nCOMMIT\n*raw\n-A y\nCOMMIT\n") == 2
    # an empty block commits nothing, so nothing is announced for it
    assert nftgen.count_commits("*filter\n-A x\nCOMMIT\n*raw\nCOMMIT\n") == 1
    assert nftgen.wanted("*filter\n" + "-A x\n" * 100 + "COMMIT\n")
    assert not nftgen.wanted("*filter\n" + "-A x\n" * (nftgen.MAX_LINES + 1) + "COMMIT\n")


# --- CommitWatch on a datagram socket we feed ourselves


class _Overrun:
    """A socket whose first receive reports a buffer overrun (ENOBUFS)."""

    def __init__(self, sock):
        self._sock = sock
        self._raised = False

    def fileno(self):
        return self._sock.fileno()

    def recv(self, n):
        if not self._raised:
            self._raised = True
            raise OSError(errno.ENOBUFS, "overrun")
        return self._sock.recv(n)


def _pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    return a, b


def test_only_the_batch_port_counts_and_what_came_before_does_not():
    rx, tx = _pair()
    r, w = os.pipe()
    try:
        tx.send(_newgen(700, 700))  # queued before the batch: not its commit
        watch = nftgen.CommitWatch(rx, 700, 1)
        tx.send(_newgen(999, 700))  # another socket, even with our process id
        assert not watch.wait(r, 0.2) and watch.seen == 0
        tx.send(_newgen(700, 12345))
        assert watch.wait(r, 1.0) and watch.seen == 1
    finally:
        rx.close(), tx.close(), os.close(r), os.close(w)


def test_an_exit_or_an_overrun_leaves_the_verdict_to_the_exit_status():
    rx, tx = _pair()
    r, w = os.pipe()
    try:
        watch = nftgen.CommitWatch(rx, 5, 2)
        tx.send(_newgen(5, 5))
        os.write(w, b"x")  # exited after one of its two commits
        assert not watch.wait(r, 1.0)
        lossy = nftgen.CommitWatch.__new__(nftgen.CommitWatch)
        lossy.sock, lossy.port, lossy.commits, lossy.seen, lossy.lost = _Overrun(rx), 5, 1, 0, False
        tx.send(_newgen(5, 5))
        r2, w2 = os.pipe()
        try:
            assert not lossy.wait(r2, 1.0) and lossy.lost
        finally:
            os.close(r2), os.close(w2)
    finally:
        rx.close(), tx.close(), os.close(r), os.close(w)
