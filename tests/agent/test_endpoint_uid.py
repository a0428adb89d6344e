"""A pod recreated under the same name: the endpoint record and the Pod object meet by UID.

An old Pod object (its labels, its policies) must never be merged with the new
sandbox's record, nor release it with a status file.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from policy_agent.agent import Agent, PushSource
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.shared import endpoint as ep
from policy_agent.sources.events import Upsert
from policy_agent.store import Store
from agent_helpers import iface, make_ns, make_pod, wait_for

NODE = NodeConfig("n1")


def pod(uid: str, ips=("10.233.0.10",), labels=None):
    return dataclasses.replace(make_pod("x", "db-0", list(ips), labels=labels), uid=uid)


def record(uid: str, ip: str = "10.233.0.77", cid: str = "cid-new") -> ep.EndpointRecord:
    return ep.EndpointRecord("x", "db-0", cid, iface("x", "db-0"), (ip,), created=2.0, pod_uid=uid)


def test_store_merges_a_record_only_with_the_pod_object_of_its_uid():
    s = Store("n1")
    s.apply(Upsert("kube", "Pod", ("x", "db-0"), pod("uid-old")))
    s.apply(Upsert("cni", "Endpoint", ("x", "db-0"), record("uid-new")))
    eff = s.take_changes().pods[("x", "db-0")]
    assert eff.ips == () and eff.uid == "uid-old"  # neither the record's nor the stale API address
    s.apply(Upsert("kube", "Pod", ("x", "db-0"), pod("uid-new", ips=())))
    eff = s.take_changes().pods[("x", "db-0")]
    assert eff.ips == (ipaddress.ip_address("10.233.0.77"),) and eff.uid == "uid-new"


@pytest.mark.parametrize("pod_uid,rec_uid", [("", "uid-new"), ("uid-new", ""), ("", "")])
def test_store_merges_when_either_uid_is_unknown(pod_uid, rec_uid):
    s = Store("n1")
    s.apply(Upsert("kube", "Pod", ("x", "db-0"), pod(pod_uid, ips=())))
    s.apply(Upsert("cni", "Endpoint", ("x", "db-0"), record(rec_uid)))
    assert s.take_changes().pods[("x", "db-0")].ips == (ipaddress.ip_address("10.233.0.77"),)


def test_agent_writes_no_status_for_a_record_of_another_pod_uid(tmp_path):
    kernel = FakeKernel()
    status_dir = str(tmp_path / "status")
    api = PushSource("kube", {"Namespace": {"x": make_ns("x")},
                              "Pod": {("x", "db-0"): pod("uid-old", labels={"app": "old"})}})
    cni = PushSource("cni")
    a = Agent(NODE, Dataplane(kernel=kernel, retries=1, backoff=0.0), [api, cni], status_dir=status_dir,
              min_interval=0.0, refresh_interval=0)
    a.start()
    try:
        assert a.wait_ready(30)
        old = wait_for(lambda: ep.read_status(status_dir, "x", "db-0"), what="status of the old pod")
        assert old.container_id == "" and old.pod_uid == "uid-old"
        # The new sandbox's record arrives before the new Pod object.
        cni.upsert("Endpoint", ("x", "db-0"), record("uid-new"))
        wait_for(lambda: ep.read_status(status_dir, "x", "db-0") is None, what="old status withdrawn")
        wait_for(lambda: a.status()["pending_events"] == 0, what="record handled")
        assert ep.read_status(status_dir, "x", "db-0") is None
        assert "10.233.0.77" not in kernel.iptables_save(4) + kernel.ipset_save()
        # The agent sees the new object: now it is merged and released.
        api.upsert("Pod", ("x", "db-0"), pod("uid-new", ips=(), labels={"app": "new"}))
        st = wait_for(lambda: ep.read_status(status_dir, "x", "db-0"), what="status of the new pod")
        assert st.container_id == "cid-new" and st.pod_uid == "uid-new"
        assert "10.233.0.77" in kernel.iptables_save(4) + kernel.ipset_save()
    finally:
        a.stop()
