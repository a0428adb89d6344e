"""The agent loop with the real compiler and the real Dataplane over the in-memory fake kernel.

(The same loop against the real kernel, with traffic, is in test_kernel_e2e.py.)
"""

from __future__ import annotations

import pytest

from policy_agent.agent import Agent, PushSource
from policy_agent.compiler.options import NodeConfig
from policy_agent.dataplane.apply import Dataplane
from policy_agent.dataplane.fake import FakeKernel
from policy_agent.shared import endpoint as ep
from agent_helpers import ManualSource, allow_from, deny_all, iface, make_ns, make_pod, wait_for

NODE = NodeConfig("n1")


@pytest.fixture
def kernel():
    return FakeKernel()


def _agent(kernel, sources, tmp_path, **kw):
    dp = Dataplane(kernel=kernel, retries=1, backoff=0.0)
    kw.setdefault("min_interval", 0.0)
    kw.setdefault("refresh_interval", 0)
    a = Agent(NODE, dp, sources, status_dir=str(tmp_path / "status"), **kw)
    return a


def _save(kernel) -> str:
    return kernel.iptables_save(4)


def _rules_and_sets(kernel) -> str:
    """A pod's own address may be in a rule or only in a set (anti-spoofing hash:net,iface)."""
    return kernel.iptables_save(4) + kernel.ipset_save()


def test_no_kernel_write_before_every_source_is_in_sync(kernel, tmp_path):
    api = ManualSource("kube")
    cni = ManualSource("cni")
    a = _agent(kernel, [api, cni], tmp_path)
    a.start()
    try:
        api.replace("Pod", {("x", "a"): make_pod("x", "a", ["10.233.0.10"])})
        api.in_sync()
        cni.replace("Endpoint", {})
        # The loop has seen everything but cni's InSync: it must not write.
        wait_for(lambda: a.store.sync_counts.get("kube") == 1, what="kube InSync handled")
        assert not a.in_sync and not a.ready
        assert kernel.restores == []
        cni.in_sync()
        assert a.wait_ready(30)
        assert iface("x", "a") in _save(kernel)
        assert a.status()["last_apply_reason"] == "initial"
        # Everything queued before the barrier went out in one apply.
        assert a.apply_count == 1
    finally:
        a.stop()


def test_changes_reach_the_kernel_and_status_files(kernel, tmp_path):
    src = PushSource("kube", {"Namespace": {"x": make_ns("x")}})
    a = _agent(kernel, [src], tmp_path)
    a.start()
    try:
        assert a.wait_ready(30)
        status_dir = str(tmp_path / "status")
        src.upsert("Pod", ("x", "web"), make_pod("x", "web", ["10.233.0.20"]))
        wait_for(lambda: iface("x", "web") in _save(kernel), what="endpoint chain")
        st = wait_for(lambda: ep.read_status(status_dir, "x", "web"), what="status file")
        assert st.interface == iface("x", "web") and st.policies == ()

        src.upsert("NetworkPolicy", ("x", "deny-all"), deny_all("x"))
        wait_for(lambda: ep.read_status(status_dir, "x", "web").policies == ("x/deny-all",), what="policy in status")
        assert "pa-pi-x.deny-all" in _save(kernel)

        src.delete("NetworkPolicy", ("x", "deny-all"))
        wait_for(lambda: "pa-pi-x.deny-all" not in _save(kernel), what="policy chain swept")
        src.delete("Pod", ("x", "web"))
        wait_for(lambda: iface("x", "web") not in _save(kernel), what="endpoint chain gone")
        wait_for(lambda: ep.read_status(status_dir, "x", "web") is None, what="status file removed")
        # Every event was observed as enforced.
        assert a.metrics.event_to_enforced.labels("Pod")._sum.get() > 0
    finally:
        a.stop()


def test_endpoint_record_ips_used_before_the_api_reports_them(kernel, tmp_path):
    api = PushSource("kube", {"Pod": {("x", "new"): make_pod("x", "new", ips=())}})
    cni = PushSource("cni")
    a = _agent(kernel, [api, cni], tmp_path)
    a.start()
    try:
        assert a.wait_ready(30)
        assert "10.233.0.33" not in _rules_and_sets(kernel)
        assert ep.read_status(str(tmp_path / "status"), "x", "new") is None  # no address: no rules, no status
        rec = ep.EndpointRecord("x", "new", "c0ffee", iface("x", "new"), ("10.233.0.33",))
        cni.upsert("Endpoint", ("x", "new"), rec)
        wait_for(lambda: "10.233.0.33" in _rules_and_sets(kernel), what="record IP in the rules")
        st = wait_for(lambda: ep.read_status(str(tmp_path / "status"), "x", "new"), what="status file")
        assert st.container_id == "c0ffee"
        # The API catches up with the same IP: nothing to change.
        applies = a.apply_count
        api.upsert("Pod", ("x", "new"), make_pod("x", "new", ips=["10.233.0.33"]))
        wait_for(lambda: a.status()["pending_events"] == 0, what="event handled")
        assert a.apply_count == applies
    finally:
        a.stop()


def test_record_for_pod_without_node_name_makes_it_local(kernel, tmp_path):
    api = PushSource("kube", {"Pod": {("x", "p"): make_pod("x", "p", node=None)}})
    rec = ep.EndpointRecord("x", "p", "c1", iface("x", "p"), ("10.233.0.44",))
    cni = PushSource("cni", {"Endpoint": {("x", "p"): rec}})
    a = _agent(kernel, [api, cni], tmp_path)
    a.start()
    try:
        assert a.wait_ready(30)
        assert "10.233.0.44" in _rules_and_sets(kernel)
    finally:
        a.stop()


def test_failed_apply_is_retried_and_events_stay_pending(kernel, tmp_path):
    src = PushSource("kube")
    a = _agent(kernel, [src], tmp_path)
    a.start()
    try:
        assert a.wait_ready(30)
        kernel.fail_next = 10_000
        src.upsert("Pod", ("x", "r"), make_pod("x", "r", ["10.233.0.55"]))
        wait_for(lambda: a.metrics.errors.labels("apply", "")._value.get() >= 2, what="failed, retried")
        assert a.status()["pending_events"] >= 1
        assert a.status()["errors"]["last"].startswith("apply:")
        kernel.fail_next = 0
        wait_for(lambda: iface("x", "r") in _save(kernel), timeout=60, what="retry succeeded")
        wait_for(lambda: a.status()["pending_events"] == 0, what="pending drained")
    finally:
        a.stop()


def test_burst_is_coalesced_by_min_interval(kernel, tmp_path):
    src = PushSource("kube")
    a = _agent(kernel, [src], tmp_path, min_interval=5.0)
    a.start()
    try:
        assert a.wait_ready(30)
        before = a.apply_count
        for i in range(50):
            src.upsert("Pod", ("x", f"p{i}"), make_pod("x", f"p{i}", [f"10.233.1.{i}"]))
        wait_for(lambda: a.apply_count > before and a.status()["pending_events"] == 0, what="burst applied")
        assert iface("x", "p49") in _save(kernel)
        assert a.apply_count == before + 1
        hist = a.metrics.event_to_enforced.labels("Pod")
        assert hist._sum.get() > 0
    finally:
        a.stop()


def test_resync_and_refresh_run_on_their_timers(kernel, tmp_path):
    src = PushSource("kube", {"Pod": {("x", "a"): make_pod("x", "a", ["10.233.0.66"])},
                              "NetworkPolicy": {("x", "p"): allow_from("x", "p", {"app": "a"}, {"app": "b"}, 80)}})
    a = _agent(kernel, [src], tmp_path, max_interval=0.3, refresh_interval=0.3)
    a.start()
    try:
        assert a.wait_ready(30)
        wait_for(lambda: a.metrics.applies.labels("resync")._value.get() >= 2, what="resyncs")
        wait_for(lambda: a.metrics.refreshes._value.get() >= 2, what="refreshes")
        # Someone flushes our policy chain: refresh puts it back.
        kernel.iptables_restore(4, "*filter\n-F pa-pi-x.p\nCOMMIT\n")
        wait_for(lambda: "pa-pi-x.p -m comment" in _save(kernel), what="repaired")
    finally:
        a.stop()


def test_stop_leaves_the_rules(kernel, tmp_path):
    src = PushSource("kube", {"Pod": {("x", "a"): make_pod("x", "a", ["10.233.0.77"])}})
    a = _agent(kernel, [src], tmp_path)
    a.start()
    assert a.wait_ready(30)
    before = _save(kernel)
    a.stop()
    assert _save(kernel) == before and iface("x", "a") in before


def test_relist_with_nothing_new_costs_no_apply(kernel, tmp_path):
    objs = {("x", "a"): make_pod("x", "a", ["10.233.0.88"])}
    src = ManualSource("kube")
    a = _agent(kernel, [src], tmp_path)
    a.start()
    try:
        src.replace("Pod", objs)
        src.in_sync()
        assert a.wait_ready(30)
        n = a.apply_count
        src.replace("Pod", dict(objs))
        src.in_sync()
        wait_for(lambda: a.store.sync_counts["kube"] == 2, what="relist handled")
        wait_for(lambda: a.status()["pending_events"] == 0, what="drained")
        assert a.apply_count == n
        assert a.metrics.watch_restarts.labels("kube")._value.get() == 1
    finally:
        a.stop()
