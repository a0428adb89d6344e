"""An in-memory stand-in for cni_shim.plumbing, for tests of the daemon's bookkeeping.

It keeps what the kernel would: host links by name with ifindexes that are never
reused, each veth's peer (netns path, ifname), and the pod interfaces per netns.
A "netns" is any existing file (its inode is its identity); removing the file
kills the pod's side and with it the veth pair, as deleting a netns does.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Callable

from cni_shim.plumbing import Built, NetnsMissing, PlumbingError, PodNet


@dataclass
class FakeVeth:
    name: str
    index: int
    netns: str
    netns_inode: int
    ifname: str
    peer_index: int
    ipv4: str


class FakePlumbing:
    def __init__(self) -> None:
        self._next = itertools.count(10)
        self.links: dict[str, FakeVeth] = {}  # host name -> veth
        self.deleted: list[FakeVeth] = []

    # --- what the kernel would say ---------------------------------------------------

    def _alive(self, v: FakeVeth) -> bool:
        return netns_inode(v.netns) == v.netns_inode

    def _gc(self) -> None:
        for name in [n for n, v in self.links.items() if not self._alive(v)]:
            del self.links[name]

    def pod_interfaces(self, netns: str) -> set[str]:
        self._gc()
        ino = netns_inode(netns)
        return {v.ifname for v in self.links.values() if v.netns == netns and v.netns_inode == ino}

    # --- the plumbing interface -------------------------------------------------------

    def setup(self, pod: PodNet, after_veth: Callable[[], None] | None = None) -> Built:
        self._gc()
        ino = netns_inode(pod.netns)
        if not ino:
            raise NetnsMissing(f"network namespace {pod.netns} does not exist")
        old = self.links.pop(pod.host_veth, None)
        if old is not None:
            self.deleted.append(old)
        if pod.ifname in self.pod_interfaces(pod.netns):
            raise PlumbingError(f"interface {pod.ifname} already exists in {pod.netns}")
        v = FakeVeth(pod.host_veth, next(self._next), pod.netns, ino, pod.ifname, next(self._next), pod.ipv4)
        self.links[pod.host_veth] = v
        if after_veth is not None:
            after_veth()
        return Built(f"02:00:00:00:00:{v.index % 256:02x}", f"02:00:00:00:01:{v.index % 256:02x}", v.index,
                     v.peer_index)

    def teardown(self, pod: PodNet, host_ifindex: int = 0) -> None:
        self._gc()
        v = self.links.get(pod.host_veth)
        if host_ifindex and v is not None and v.index == host_ifindex:
            self.deleted.append(self.links.pop(pod.host_veth))

    def link_index(self, name: str) -> int | None:
        self._gc()
        v = self.links.get(name)
        return v.index if v is not None else None

    def peer_of(self, host_veth: str, netns: str, ifname: str) -> int:
        self._gc()
        v = self.links.get(host_veth)
        if v is None or not netns or v.netns != netns or v.ifname != ifname or netns_inode(netns) != v.netns_inode:
            return 0
        return v.index

    def host_links(self) -> dict[str, int]:
        self._gc()
        return {n: v.index for n, v in self.links.items()}

    @staticmethod
    def netns_inode(path: str) -> int:
        return netns_inode(path)

    def check(self, pod: PodNet, host_mac_expected: str = "") -> list[str]:
        self._gc()
        v = self.links.get(pod.host_veth)
        if v is None:
            return [f"host veth {pod.host_veth} is missing"]
        if v.netns != pod.netns or v.ifname != pod.ifname:
            return [f"pod interface {pod.ifname} is missing in {pod.netns}"]
        return []


def netns_inode(path: str) -> int:
    try:
        return os.stat(path).st_ino if path else 0
    except OSError:
        return 0
