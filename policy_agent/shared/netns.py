"""Entering a named network namespace from one thread (setns), stdlib only.

Shared by the dataplane runner, the lab and the CNI plumbing. setns moves only the
calling thread; children it spawns inherit the namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Iterator

NETNS_DIR = "/run/netns"  # where `ip netns add` mounts them (/var/run is a link to /run)
CLONE_NEWNET = 0x40000000
_libc = None


def check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or len(name) > 200:
        raise ValueError(f"bad network namespace name {name!r}")


def setns(fd: int) -> None:
    """Move this thread into the network namespace open at ``fd``."""
    global _libc
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered(fd: int) -> Iterator[None]:
    """This thread inside the namespace open at ``fd`` for the block, then back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
        try:
            yield
        finally:
            setns(own)  # if this fails the thread is lost: let it raise
    finally:
        os.close(own)


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """This thread inside the named namespace for the block; None = stay where we are."""
    if not name:
        yield
        return
    check_name(name)
    target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with entered(target):
            os.close(target)
            target = -1
            yield
    finally:
        if target >= 0:
            os.close(target)
