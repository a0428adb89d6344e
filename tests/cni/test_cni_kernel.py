"""vpcip-cni + vpcip-ipamd for real: node netns, pod netns, the real executable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from policy_agent.shared import endpoint, naming
from cni_lab_helpers import VPCIP_CNI, kernel, pool_doc, sh

pytestmark = [pytest.mark.kernel, kernel]


def links(ns: str) -> dict[str, dict]:
    return {link["ifname"]: link for link in json.loads(sh("ip", "-j", "-d", "-n", ns, "link").stdout)}


def addrs(ns: str, dev: str) -> set[str]:
    out = json.loads(sh("ip", "-j", "-n", ns, "addr", "show", "dev", dev).stdout)
    return {f"{a['local']}/{a['prefixlen']}" for i in out for a in i["addr_info"]}


def routes(ns: str, *args: str) -> list[dict]:
    return json.loads(sh("ip", "-j", "-n", ns, *args, "route", "show").stdout)


def rules(ns: str, fam: str = "-4") -> list[dict]:
    return json.loads(sh("ip", "-j", fam, "-n", ns, "rule", "show").stdout)


def neighs(ns: str, fam: str = "-4") -> list[dict]:
    return json.loads(sh("ip", "-j", fam, "-n", ns, "neigh", "show").stdout)


ECHO_SERVER = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080)); s.listen(8); print('ready', flush=True)
s.settimeout(60)
while True:
    c, a = s.accept(); c.sendall(b'hello from ' + a[0].encode() + b'\\n'); c.close()
"""

ECHO_CLIENT = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
c = socket.create_connection((sys.argv[1], 8080), timeout=10)
print(c.recv(100).decode().strip())
"""


def serve(ns: str, addr: str) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", ECHO_SERVER, addr],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return p


def connect(ns: str, addr: str) -> str:
    p = sh("ip", "netns", "exec", ns, "python3", "-c", ECHO_CLIENT, addr, check=False, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_add_check_del_builds_and_removes_everything(make_lab):
    lab = make_lab()
    netns, res = lab.add_pod("web-1", ns="shop")
    host_veth = naming.veth_name("eni", "shop", "web-1")
    # result shape (1.0.0)
    assert res["cniVersion"] == "1.0.0"
    assert res["interfaces"][0]["name"] == host_veth and "sandbox" not in res["interfaces"][0]
    assert res["interfaces"][1]["name"] == "eth0"
    assert res["interfaces"][1]["sandbox"] == f"/var/run/netns/{netns}"
    ip4 = res["ips"][0]["address"].split("/")[0]
    ip6 = res["ips"][1]["address"].split("/")[0]
    assert res["ips"][0] == {"address": f"{ip4}/32", "gateway": "169.254.1.1", "interface": 1}
    assert res["ips"][1]["address"] == f"{ip6}/128"
    # host side
    node_links = links(lab.node)
    assert host_veth in node_links
    assert node_links[host_veth]["mtu"] == 1500
    host_mac = node_links[host_veth]["address"]
    assert host_mac == res["interfaces"][0]["mac"]
    assert any(r["dst"] == ip4 and r["dev"] == host_veth and r.get("scope") == "link" for r in routes(lab.node))
    assert any(r["dst"] == ip6 and r["dev"] == host_veth for r in routes(lab.node, "-6"))
    # pod side
    assert links(netns)["eth0"]["mtu"] == 1500
    assert {f"{ip4}/32", f"{ip6}/128"} <= addrs(netns, "eth0")
    pr = routes(netns)
    assert any(r["dst"] == "169.254.1.1" and r.get("scope") == "link" and r["dev"] == "eth0" for r in pr)
    assert any(r["dst"] == "default" and r.get("gateway") == "169.254.1.1" for r in pr)
    assert any(r["dst"] == "default" and r.get("gateway") == "fe80::1" for r in routes(netns, "-6"))
    n4 = [n for n in neighs(netns) if n["dst"] == "169.254.1.1"]
    assert n4 and n4[0]["lladdr"] == host_mac and "PERMANENT" in n4[0]["state"]
    n6 = [n for n in neighs(netns, "-6") if n["dst"] == "fe80::1"]
    assert n6 and n6[0]["lladdr"] == host_mac and "PERMANENT" in n6[0]["state"]
    # primary ENI: the 512 to-pod rule only (AWS adds it for every pod), no 1536 from-pod rule
    assert [(r["priority"], r["table"]) for r in rules(lab.node)
            if r.get("dst") == ip4 or r.get("src") == ip4] == [(512, "main")]
    # endpoint record
    rec = endpoint.read_record(os.path.join(lab.endpoint_dir, "shop.web-1.json"))
    assert rec.interface == host_veth and rec.container_id == "cid-web-1" and set(rec.ips) == {ip4, ip6}
    # CHECK passes
    conf = lab.conf(prevResult=res)
    rc, out, err = lab.cni("CHECK", conf, cid="cid-web-1", netns=netns, pod="web-1", ns="shop")
    assert rc == 0 and out is None, (out, err)
    # CHECK notices a missing route
    sh("ip", "-n", netns, "route", "del", "default")
    rc, out, _ = lab.cni("CHECK", conf, cid="cid-web-1", netns=netns, pod="web-1", ns="shop")
    assert rc == 1 and out["code"] == 101 and "default route" in out["msg"] + out.get("details", "")
    # CHECK with a prevResult naming another address
    bad = json.loads(json.dumps(res))
    bad["ips"][0]["address"] = "10.233.250.250/32"
    rc, out, _ = lab.cni("CHECK", lab.conf(prevResult=bad), cid="cid-web-1", netns=netns, pod="web-1", ns="shop")
    assert rc == 1 and out["code"] == 101
    # DEL removes everything; twice is fine
    lab.del_pod("web-1", netns, ns="shop")
    assert host_veth not in links(lab.node)
    assert "eth0" not in links(netns)
    assert not [r for r in routes(lab.node) if r["dst"] == ip4]
    assert not os.path.exists(os.path.join(lab.endpoint_dir, "shop.web-1.json"))
    lab.del_pod("web-1", netns, ns="shop")
    assert lab.dump()["stats"]["assigned"] == 0
    # CHECK after DEL: unknown container
    rc, out, _ = lab.cni("CHECK", conf, cid="cid-web-1", netns=netns, pod="web-1", ns="shop")
    assert rc == 1 and out["code"] == 3


def test_secondary_eni_gets_policy_routing_and_custom_prefix(make_lab):
    # primary ENI holds one pod address; the second pod lands on ENI device 1 (table 2)
    pool = pool_doc(enis=2, per_eni=1, ipv6=False)
    lab = make_lab(pool)
    lab.extra_conf = {"vethPrefix": "pa"}
    ns1, r1 = lab.add_pod("a")
    ns2, r2 = lab.add_pod("b")
    ip1, ip2 = (r["ips"][0]["address"].split("/")[0] for r in (r1, r2))
    assert ip1 == "10.233.200.11" and ip2 == "10.233.201.11"
    assert r2["interfaces"][0]["name"] == naming.veth_name("pa", "default", "b")
    assert r2["interfaces"][0]["name"].startswith("pa")
    rs = rules(lab.node)
    to_rule = [r for r in rs if r.get("dst") == ip2]
    from_rule = [r for r in rs if r.get("src") == ip2]
    assert [(r["priority"], r["table"]) for r in to_rule] == [(512, "main")]
    assert [(r["priority"], r["table"]) for r in from_rule] == [(1536, "2")]
    # The primary ENI's pod has the 512 to-pod rule too (AWS adds it for every pod), no 1536.
    assert [(r["priority"], r["table"]) for r in rs if ip1 in (r.get("dst"), r.get("src"))] == [(512, "main")]
    rc, out, err = lab.cni("CHECK", lab.conf(prevResult=r2), cid="cid-b", netns=ns2, pod="b")
    assert rc == 0, (out, err)
    sh("ip", "-n", lab.node, "rule", "del", "priority", "1536", "from", ip2)
    rc, out, _ = lab.cni("CHECK", lab.conf(prevResult=r2), cid="cid-b", netns=ns2, pod="b")
    assert rc == 1 and out["code"] == 101 and "1536" in out["details"]
    lab.del_pod("b", ns2)
    assert not [r for r in rules(lab.node) if ip2 in (r.get("dst"), r.get("src"))]
    lab.del_pod("a", ns1)


def test_traffic_between_two_pods_and_to_the_node(make_lab):
    lab = make_lab()
    ns_a, ra = lab.add_pod("a")
    ns_b, rb = lab.add_pod("b")
    a4, a6 = (ip["address"].split("/")[0] for ip in ra["ips"])
    b4, b6 = (ip["address"].split("/")[0] for ip in rb["ips"])
    srv_b4, srv_b6 = serve(ns_b, b4), serve(ns_b, b6)
    srv_node = serve(lab.node, "10.233.199.1")
    srv_a = serve(ns_a, a4)
    try:
        assert connect(ns_a, b4) == f"hello from {a4}"
        assert connect(ns_a, b6) == f"hello from {a6}"
        assert connect(ns_a, "10.233.199.1") == f"hello from {a4}"
        assert connect(lab.node, a4) == "hello from 10.233.199.1"
    finally:
        for p in (srv_b4, srv_b6, srv_node, srv_a):
            p.kill()
            p.wait()
    lab.del_pod("a", ns_a)
    lab.del_pod("b", ns_b)


def run_plugin(lab, plugin: str, command: str, conf: dict, cid: str, netns: str, pod: str):
    """Run one plugin of the chain the way a runtime does: in the node netns, conf on stdin."""
    env = lab.env(command, cid=cid, netns=netns, pod=pod)
    binary = VPCIP_CNI if plugin == "vpcip-cni" else f"/usr/lib/cni/{plugin}"
    p = subprocess.run(["ip", "netns", "exec", lab.node, binary], input=json.dumps(conf), env=env,
                       capture_output=True, text=True, timeout=120)
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else None), p.stderr


def test_chain_with_debian_standard_plugins(make_lab):
    """vpcip-cni -> tuning -> bandwidth -> portmap: ADD, CHECK, DEL like a runtime does."""
    for plugin in ("tuning", "bandwidth", "portmap"):
        if not os.path.exists(f"/usr/lib/cni/{plugin}"):
            pytest.skip(f"/usr/lib/cni/{plugin} missing")
    lab = make_lab()
    netns = lab.new_pod_netns("chain")
    cid, pod = "cid-chain", "chain"
    conflist = {
        "cniVersion": "1.0.0", "name": "vpcip-test",
        "plugins": [
            {k: v for k, v in lab.conf().items() if k not in ("cniVersion", "name")},
            {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.accept_local": "1"}},
            {"type": "bandwidth", "ingressRate": 1000000, "ingressBurst": 100000,
             "egressRate": 1000000, "egressBurst": 100000},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True,
             "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]}},
        ],
    }

    def plugin_conf(p: dict, prev: dict | None) -> dict:
        c = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **p}
        if prev is not None:
            c["prevResult"] = prev
        return c

    prev = None
    for p in conflist["plugins"]:
        rc, out, err = run_plugin(lab, p["type"], "ADD", plugin_conf(p, prev), cid, netns, pod)
        assert rc == 0, (p["type"], out, err)
        prev = out
    ip4 = prev["ips"][0]["address"].split("/")[0]
    host_veth = naming.veth_name("eni", "default", pod)
    assert prev["interfaces"][0]["name"] == host_veth
    # tuning ran in the pod on our eth0; bandwidth put a qdisc on our host veth; portmap a DNAT
    assert sh("ip", "netns", "exec", netns, "sysctl", "-n", "net.ipv4.conf.eth0.accept_local").stdout.strip() == "1"
    assert "tbf" in sh("ip", "netns", "exec", lab.node, "tc", "qdisc", "show", "dev", host_veth).stdout
    nat = lab.in_node("iptables-save", "-t", "nat").stdout
    assert f"--to-destination {ip4}:8080" in nat
    # CHECK through the whole chain with the final result
    # (not portmap: Debian's 1.1.1 CHECK looks for IPv6 DNAT rules it never wrote,
    # containernetworking/plugins#819, fixed upstream later)
    for p in conflist["plugins"][:3]:
        rc, out, err = run_plugin(lab, p["type"], "CHECK", plugin_conf(p, prev), cid, netns, pod)
        assert rc == 0, (p["type"], out, err)
    # traffic through the port mapping from the node
    srv = serve(netns, ip4)
    try:
        assert connect(lab.node, ip4).startswith("hello from ")
    finally:
        srv.kill()
        srv.wait()
    # DEL in reverse order
    for p in reversed(conflist["plugins"]):
        rc, out, err = run_plugin(lab, p["type"], "DEL", plugin_conf(p, prev), cid, netns, pod)
        assert rc == 0, (p["type"], out, err)
    assert host_veth not in links(lab.node)
    assert f"{ip4}:8080" not in lab.in_node("iptables-save", "-t", "nat").stdout
    assert lab.dump()["stats"]["assigned"] == 0


@pytest.mark.slow
def test_fifty_parallel_adds_then_dels_no_duplicates_no_leaks(make_lab):
    pool = pool_doc(enis=4, per_eni=14, limits=(4, 15), ipv6=False)
    lab = make_lab(pool)
    names = [f"p{i:02d}" for i in range(50)]
    nss = {n: lab.new_pod_netns(n) for n in names}

    def add(n):
        return lab.cni("ADD", lab.conf(), cid=f"cid-{n}", netns=nss[n], pod=n)

    with ThreadPoolExecutor(50) as ex:
        results = dict(zip(names, ex.map(add, names)))
    failed = {n: r for n, r in results.items() if r[0] != 0}
    assert not failed, failed
    ips = [r[1]["ips"][0]["address"] for r in results.values()]
    assert len(set(ips)) == 50
    d = lab.dump()
    assert d["stats"]["assigned"] == 50
    assert len({a["ipv4"] for a in d["pool"]["allocations"]}) == 50
    node_links = links(lab.node)
    assert all(naming.veth_name("eni", "default", n) in node_links for n in names)
    assert len(os.listdir(lab.endpoint_dir)) == 50

    def delete(n):
        return lab.cni("DEL", lab.conf(), cid=f"cid-{n}", netns=nss[n], pod=n)

    with ThreadPoolExecutor(50) as ex:
        dels = list(ex.map(delete, names))
    assert all(r[0] == 0 for r in dels), dels
    assert lab.dump()["stats"]["assigned"] == 0
    node_links = links(lab.node)
    assert not [n for n in node_links if n.startswith("eni")]
    assert not [r for r in routes(lab.node) if r["dst"].startswith("10.233.2")]
    assert not [f for f in os.listdir(lab.endpoint_dir) if f.endswith(".json")]
    assert not [r for r in rules(lab.node) if r.get("priority") in (512, 1536)]


def _wait_for(pred, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_daemon_killed_mid_add_leaks_nothing_after_restart(make_lab):
    pool = pool_doc(enis=2, per_eni=1, ipv6=False)  # pod lands on ... primary; rules only on secondary
    lab = make_lab(pool, env={"VPCIP_IPAMD_FAULT": "pause-after-veth=60"})
    netns = lab.new_pod_netns("crash")
    host_veth = naming.veth_name("eni", "default", "crash")
    proc = subprocess.Popen([VPCIP_CNI], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=lab.env("ADD", cid="cid-crash", netns=netns, pod="crash"))
    proc.stdin.write(json.dumps(lab.conf()))
    proc.stdin.close()
    _wait_for(lambda: host_veth in links(lab.node), what="host veth mid-ADD")
    lab.daemon.send_signal(signal.SIGKILL)
    lab.daemon.wait(30)
    out = json.loads(proc.stdout.read())
    assert proc.wait(30) == 1 and out["code"] == 11
    # half-built: the veth is still there, the checkpoint says "adding"
    assert host_veth in links(lab.node)
    cp = json.load(open(os.path.join(lab.state_dir, "ipam.json")))
    assert [a["state"] for a in cp["allocations"]] == ["adding"]
    lab.start_daemon()
    assert lab.dump()["stats"]["assigned"] == 0
    assert host_veth not in links(lab.node)
    assert "eth0" not in links(netns)
    # the next ADD for the same pod works and gets the address back
    rc, res, err = lab.cni("ADD", lab.conf(), cid="cid-crash", netns=netns, pod="crash")
    assert rc == 0, (res, err)
    assert res["ips"][0]["address"] == "10.233.200.11/32"
    lab.del_pod("crash", netns)


@pytest.mark.slow
def test_executable_killed_mid_add_is_undone_by_daemon(make_lab):
    lab = make_lab(env={"VPCIP_IPAMD_FAULT": "pause-after-veth=2"})
    netns = lab.new_pod_netns("gone")
    host_veth = naming.veth_name("eni", "default", "gone")
    proc = subprocess.Popen([VPCIP_CNI], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=lab.env("ADD", cid="cid-gone", netns=netns, pod="gone"))
    proc.stdin.write(json.dumps(lab.conf()))
    proc.stdin.close()
    _wait_for(lambda: host_veth in links(lab.node), what="host veth mid-ADD")
    proc.kill()
    proc.wait(30)
    _wait_for(lambda: lab.dump()["stats"]["assigned"] == 0 and host_veth not in links(lab.node),
              what="daemon undoing the orphaned ADD")
    assert not os.path.exists(os.path.join(lab.endpoint_dir, "default.gone.json"))


def test_gc_frees_attachments_the_runtime_no_longer_has(make_lab):
    lab = make_lab()
    ns_a, _ = lab.add_pod("a")
    ns_b, _ = lab.add_pod("b")
    conf = lab.conf(version="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "cid-a", "ifname": "eth0"}]})
    rc, out, err = lab.cni("GC", conf)
    assert rc == 0 and out is None, (out, err)
    d = lab.dump()
    assert [a["container_id"] for a in d["pool"]["allocations"]] == ["cid-a"]
    assert naming.veth_name("eni", "default", "b") not in links(lab.node)
    assert naming.veth_name("eni", "default", "a") in links(lab.node)
    rc, out, _ = lab.cni("STATUS", lab.conf(version="1.1.0"))
    assert rc == 0 and out is None
    lab.del_pod("a", ns_a)


def test_exhaustion_is_a_clear_error_and_builds_nothing(make_lab):
    pool = pool_doc(enis=1, per_eni=2, limits=(1, 3), ipv6=False)
    lab = make_lab(pool)
    lab.add_pod("one")
    lab.add_pod("two")
    netns = lab.new_pod_netns("three")
    rc, out, _ = lab.cni("ADD", lab.conf(), cid="cid-three", netns=netns, pod="three")
    assert rc == 1 and out["code"] == 100
    assert "exhausted" in out["msg"] and "at most 4 pods" in out["msg"]
    assert naming.veth_name("eni", "default", "three") not in links(lab.node)
    assert "eth0" not in links(netns)
    assert not os.path.exists(os.path.join(lab.endpoint_dir, "default.three.json"))
    rc, out, _ = lab.cni("STATUS", lab.conf(version="1.1.0"))
    assert rc == 1 and out["code"] == 50


def test_daemon_down_add_fails_try_again_del_succeeds(make_lab):
    lab = make_lab(start=False)
    netns = lab.new_pod_netns("nod")
    rc, out, _ = lab.cni("ADD", lab.conf(), cid="cid-nod", netns=netns, pod="nod")
    assert rc == 1 and out["code"] == 11 and "not reachable" in out["msg"]
    assert set(links(netns)) == {"lo"}
    assert not [n for n in links(lab.node) if n.startswith("eni")]
    rc, out, _ = lab.cni("DEL", lab.conf(), cid="cid-nod", netns=netns, pod="nod")
    assert rc == 0 and out is None
    rc, out, _ = lab.cni("STATUS", lab.conf(version="1.1.0"))
    assert rc == 1 and out["code"] == 50


def test_nonexistent_netns_and_existing_eth0_build_nothing(make_lab):
    lab = make_lab()
    rc, out, _ = lab.cni("ADD", lab.conf(), cid="cid-x", netns="/var/run/netns/pa-cni-does-not-exist", pod="x")
    assert rc == 1 and out["code"] == 4 and "does not exist" in out["msg"]
    netns = lab.new_pod_netns("busy")
    sh("ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    rc, out, _ = lab.cni("ADD", lab.conf(), cid="cid-busy", netns=netns, pod="busy")
    assert rc == 1 and out["code"] == 102 and "undone" in out["msg"]
    assert "eth0" in links(netns)  # not ours: left alone
    assert naming.veth_name("eni", "default", "busy") not in links(lab.node)
    assert lab.dump()["stats"]["assigned"] == 0
    assert not os.path.exists(os.path.join(lab.endpoint_dir, "default.busy.json"))


def test_policy_wait_times_out_without_agent_and_succeeds_with_status(make_lab):
    lab = make_lab()
    netns = lab.new_pod_netns("strict")
    rc, out, _ = lab.cni("ADD", lab.conf(policyWaitSeconds=0.5), cid="cid-strict", netns=netns, pod="strict")
    assert rc == 1 and out["code"] == 11 and "policy agent" in out["msg"]
    assert lab.dump()["stats"]["assigned"] == 0
    assert not os.path.exists(os.path.join(lab.endpoint_dir, "default.strict.json"))
    assert set(links(netns)) == {"lo"}

    # a stand-in agent: writes the status once the record appears
    def agent():
        path = os.path.join(lab.endpoint_dir, "default.strict.json")
        _wait_for(lambda: os.path.exists(path), what="endpoint record")
        rec = endpoint.read_record(path)
        endpoint.write_status(lab.status_dir, endpoint.EndpointStatus(
            rec.namespace, rec.pod, rec.container_id, rec.interface, time.time()))

    t = threading.Thread(target=agent)
    t.start()
    rc, out, err = lab.cni("ADD", lab.conf(policyWaitSeconds=30), cid="cid-strict", netns=netns, pod="strict")
    t.join()
    assert rc == 0, (out, err)
    lab.del_pod("strict", netns)


def test_older_cni_versions_get_their_result_shape(make_lab):
    lab = make_lab()
    netns = lab.new_pod_netns("old")
    rc, out, err = lab.cni("ADD", lab.conf(version="0.4.0"), cid="cid-old", netns=netns, pod="old")
    assert rc == 0, (out, err)
    assert out["cniVersion"] == "0.4.0" and out["ips"][0]["version"] == "4"
    lab.del_pod("old", netns)


def test_daemon_rejects_a_second_instance_and_bad_pool_file(make_lab, tmp_path):
    lab = make_lab()
    p = subprocess.run(["ip", "netns", "exec", lab.node, sys.executable, "-m", "cni_shim.daemon", "--socket",
                        str(tmp_path / "other.sock"), "--state-dir", lab.state_dir, "--pool-file", lab.pool_file],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "locked by another" in p.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"instanceType": "m5.large", "enis": [{"id": "e", "deviceNumber": 0,
                                                                     "primaryIP": "nope"}]}))
    p = subprocess.run([sys.executable, "-m", "cni_shim.daemon", "--socket", str(tmp_path / "x.sock"),
                        "--state-dir", str(tmp_path / "st"), "--pool-file", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "enis[0].primaryIP" in p.stderr
