"""End to end: `lab up --provider ec2`. vpcip-ipamd gets ENIs and addresses from the EC2
EMULATOR (moto + IMDSv2, policy_agent/lab/ec2emu.py, inside the lab's node netns), pods get
them through the real vpcip-cni, real traffic flows, and `lab down` leaves nothing."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess

import pytest

from policy_agent.lab import lab as L
from policy_agent.lab import netns

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

NAME = f"i12b{os.getpid()}"


def _ns(name):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"ns": name}}}


def _pod(ns, name, ports=True):
    spec = {"containers": [{"name": "c", "image": "none",
                            "ports": [{"containerPort": 80, "protocol": "TCP"}] if ports else []}]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": ns, "name": name, "labels": {"app": name}},
            "spec": spec}


def _ipj(ns: str, *args: str) -> list:
    return json.loads(subprocess.run(["ip", "-n", ns, "-j", *args], check=True, capture_output=True,
                                     text=True).stdout or "[]")


@pytest.fixture
def lab():
    L.down(NAME)
    lab = L.Lab(NAME)
    try:
        yield lab
    finally:
        L.down(NAME)


def test_lab_with_the_ec2_provider_gives_pods_eni_addresses_and_tears_down_clean(lab):
    # web/a first (the primary ENI), 8 pods without servers fill the primary ENI's 9
    # addresses (m5.large: 10 per ENI), then web/b and web/c land on the second ENI.
    docs = [_ns("web"), _ns("fill"), _pod("web", "a")] + [_pod("fill", f"f{i}", ports=False) for i in range(8)] \
        + [_pod("web", "b"), _pod("web", "c")]
    lab.up(docs, agent=True, timeout=180, provider="ec2")
    assert lab.status()["provider"] == "ec2" and lab.status()["in_sync"]
    subnet = ipaddress.ip_network(lab.ec2["node"]["subnet_cidr"])
    ips = {ref: p.ips[0] for ref, p in lab.pods.items()}
    assert all(ipaddress.ip_address(ip) in subnet for ip in ips.values()), ips

    # Every pod address is one EC2 (the emulator) reports on an ENI attached to the instance.
    enis = lab.ec2_enis()
    owner = {a: e for e in enis for a in e["addresses"]}
    assert set(ips.values()) <= set(owner), (ips, enis)
    assert owner[ips["web/a"]]["device"] == 0
    second = owner[ips["web/c"]]
    assert second["device"] >= 1 and owner[ips["web/b"]]["id"] == second["id"]

    # The secondary ENI's host side: its link (found by MAC), table device+1, source rule,
    # and the pods' rule 1536 into that table.
    node = lab.node_netns
    table = str(second["device"] + 1)
    link = [x for x in _ipj(node, "link", "show") if x.get("address") == second["mac"]]
    assert link and link[0]["mtu"] == 9001 and "UP" in link[0]["flags"], link
    gw = str(subnet.network_address + 1)
    routes = _ipj(node, "route", "show", "table", table)
    assert any(r["dst"] == "default" and r.get("gateway") == gw and r["dev"] == link[0]["ifname"] for r in routes)
    rules = _ipj(node, "rule", "show")
    assert any(r["priority"] == 32765 and r.get("src") == second["primary_ip"] and r["table"] == table for r in rules)
    assert any(r["priority"] == 1536 and r.get("src") == ips["web/c"] and r["table"] == table for r in rules)

    # Real traffic between pods on the primary and the secondary ENI, both ways.
    web = ["web/a", "web/b", "web/c"]
    for src in web:
        got = {r["to"]: r["connected"] for r in lab.probe(80, "TCP", src=src, timeout=1.0, attempts=3)
               if r["to"] in web}
        assert all(got.values()), (src, got)

    # A pod added to the running lab gets an EC2 address too.
    lab.apply([_pod("web", "d")])
    d_ip = lab.pods["web/d"].ips[0]
    assert d_ip in {a for e in lab.ec2_enis() for a in e["addresses"]}
    got = {r["to"]: r["connected"] for r in lab.probe(80, "TCP", src="web/d", timeout=1.0, attempts=3)
           if r["to"] in web}
    assert all(got.values()), got

    emu_pid = lab.pids["ec2emu"]
    L.down(NAME)
    assert netns.list_names(L.netns_prefix(NAME)) == []
    assert not os.path.exists(L.state_dir(NAME))
    assert not netns._alive(emu_pid)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert NAME not in listed
