"""Secondary-ENI host plumbing (cni_shim/eni.py) on real links in a private netns.

No dummy driver in this kernel: a veth whose MAC is set to the ENI's MAC stands in
for the link EC2's attach makes appear. Everything is read back with `ip -n`.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from cni_shim.eni import ENI_SOURCE_RULE_PRIORITY, EniNet, EniPlumbingError, check_eni, setup_eni, teardown_eni

pytestmark = pytest.mark.kernel

MAC = "02:12:0b:00:00:21"
NET = EniNet(id="eni-0test", mac=MAC, device=1, table=2, primary_ip="10.233.0.20", subnet_cidr="10.233.0.0/20")


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


def ipj(ns: str, *args: str) -> list:
    return json.loads(ip(ns, "-j", *args) or "[]")


@pytest.fixture
def ns():
    name = f"i12b-eni-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip(name, "link", "set", "lo", "up")
        # The ENI's stand-in, down and at MTU 1500 as a fresh hot-plugged link is.
        ip(name, "link", "add", "ens6", "address", MAC, "type", "veth", "peer", "name", "ens6peer")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def snapshot(ns: str) -> dict:
    return {
        "links": [(x["ifname"], x["mtu"], x["operstate"], x.get("address")) for x in ipj(ns, "link", "show")],
        "addrs": sorted((x["ifname"], a["local"], a["prefixlen"]) for x in ipj(ns, "addr", "show")
                        for a in x.get("addr_info", [])),
        "routes": sorted(json.dumps(r, sort_keys=True) for r in ipj(ns, "route", "show", "table", "all")),
        "rules": sorted(json.dumps(r, sort_keys=True) for r in ipj(ns, "rule", "show")),
    }


def test_setup_builds_link_table_and_source_rule_idempotently_and_teardown_removes_them(ns):
    path = f"/run/netns/{ns}"
    assert check_eni(NET, path)  # nothing there yet
    idx = setup_eni(NET, path)
    assert check_eni(NET, path) == []
    link = ipj(ns, "link", "show", "ens6")[0]
    assert link["ifindex"] == idx and link["mtu"] == 9001 and "UP" in link["flags"]
    table = {(r["dst"], r.get("gateway"), r.get("scope")) for r in ipj(ns, "route", "show", "table", "2")}
    assert table == {("10.233.0.0/20", None, "link"), ("10.233.0.1", None, "link"), ("default", "10.233.0.1", None)}
    assert not any(r["dst"] == "10.233.0.0/20" for r in ipj(ns, "route", "show", "table", "main"))
    rules = [r for r in ipj(ns, "rule", "show") if r["priority"] == ENI_SOURCE_RULE_PRIORITY]
    assert [(r["src"], r.get("srclen", 32), r["table"]) for r in rules] == [("10.233.0.20", 32, "2")]
    # The kernel's own answer: from the ENI's address, out of the ENI via the subnet gateway;
    # from anywhere else, not through table 2.
    got = ipj(ns, "route", "get", "192.0.2.9", "from", "10.233.0.20")[0]
    assert (got["dev"], got.get("gateway")) == ("ens6", "10.233.0.1")
    # Idempotent: a second call changes nothing at all.
    before = snapshot(ns)
    assert setup_eni(NET, path) == idx
    assert snapshot(ns) == before
    teardown_eni(NET, path)
    assert ipj(ns, "route", "show", "table", "2") == []
    assert not [r for r in ipj(ns, "rule", "show") if r["priority"] == ENI_SOURCE_RULE_PRIORITY]
    assert not [a for x in ipj(ns, "addr", "show", "ens6") for a in x.get("addr_info", [])]
    assert ipj(ns, "link", "show", "ens6")  # the link is EC2's to remove (detach), not ours
    teardown_eni(NET, path)  # idempotent


def test_pod_on_the_eni_leaves_through_its_table(ns):
    """With the pod rule (1536, plumbing.py) the pod's traffic to the outside uses the ENI."""
    path = f"/run/netns/{ns}"
    setup_eni(NET, path)
    ip(ns, "link", "add", "enipod", "type", "veth", "peer", "name", "enipodp")
    ip(ns, "link", "set", "enipod", "up")
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    ip(ns, "rule", "add", "from", "10.233.0.30/32", "lookup", "2", "priority", "1536")
    got = ipj(ns, "route", "get", "192.0.2.9", "from", "10.233.0.30", "iif", "enipod")[0]
    assert (got["dev"], got.get("gateway")) == ("ens6", "10.233.0.1")


def test_missing_link_is_a_clear_error_naming_the_eni_and_mac(ns):
    other = EniNet(id="eni-0gone", mac="02:12:0b:00:00:99", device=2, table=3, primary_ip="10.233.0.21",
                   subnet_cidr="10.233.0.0/20")
    with pytest.raises(EniPlumbingError, match="eni-0gone.*02:12:0b:00:00:99"):
        setup_eni(other, f"/run/netns/{ns}", wait=0.5)
    with pytest.raises(EniPlumbingError, match="primary ENI uses main"):
        setup_eni(EniNet("eni-0p", MAC, 0, 254, "10.233.0.20", "10.233.0.0/20"), f"/run/netns/{ns}")
