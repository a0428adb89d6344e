"""Know when an nf_tables restore has committed, without waiting for its process to exit.

An nf_tables commit is done inside the restore's ``sendmsg``, a few milliseconds after
the batch is read. A restore process that then exits closes its netlink socket, and when
its batch deleted or replaced rules (``-R``, ``-D``, a chain flush: most deltas) the
kernel frees them in that close, after an RCU grace period, holding the namespace's
commit lock: 10-25 ms on this machine per restore, whatever its size, during which the
other family's restore and the next batch wait for the lock
(docs/decisions/commit-notification.md). The rules were enforced all that time.

So small batches go to a long-lived restore process (``runner.RestoreSession``), and a
batch is done when the kernel announces its commits: each commit is announced to
listeners of the ``NFNLGRP_NFTABLES`` group with an ``NFT_MSG_NEWGEN`` message naming
the committing socket's port id (the process id in its pid namespace, for a socket
bound with port 0, as libmnl does; ``socket_port`` reads the real one) and the process id.
``CommitWatch`` counts those of one port: once it has seen as many as the batch has
non-empty table blocks, every table of the batch is in the kernel. A batch the kernel
refuses is aborted and announces nothing; the process then exits non-zero and its error
is raised as before.

The socket listens only while a batch of ours is in flight (a listener makes the kernel
build a notification for every rule anybody writes: +10 % on a 20k-rule restore), and a
filter in the kernel keeps everything but NEWGEN out of it. Stdlib only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import time

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NEWGEN_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN
SO_ATTACH_FILTER = 26
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP, NETLINK_DROP_MEMBERSHIP = 1, 2
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, port id

# Classic BPF: accept a datagram whose first message is NEWGEN, drop the rest. The kernel
# sends NEWGEN in a datagram of its own; rule and chain notifications are batched in others.
_BPF_LD_H_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x28, 0x15, 0x06
# ldh loads in network byte order; nlmsg_type is in host order.
_TYPE_AS_LOADED = struct.unpack(">H", struct.pack("=H", NEWGEN_TYPE))[0]
_FILTER = [(_BPF_LD_H_ABS, 0, 0, 4), (_BPF_JEQ_K, 0, 1, _TYPE_AS_LOADED),
           (_BPF_RET_K, 0, 0, 0xFFFF), (_BPF_RET_K, 0, 0, 0)]
# Lines up to this many: a bigger batch (from empty, a refresh's repair) gains ~15 ms on
# seconds, and each of its rules would cost the kernel a notification for our socket.
MAX_LINES = 2000


def _attach_filter(sock: socket.socket) -> None:
    insns = b"".join(struct.pack("=HBBI", *i) for i in _FILTER)
    buf = ctypes.create_string_buffer(insns)
    prog = struct.pack("@HP", len(_FILTER), ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


def open_socket(subscribed: bool = True) -> socket.socket | None:
    """A socket for this namespace's commit announcements (heard while ``subscribe``d);
    None where that cannot be had (no permission, an old kernel)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    except OSError:
        return None
    try:
        _attach_filter(sock)
        sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1) if subscribed else 0))
        sock.setblocking(False)
    except OSError:
        sock.close()
        return None
    return sock


def subscribe(sock: socket.socket, on: bool) -> None:
    """Hear announcements only while a batch of ours is in flight: while anyone listens,
    the kernel builds a notification for every rule anybody writes."""
    opt = NETLINK_ADD_MEMBERSHIP if on else NETLINK_DROP_MEMBERSHIP
    sock.setsockopt(SOL_NETLINK, opt, NFNLGRP_NFTABLES)


def settle() -> None:
    """Wait until the kernel has freed the rules of past commits (in this thread's
    namespace). A deleted rule keeps the ipsets it matched in use until freed, after an
    RCU grace period; the kernel frees them at once whenever a netfilter netlink socket
    is released, as a restore process does when it exits. Then a set whose last rule
    was deleted can be destroyed."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))  # a port id: its release is what the kernel reacts to
    finally:
        sock.close()


def committing_ports(data: bytes) -> list[int]:
    """The port id of each NEWGEN message in one datagram (the committing sockets)."""
    out: list[int] = []
    off = 0
    while off + _NLMSG_HDR.size <= len(data):
        length, mtype, _flags, _seq, portid = _NLMSG_HDR.unpack_from(data, off)
        if length < _NLMSG_HDR.size or off + length > len(data):
            break  # malformed or cut short: the kernel sends neither
        if mtype == NEWGEN_TYPE:
            out.append(portid)
        off += (length + 3) & ~3
    return out


def socket_port(pid: int) -> int | None:
    """The port id of process ``pid``'s netfilter netlink socket, from the kernel's table
    (``/proc/<pid>/net/netlink``: its namespace's sockets, by inode); None if it has none.

    Not assumed to equal ``pid``: autobinding picks another port when the pid's is taken
    in this namespace, e.g. by a process in another pid namespace (kube-proxy's restore in
    its container) that has the same pid number."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open(f"/proc/{pid}/net/netlink") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        cols = row.split()
        if len(cols) >= 10 and cols[1] == str(NETLINK_NETFILTER) and cols[-1] in inodes:
            return int(cols[2]) & 0xFFFFFFFF
    return None


class CommitWatch:
    """Counts the commit announcements of one netlink port on a subscribed socket, for one
    batch. By port only: the process id the kernel adds is the host-wide one, which a
    process in a container does not know for its child."""

    def __init__(self, sock: socket.socket, port: int, commits: int):
        self.sock = sock
        self.port = port
        self.commits = commits
        self.seen = 0
        self.lost = False  # announcements were dropped (buffer overrun): only the exit tells
        self._read(count=False)  # queued before the batch was written: none of it is the batch's

    def _read(self, count: bool = True) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.lost = True
                    continue
                raise
            if count:
                self.seen += committing_ports(data).count(self.port)

    def wait(self, wake_fd: int, timeout: float) -> bool:
        """True once every commit was announced; False if ``wake_fd`` became readable
        first (the process exited: its status decides, and its port may be reused),
        announcements were lost, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            if self.lost:
                return False
            if self.seen >= self.commits:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _w, _x = select.select([self.sock, wake_fd], [], [], left)
            if wake_fd in ready:
                return False


def count_commits(text: str) -> int:
    """Table blocks with at least one line: each commits once (an empty one sends nothing)."""
    n, body = 0, False
    for ln in text.splitlines():
        if ln.startswith("*"):
            body = False
        elif ln.strip() == "COMMIT":
            n += body
        elif ln.strip() and not ln.startswith("#"):
            body = True
    return n


def wanted(text: str) -> bool:
    return text.count("\n") <= MAX_LINES
