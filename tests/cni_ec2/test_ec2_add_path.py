"""No EC2 call under the pool lock: with a slow EC2 (the fault proxy delays the call), DEL
and warm-pool ADD complete while a fill is in flight, and an ADD on an empty pool waits for
the background fill without blocking anyone, or fails with code 11 when its wait runs out.

The daemon's bookkeeping (commands.Service) runs for real against moto's EC2 server through
the proxy; only the kernel plumbing is the in-memory FakePlumbing (tests/cni covers it)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from cni_shim.commands import Service
from cni_shim.fake_plumbing import FakePlumbing
from cni_shim.ipam.checkpoint import Checkpoint
from cni_shim.ipam.ec2 import Ec2Provider, Ec2Settings
from cni_shim.ipam.imds import Imds
from cni_shim.ipam.pool import Pool, Targets
from cni_shim.ipam.retry import Backoff

SLOW = 4.0  # seconds the proxy holds each AssignPrivateIpAddresses


@pytest.fixture
def svc_of(emu, tmp_path):
    made = []

    def make(targets: Targets, add_wait: float = 30.0) -> Service:
        emu.make()
        prov = Ec2Provider.from_environment(Ec2Settings(cluster_name="lab"), imds=Imds())
        prov.backoff = Backoff(sleep=lambda s: None, rng=random.Random(1))
        ck = Checkpoint(str(tmp_path / "state"))
        ck.acquire()
        svc = Service(Pool(prov, targets), ck, plumbing=FakePlumbing(), add_wait=add_wait)
        svc.restore()
        made.append((svc, ck))
        return svc

    yield make
    emu.proxy.delay("AssignPrivateIpAddresses", 0)
    for svc, ck in made:
        if svc._filler is not None:
            svc._filler.join(30)  # a fill still in flight finishes before the emulator goes
        ck.release()


def conf(tmp_path) -> dict:
    return {"name": "vpcip", "veth_prefix": "eni", "mtu": 1500, "endpoint_dir": str(tmp_path / "ep"),
            "status_dir": str(tmp_path / "st"), "policy_wait": 0.0}


def add(svc: Service, tmp_path, i: int, **extra) -> dict:
    ns = tmp_path / f"ns{i}"
    ns.touch()
    return svc.handle({"op": "add", "container_id": f"c{i}", "ifname": "eth0", "netns": str(ns),
                       "namespace": "default", "pod": f"p{i}", "conf": {**conf(tmp_path), **extra}})


def delete(svc: Service, tmp_path, i: int) -> dict:
    return svc.handle({"op": "del", "container_id": f"c{i}", "ifname": "eth0", "netns": str(tmp_path / f"ns{i}"),
                       "namespace": "default", "pod": f"p{i}", "conf": conf(tmp_path)})


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_del_and_warm_add_complete_while_a_slow_fill_is_in_flight(emu, svc_of, tmp_path):
    svc = svc_of(Targets(warm_ip=3, cooldown=0))
    assert svc.pool.stats(0).available == 3
    assert add(svc, tmp_path, 0)["ok"] and add(svc, tmp_path, 1)["ok"]
    emu.proxy.delay("AssignPrivateIpAddresses", SLOW)
    fill = threading.Thread(target=svc.upkeep)  # 1 free < 3: claims 2 more, slowly
    fill.start()
    wait_until(lambda: emu.proxy.busy("AssignPrivateIpAddresses") == 1, 10, "the fill to reach EC2")
    d = delete(svc, tmp_path, 0)
    a = add(svc, tmp_path, 2)  # the warm address
    # Both answered while EC2 still holds the fill's call: neither waited for it.
    assert emu.proxy.busy("AssignPrivateIpAddresses") == 1 and fill.is_alive()
    assert d["ok"] and a["ok"], (d, a)
    fill.join(30)
    assert svc.pool.stats(0).available == 3


def test_add_on_an_empty_pool_waits_for_the_fill_without_holding_the_pool_lock(emu, svc_of, tmp_path):
    svc = svc_of(Targets(warm_ip=1, cooldown=0))
    assert add(svc, tmp_path, 0)["ok"]  # the one warm address
    emu.proxy.delay("AssignPrivateIpAddresses", SLOW)
    answers = {}
    waiter = threading.Thread(target=lambda: answers.setdefault(1, add(svc, tmp_path, 1)))
    waiter.start()  # no free address: waits for the background fill it woke
    wait_until(lambda: emu.proxy.busy("AssignPrivateIpAddresses") == 1, 10, "the fill to reach EC2")
    assert svc.pool.demand == 1
    assert delete(svc, tmp_path, 0)["ok"]  # the pool lock is free while the ADD waits
    waiter.join(30)
    assert answers[1]["ok"], answers
    ip = answers[1]["result"]["ips"][0]["address"].split("/")[0]
    eni = emu.ec2.describe_network_interfaces(NetworkInterfaceIds=[emu.node.primary_eni])["NetworkInterfaces"][0]
    assert ip in {x["PrivateIpAddress"] for x in eni["PrivateIpAddresses"] if not x["Primary"]}
    assert svc.pool.demand == 0


def test_add_whose_wait_runs_out_gets_code_11_and_the_fill_goes_on(emu, svc_of, tmp_path):
    svc = svc_of(Targets(warm_ip=1, cooldown=0), add_wait=0.5)
    assert add(svc, tmp_path, 0)["ok"]
    emu.proxy.delay("AssignPrivateIpAddresses", SLOW)
    t0 = time.monotonic()
    a = add(svc, tmp_path, 1)
    assert not a["ok"] and a["error"]["code"] == 11 and "the pool is growing" in a["error"]["msg"], a
    assert time.monotonic() - t0 < SLOW  # answered before EC2 did
    assert svc.pool.find(("vpcip", "c1", "eth0")) is None  # nothing reserved
    # The fill it woke finishes in the background; the kubelet's retry then succeeds.
    wait_until(lambda: svc.pool.stats(0).available >= 1, 30, "the background fill")
    emu.proxy.delay("AssignPrivateIpAddresses", 0)
    assert add(svc, tmp_path, 1)["ok"]


def test_request_timeout_bounds_the_wait(emu, svc_of, tmp_path):
    svc = svc_of(Targets(warm_ip=1, cooldown=0), add_wait=60)
    assert add(svc, tmp_path, 0)["ok"]
    emu.proxy.delay("AssignPrivateIpAddresses", SLOW)
    t0 = time.monotonic()
    a = add(svc, tmp_path, 1, request_timeout=2.0)  # the CNI gives up after 2 s: answer before
    assert not a["ok"] and a["error"]["code"] == 11 and time.monotonic() - t0 < 2.0, a
