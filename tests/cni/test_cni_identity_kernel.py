"""Two sandboxes of one pod on the real kernel: DEL/GC of the old one never touch the new one.

The real vpcip-cni and vpcip-ipamd in a node netns; pod netns behind real veths;
real TCP from the node to the new sandbox before and after every step.
"""

from __future__ import annotations

import threading
import time

import pytest
from cni_lab_helpers import kernel, pool_doc
from helpers import cni_sequences
from helpers.cni_sequences import first_ipv4 as ip4
from helpers.cni_sequences import read_record
from test_cni_kernel import connect, links, routes, rules, serve

from policy_agent.shared import endpoint, naming

pytestmark = [pytest.mark.kernel, kernel]

NS, POD = "shop", "db-0"
VETH = naming.veth_name("eni", NS, POD)
UID_OLD, UID_NEW = "6f1c0e2a-0000-4000-8000-00000000000a", "6f1c0e2a-0000-4000-8000-00000000000b"


def add(lab, cid: str, netns: str, uid: str, **conf) -> tuple[int, dict | None, str]:
    return lab.cni("ADD", lab.conf(**conf), cid=cid, netns=netns, pod=POD, ns=NS, uid=uid)


def delete(lab, cid: str, netns: str, uid: str) -> None:
    rc, out, err = lab.cni("DEL", cid=cid, netns=netns, pod=POD, ns=NS, uid=uid)
    assert rc == 0 and out is None, (out, err)


def record(lab) -> endpoint.EndpointRecord | None:
    return read_record(lab.endpoint_dir, NS, POD)


def allocations(lab) -> dict[str, str]:
    return {a["container_id"]: a["ipv4"] for a in lab.dump()["pool"]["allocations"]}


def node_view(lab) -> tuple:
    """What a wrong DEL/GC would change: the veth (by ifindex), routes, rules, allocations, record."""
    veth = links(lab.node).get(VETH, {})
    return (veth.get("ifindex"), sorted((r["dst"], r.get("dev")) for r in routes(lab.node)),
            sorted((r.get("priority"), r.get("src", ""), r.get("dst", ""), r.get("table")) for r in rules(lab.node)),
            sorted(allocations(lab).items()), record(lab))


class Sandboxes:
    """anchor (takes ENI 0's only slot), then ADD(old), then ADD(new): both on secondary ENIs (rules)."""

    def __init__(self, make_lab) -> None:
        self.lab = make_lab(pool_doc(enis=3, per_eni=1, ipv6=False))
        self.anchor_ns, _ = self.lab.add_pod("anchor")
        self.ns_old, self.ns_new = self.lab.new_pod_netns("old"), self.lab.new_pod_netns("new")
        rc, out, err = add(self.lab, "cid-old", self.ns_old, UID_OLD)
        assert rc == 0, (out, err, self.lab.log_text())
        self.ip_old = ip4(out)
        old_index = links(self.lab.node)[VETH]["ifindex"]
        rc, out, err = add(self.lab, "cid-new", self.ns_new, UID_NEW)
        assert rc == 0, (out, err, self.lab.log_text())
        self.ip_new = ip4(out)
        self.index = links(self.lab.node)[VETH]["ifindex"]
        assert self.index != old_index  # ADD(new) took the name over
        assert "eth0" not in links(self.ns_old) and "eth0" in links(self.ns_new)
        assert self.ip_old != self.ip_new
        self.server = serve(self.ns_new, self.ip_new)

    def assert_new_intact(self) -> None:
        lab = self.lab
        assert links(lab.node)[VETH]["ifindex"] == self.index
        assert any(r["dst"] == self.ip_new and r["dev"] == VETH for r in routes(lab.node))
        assert [(r["priority"], r["table"]) for r in rules(lab.node) if r.get("src") == self.ip_new] == [(1536, "3")]
        assert allocations(lab)["cid-new"] == self.ip_new
        rec = record(lab)
        assert rec.container_id == "cid-new" and rec.pod_uid == UID_NEW and rec.ips == (self.ip_new,)
        assert connect(lab.node, self.ip_new) == "hello from 10.233.199.1"

    def assert_old_gone(self) -> None:
        assert "cid-old" not in allocations(self.lab)
        assert not [r for r in rules(self.lab.node) if self.ip_old in (r.get("src"), r.get("dst"))]

    def close(self) -> None:
        self.server.kill()
        self.server.wait()


@pytest.fixture
def boxes(make_lab):
    b = Sandboxes(make_lab)
    yield b
    b.close()


def test_late_and_repeated_del_of_the_old_sandbox_leave_the_new_one(boxes):
    lab = boxes.lab
    boxes.assert_new_intact()
    delete(lab, "cid-old", boxes.ns_old, UID_OLD)
    boxes.assert_new_intact()
    boxes.assert_old_gone()
    # the old address is free: a third pod gets it
    before = node_view(lab)
    delete(lab, "cid-old", boxes.ns_old, UID_OLD)
    delete(lab, "cid-old", "", UID_OLD)  # the runtime may send no netns once the sandbox is gone
    assert node_view(lab) == before
    boxes.assert_new_intact()
    third_ns, third = lab.add_pod("third")
    assert ip4(third) == boxes.ip_old
    # DEL(new) still removes everything of the new sandbox
    delete(lab, "cid-new", boxes.ns_new, UID_NEW)
    assert VETH not in links(lab.node) and record(lab) is None
    assert not [r for r in rules(lab.node) if boxes.ip_new in (r.get("src"), r.get("dst"))]
    assert "cid-new" not in allocations(lab)


def test_gc_with_only_the_new_sandbox_valid(boxes):
    lab = boxes.lab
    valid = [{"containerID": c, "ifname": "eth0"} for c in ("cid-new", "cid-anchor")]
    rc, out, err = lab.cni("GC", lab.conf(version="1.1.0", **{"cni.dev/valid-attachments": valid}))
    assert rc == 0 and out is None, (out, err)
    boxes.assert_new_intact()
    boxes.assert_old_gone()
    before = node_view(lab)
    rc, out, err = lab.cni("GC", lab.conf(version="1.1.0", **{"cni.dev/valid-attachments": valid}))
    assert rc == 0 and node_view(lab) == before


def test_daemon_restart_between_add_new_and_del_old(boxes):
    lab = boxes.lab
    lab.stop_daemon()
    lab.start_daemon()
    boxes.assert_new_intact()
    boxes.assert_old_gone()  # reclaimed at start: its veth was taken over
    delete(lab, "cid-old", boxes.ns_old, UID_OLD)
    boxes.assert_new_intact()


# --- the UID handshake ---------------------------------------------------------------------


def stand_in_agent(lab, uid: str) -> threading.Thread:
    """Writes the status file the way the agent does, once the new sandbox's record is there."""
    return cni_sequences.stand_in_agent(lab.endpoint_dir, lab.status_dir, NS, POD, uid, timeout=60, poll=0.02)


def test_status_for_the_old_pod_uid_does_not_release_the_new_sandbox(make_lab):
    lab = make_lab()
    ns_old, ns_new = lab.new_pod_netns("old"), lab.new_pod_netns("new")
    rc, out, err = add(lab, "cid-old", ns_old, UID_OLD)
    assert rc == 0, (out, err)
    # The agent still holds the old Pod object: it programs the new record with the
    # old labels and says so with the old UID.
    t = stand_in_agent(lab, UID_OLD)
    t0 = time.monotonic()
    rc, out, _ = add(lab, "cid-new", ns_new, UID_NEW, policyWaitSeconds=1.5)
    t.join()
    assert time.monotonic() - t0 >= 1.5
    assert rc == 1 and out["code"] == 11 and "policy agent" in out["msg"], out
    assert UID_NEW in out["details"]
    assert "cid-new" not in allocations(lab) and "eth0" not in links(ns_new)
    assert VETH not in links(lab.node)
    # The agent sees the new Pod object: the same ADD is released.
    t = stand_in_agent(lab, UID_NEW)
    rc, out, err = add(lab, "cid-new", ns_new, UID_NEW, policyWaitSeconds=30)
    t.join()
    assert rc == 0, (out, err)
    assert record(lab).pod_uid == UID_NEW
    assert links(lab.node)[VETH] and "eth0" in links(ns_new)
