"""No root: DEL/GC/ADD ownership and the UID handshake in the daemon, over the fake plumbing.

The same sequences run on the real kernel in test_cni_identity_kernel.py.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import time

import pytest
import structlog
from cni_lab_helpers import pool_doc
from helpers.cni_sequences import first_ipv4 as ip_of
from helpers.cni_sequences import read_record, stand_in_agent

from cni_shim.commands import Service
from cni_shim.fake_plumbing import FakePlumbing
from cni_shim.ipam.checkpoint import Checkpoint
from cni_shim.ipam.pool import Pool, Targets
from cni_shim.ipam.provider import StaticProvider
from cni_shim.locks import KeyedLocks
from cni_shim.protocol import CNIError, parse_request
from policy_agent.shared import endpoint, naming

NS, POD = "shop", "web-0"
VETH = naming.veth_name("eni", NS, POD)


class MemoryCheckpoint(Checkpoint):
    """The real Checkpoint without the disk (for the 10,000-cycle test)."""

    def __init__(self) -> None:
        super().__init__("/nonexistent")
        self.data: dict | None = None

    def load(self) -> dict | None:
        return self.data

    def save(self, data: dict) -> None:
        self.data = data  # to_dict() builds fresh containers every time


class Node:
    def __init__(self, tmp, checkpoint: Checkpoint | None = None, pool: dict | None = None) -> None:
        self.tmp = tmp
        self.endpoint_dir = str(tmp / "endpoints")
        self.status_dir = str(tmp / "status")
        os.makedirs(self.status_dir, exist_ok=True)
        self.provider = StaticProvider.from_dict(pool or pool_doc())
        if checkpoint is None:
            checkpoint = Checkpoint(str(tmp / "state"))
            checkpoint.acquire()
        self.checkpoint = checkpoint
        self.plumbing = FakePlumbing()
        self.svc = self.new_service()

    def new_service(self) -> Service:
        svc = Service(Pool(self.provider, Targets(cooldown=0)), self.checkpoint, plumbing=self.plumbing)
        svc.restore()
        return svc

    def netns(self, name: str) -> str:
        path = str(self.tmp / f"netns-{name}")
        open(path, "w").close()
        return path

    def conf(self, **over) -> dict:
        c = {"name": "vpcip-test", "veth_prefix": "eni", "mtu": 1500, "endpoint_dir": self.endpoint_dir,
             "status_dir": self.status_dir, "policy_wait": 0.0}
        c.update(over)
        return c

    def req(self, op: str, cid: str, netns: str = "", uid: str = "", pod: str = POD, **conf) -> dict:
        return {"op": op, "container_id": cid, "ifname": "eth0", "netns": netns, "namespace": NS, "pod": pod,
                "pod_uid": uid, "conf": self.conf(**conf)}

    def add(self, cid: str, netns: str, uid: str = "", **conf) -> dict:
        answer = self.svc.handle(self.req("add", cid, netns, uid, **conf))
        assert answer["ok"], answer
        return answer["result"]

    def delete(self, cid: str, netns: str = "", uid: str = "") -> None:
        answer = self.svc.handle(self.req("del", cid, netns, uid))
        assert answer == {"ok": True, "result": {}}, answer

    def gc(self, valid: list[str]) -> dict:
        answer = self.svc.handle({"op": "gc", "conf": self.conf(),
                                  "valid_attachments": [[c, "eth0"] for c in valid]})
        assert answer["ok"], answer
        return answer["result"]

    def record(self) -> endpoint.EndpointRecord | None:
        return read_record(self.endpoint_dir, NS, POD)

    def allocations(self) -> dict[str, str]:
        return {a.container_id: a.ipv4 for a in self.svc.pool.allocations_list()}

    def state(self) -> tuple:
        """Everything a DEL or GC could wrongly change."""
        rec = self.record()
        return (self.plumbing.host_links(), sorted(self.allocations().items()), rec,
                endpoint.read_status(self.status_dir, NS, POD))


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path)


def old_and_new(node: Node) -> tuple[str, str, str, str]:
    """ADD(old) then ADD(new) of the same pod; returns (old ns, new ns, old ip, new ip)."""
    ns_old, ns_new = node.netns("old"), node.netns("new")
    ip_old = ip_of(node.add("cid-old", ns_old, uid="uid-1"))
    old_index = node.plumbing.link_index(VETH)
    ip_new = ip_of(node.add("cid-new", ns_new, uid="uid-2"))
    assert ip_old != ip_new
    # The new sandbox took the name over: the old veth is gone, so is the old pod's eth0.
    assert node.plumbing.link_index(VETH) not in (None, old_index)
    assert node.plumbing.pod_interfaces(ns_old) == set() and node.plumbing.pod_interfaces(ns_new) == {"eth0"}
    old = node.svc.pool.by_container("cid-old")[0]
    assert old.host_veth == "" and old.host_ifindex == 0  # recorded: owns no veth any more
    assert node.record().container_id == "cid-new" and node.record().pod_uid == "uid-2"
    return ns_old, ns_new, ip_old, ip_new


def assert_new_intact(node: Node, ns_new: str, ip_new: str, index: int) -> None:
    assert node.plumbing.link_index(VETH) == index
    assert node.plumbing.pod_interfaces(ns_new) == {"eth0"}
    assert node.allocations().get("cid-new") == ip_new
    rec = node.record()
    assert rec is not None and rec.container_id == "cid-new" and rec.pod_uid == "uid-2" and ip_new in rec.ips


def test_late_del_of_old_sandbox_frees_only_its_address(node):
    ns_old, ns_new, ip_old, ip_new = old_and_new(node)
    index = node.plumbing.link_index(VETH)
    endpoint.write_status(node.status_dir, endpoint.EndpointStatus(NS, POD, "cid-new", VETH, 1.0, (), "uid-2"))
    node.delete("cid-old", ns_old)
    assert_new_intact(node, ns_new, ip_new, index)
    assert "cid-old" not in node.allocations()
    assert endpoint.read_status(node.status_dir, NS, POD).container_id == "cid-new"
    # the old address is free again (cooldown 0): a third pod may get it
    assert ip_old not in node.allocations().values()
    # and a repeated DEL(old) changes nothing at all, with or without its netns
    before = node.state()
    node.delete("cid-old", ns_old)
    os.unlink(ns_old)
    node.delete("cid-old", ns_old)
    node.delete("cid-old", "")
    assert node.state() == before
    # DEL(new) removes what is the new sandbox's
    node.delete("cid-new", ns_new)
    assert node.plumbing.host_links() == {} and node.record() is None and node.allocations() == {}
    assert endpoint.read_status(node.status_dir, NS, POD) is None


def test_gc_with_only_the_new_sandbox_valid_keeps_it(node):
    ns_old, ns_new, ip_old, ip_new = old_and_new(node)
    index = node.plumbing.link_index(VETH)
    assert node.gc(["cid-new"]) == {"freed": 1}
    assert_new_intact(node, ns_new, ip_new, index)
    assert list(node.allocations()) == ["cid-new"]
    before = node.state()
    assert node.gc(["cid-new"]) == {"freed": 0}
    node.delete("cid-old", ns_old)
    assert node.state() == before


def test_del_before_the_takeover_still_removes_the_old_veth(node):
    """Ownership must not stop a plain DEL from cleaning up its own sandbox."""
    ns = node.netns("only")
    node.add("cid-a", ns, uid="uid-1")
    node.delete("cid-a", ns)
    assert node.plumbing.host_links() == {} and node.record() is None and node.allocations() == {}


def test_unknown_del_removes_a_veth_only_when_its_peer_is_in_the_callers_netns(node):
    """A DEL the pool does not know (lost checkpoint): the veth must prove it is the caller's."""
    ns_a, ns_b = node.netns("a"), node.netns("b")
    node.add("cid-a", ns_a)
    index = node.plumbing.link_index(VETH)
    with node.svc.lock:  # forget the allocation, as a lost checkpoint would
        node.svc.pool.allocations.clear()
    node.delete("cid-other", ns_b)  # another sandbox's DEL: not its veth, not its record
    assert node.plumbing.link_index(VETH) == index and node.record().container_id == "cid-a"
    node.delete("cid-a", ns_a)
    assert node.plumbing.host_links() == {} and node.record() is None


def test_restart_reclaims_the_taken_over_allocation_without_touching_the_new_sandbox(node):
    ns_old, ns_new, ip_old, ip_new = old_and_new(node)
    index = node.plumbing.link_index(VETH)
    node.svc = node.new_service()  # a daemon restart over the same checkpoint
    assert_new_intact(node, ns_new, ip_new, index)
    assert list(node.allocations()) == ["cid-new"]


def test_restart_adopts_a_legacy_allocation_only_if_its_veth_is_provably_its_own(node):
    ns_a = node.netns("a")
    node.add("cid-a", ns_a)
    index = node.plumbing.link_index(VETH)
    data = node.checkpoint.load()
    for a in data["allocations"]:  # as written before ifindexes were kept
        for k in ("host_ifindex", "peer_ifindex", "netns_inode", "pod_uid", "status_dir"):
            a.pop(k)
    node.checkpoint.save(data)
    node.svc = node.new_service()
    (a,) = node.svc.pool.allocations_list()
    assert a.host_ifindex == index and node.plumbing.link_index(VETH) == index
    # a legacy allocation whose name is now another sandbox's veth is reclaimed, the veth left
    data = node.checkpoint.load()
    data["allocations"][0].update(container_id="cid-ghost", netns=str(node.tmp / "gone"), host_ifindex=0)
    node.checkpoint.save(data)
    node.svc = node.new_service()
    assert node.allocations() == {} and node.plumbing.link_index(VETH) == index
    assert node.record().container_id == "cid-a"  # not the ghost's: left


def test_failed_add_of_new_sandbox_undoes_only_its_own(node):
    ns_old, ns_new = node.netns("old"), node.netns("new")
    ip_old = ip_of(node.add("cid-old", ns_old, uid="uid-1"))
    not_a_dir = str(node.tmp / "file")
    open(not_a_dir, "w").close()
    answer = node.svc.handle(node.req("add", "cid-new", ns_new, "uid-2", endpoint_dir=not_a_dir))
    assert not answer["ok"] and answer["error"]["code"] == 5, answer
    assert node.allocations() == {"cid-old": ip_old}  # the old address stays until DEL(old)
    assert node.record().container_id == "cid-old"
    assert node.plumbing.link_index(VETH) is None  # the new veth is undone; the old one was taken over


# --- the UID handshake -----------------------------------------------------------------


def agent_writes(node: Node, uid: str, after: float = 0.1) -> threading.Thread:
    """A stand-in agent: once the record appears, write a status naming its container and uid."""
    return stand_in_agent(node.endpoint_dir, node.status_dir, NS, POD, uid, timeout=20, after=after, poll=0.01)


def test_status_for_the_old_pod_uid_does_not_release_the_new_sandbox(node):
    ns_old, ns_new = node.netns("old"), node.netns("new")
    node.add("cid-old", ns_old, uid="uid-1")
    t = agent_writes(node, "uid-1")  # the agent still has the old Pod object
    t0 = time.monotonic()
    answer = node.svc.handle(node.req("add", "cid-new", ns_new, "uid-2", policy_wait=1.0))
    t.join()
    assert time.monotonic() - t0 >= 1.0
    assert not answer["ok"] and answer["error"]["code"] == 11, answer
    assert "pod_uid uid-2" in answer["error"]["details"]
    assert "cid-new" not in node.allocations() and node.plumbing.link_index(VETH) is None
    # the status (cid-new, uid-1) named the failed ADD's container: removed with it
    assert endpoint.read_status(node.status_dir, NS, POD) is None


def test_status_for_the_new_pod_uid_releases_it(node):
    ns_old, ns_new = node.netns("old"), node.netns("new")
    node.add("cid-old", ns_old, uid="uid-1")
    t = agent_writes(node, "uid-2")
    answer = node.svc.handle(node.req("add", "cid-new", ns_new, "uid-2", policy_wait=10.0))
    t.join()
    assert answer["ok"], answer
    assert node.record().pod_uid == "uid-2"


def test_without_a_pod_uid_the_container_id_alone_decides(node):
    ns_new = node.netns("new")
    t = agent_writes(node, "")
    answer = node.svc.handle(node.req("add", "cid-new", ns_new, "", policy_wait=10.0))
    t.join()
    assert answer["ok"], answer


def test_stale_status_of_the_same_container_id_is_not_taken_for_a_new_add(node):
    ns = node.netns("a")
    endpoint.write_status(node.status_dir, endpoint.EndpointStatus(NS, POD, "cid-a", VETH, 1.0, (), "uid-1"))
    answer = node.svc.handle(node.req("add", "cid-a", ns, "uid-1", policy_wait=0.3))
    assert not answer["ok"] and answer["error"]["code"] == 11


# --- locks, protocol -------------------------------------------------------------------


@pytest.mark.slow
def test_lock_tables_stay_bounded_over_10000_add_del_cycles(tmp_path_factory):
    # records on tmpfs when there is one: 10,000 fsyncs on a disk take a while
    base = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path_factory.getbasetemp())
    tmp = tempfile.mkdtemp(prefix="pa-cni-locks-", dir=base)
    try:
        _cycles(pathlib.Path(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cycles(tmp) -> None:
    node = Node(tmp, checkpoint=MemoryCheckpoint(), pool=pool_doc(enis=1, per_eni=1, limits=(1, 2)))
    ns = node.netns("p")
    # info logs off: rendering 20,000 of them would be most of the run time
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        for i in range(10_000):
            node.add(f"cid-{i}", ns)
            node.delete(f"cid-{i}", ns)
    finally:
        structlog.reset_defaults()
    assert len(node.svc.container_locks) == 0 and len(node.svc.pod_locks) == 0
    assert node.allocations() == {} and node.plumbing.host_links() == {}


def test_keyed_locks_exclude_per_key_and_drop_idle_keys():
    locks = KeyedLocks()
    inside, peak = [0], [0]
    guard = threading.Lock()

    def work(key: str) -> None:
        for _ in range(200):
            with locks.hold(key):
                with guard:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                time.sleep(0)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=work, args=("same",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1 and len(locks) == 0
    with locks.hold("k"):
        with locks.hold("k", blocking=False) as got:
            assert got is False
        assert len(locks) == 1
    assert len(locks) == 0


def test_pod_uid_travels_from_cni_args_and_a_bad_one_is_refused_on_add():
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "vpcip-cni"})
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p;K8S_POD_UID=0b5c6d2e-1f3a-4b5c-8d9e-0f1a2b3c4d5e"}
    req = parse_request(env, conf, "/e", "/s")
    assert req.to_wire()["pod_uid"] == "0b5c6d2e-1f3a-4b5c-8d9e-0f1a2b3c4d5e"
    with pytest.raises(CNIError) as exc:
        parse_request({**env, "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p;K8S_POD_UID=a b"}, conf, "/e", "/s")
    assert exc.value.code == 4 and "K8S_POD_UID" in exc.value.msg
    # DEL must succeed whatever the runtime sends: a bad UID is ignored
    bad = {**env, "CNI_COMMAND": "DEL", "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p;K8S_POD_UID=a b"}
    assert parse_request(bad, conf, "/e", "/s").to_wire()["pod_uid"] == ""


def test_records_and_status_files_without_pod_uid_still_read():
    rec = endpoint.EndpointRecord.from_json(json.dumps(
        {"namespace": "x", "pod": "p", "container_id": "c", "interface": "enix", "ips": ["10.233.0.1"]}))
    assert rec.pod_uid == ""
    st = endpoint.EndpointStatus.from_json(json.dumps({"namespace": "x", "pod": "p", "container_id": "c"}))
    assert st.pod_uid == ""
    full = endpoint.EndpointRecord("x", "p", "c", "enix", ("10.233.0.1",), pod_uid="u")
    assert endpoint.EndpointRecord.from_json(full.to_json()) == full
