"""Flow verdict logs on real traffic in the lab: the real agent process (NFLOG reader),
real CNI pods x/y/z × a/b/c, real TCP and UDP probes, a raw-socket SYN flood.

* Every denied probe of a small matrix (a NetworkPolicy, an Admin and a Baseline
  ClusterNetworkPolicy) has a deny line naming the policy and rule that decided;
  every allowed probe has allow lines (allowed logging on), and no probe has a
  line of the other verdict.
* An allowed connection carrying many packets logs only its first packet (once per
  direction): established traffic is never logged.
* Under a SYN flood of denied packets the lines for the flooding source stay within
  the kernel limit (per-source rate × duration + burst).
* Each line has the documented JSON fields and types.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
import time

import casedata
import pytest

from policy_agent.lab import lab as L
from policy_agent.lab import netns

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

LAB_NAME = f"i15b-fl-{os.getpid() % 100000}"
# Per-source limits roomy enough for the matrix (each pod probes 32 pairs at once, two
# allow lines per allowed probe) and well below the node-wide ones, so a one-source flood
# meets the per-source limit.
PER_SOURCE_RATE = 100
PER_SOURCE_BURST = 500
ENV = {
    "POLICY_AGENT_FLOW_LOG_ALLOWED": "true",
    "POLICY_AGENT_FLOW_LOG_RATE": "300",
    "POLICY_AGENT_FLOW_LOG_BURST": "1500",
    "POLICY_AGENT_FLOW_LOG_PER_SOURCE_RATE": str(PER_SOURCE_RATE),
    "POLICY_AGENT_FLOW_LOG_PER_SOURCE_BURST": str(PER_SOURCE_BURST),
}

POLICIES = [
    {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
     "metadata": {"namespace": "x", "name": "web-from-y"},
     "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
              "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                           "ports": [{"protocol": "TCP", "port": 80}]}]}},
    {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
     "metadata": {"name": "guard-ya"},
     "spec": {"tier": "Admin", "priority": 7,
              "subject": {"pods": {"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                   "podSelector": {"matchLabels": {"pod": "a"}}}},
              "ingress": [{"name": "no z", "action": "Deny",
                           "from": [{"namespaces": {"matchLabels": {"ns": "z"}}}]}]}},
    {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
     "metadata": {"name": "yb-not-to-z"},
     "spec": {"tier": "Baseline", "priority": 3,
              "subject": {"pods": {"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                   "podSelector": {"matchLabels": {"pod": "b"}}}},
              "egress": [{"action": "Deny", "to": [{"namespaces": {"matchLabels": {"ns": "z"}}}]}]}},
]


def expected(src: str, dst: str, port: int, proto: str) -> tuple[str, str, dict]:
    """(verdict, direction, decided_by subset) for this policy set, by hand from the semantics."""
    sns, dns = src.split("/")[0], dst.split("/")[0]
    if src == "y/b" and dns == "z":  # egress is decided first, at the source
        return "deny", "egress", {"kind": "baseline", "policy": "yb-not-to-z", "priority": 3, "rule": 0}
    if dst == "y/a" and sns == "z":
        return "deny", "ingress", {"kind": "admin", "policy": "guard-ya", "priority": 7, "rule": 0,
                                   "rule_name": "no z"}
    if dns == "x":
        if sns == "y" and port == 80 and proto == "TCP":
            return "allow", "ingress", {"kind": "networkpolicy", "policy": "x/web-from-y", "rule": 0}
        return "deny", "ingress", {"kind": "no-policy-allowed", "endpoint": dst,
                                   "isolating_policies": ["x/web-from-y"]}
    return "allow", "ingress", {"kind": "no-policy-selects", "endpoint": dst}


@pytest.fixture(scope="module")
def lab():
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # the lab's agent process inherits them
    try:
        with casedata.model_lab(LAB_NAME) as lab:
            lab.apply(POLICIES)
            yield lab
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        log = L.Lab(LAB_NAME).flow_log_path  # known from the name, also when `up` failed
        for path in (log, log + ".1"):
            if os.path.exists(path):
                os.unlink(path)


def flow_file(lab: L.Lab) -> str:
    return lab.flow_log_path


def read_lines(lab: L.Lab) -> list[dict]:
    try:
        with open(flow_file(lab)) as f:
            return [json.loads(ln) for ln in f if ln.endswith("\n")]
    except FileNotFoundError:
        return []


def wait_lines(lab: L.Lab, cond, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        recs = read_lines(lab)
        if cond(recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.1)


def ip4(lab: L.Lab, ref: str) -> str:
    return [i for i in lab.pods[ref].ips if ":" not in i][0]


def test_every_denied_probe_is_logged_with_its_policy_and_rule(lab):
    pods = lab.pod_order()
    start = len(read_lines(lab))
    probes = []
    for port in casedata.PORTS:
        for proto in casedata.PROTOCOLS:
            for a in pods:
                for b in pods:
                    if a != b:
                        probes.append(netns.Probe(lab.pods[a].netns, ip4(lab, b), port, proto, (a, b, port, proto)))
    got = netns.probe_many(probes, timeout=1.0, attempts=1, workers=64)
    wrong = {k: ok for k, ok in got.items() if ok != (expected(*k)[0] == "allow")}
    if wrong:  # a loaded machine can lose a first packet: re-probe before it counts
        again = netns.probe_many([p for p in probes if p.key in wrong], timeout=2.0, attempts=2)
        wrong = {k: ok for k, ok in again.items() if ok != (expected(*k)[0] == "allow")}
    assert not wrong, f"reachability differs from the policy set: {sorted(wrong)}"

    want = {k: expected(*k) for k in got}
    n_denied = sum(1 for v in want.values() if v[0] == "deny")
    assert n_denied >= 40  # the matrix exercises all three deciding kinds

    def key(r: dict) -> tuple:
        return (r["src_pod"], r["dst_pod"], r["dst_port"], r["protocol"].upper())

    def complete(recs: list[dict]) -> bool:
        have = {(key(r), r["verdict"]) for r in recs[start:]}
        return all(((a, b, port, proto), v) in have for (a, b, port, proto), (v, _, _) in want.items())

    recs = wait_lines(lab, complete)[start:]
    by_key: dict[tuple, list[dict]] = {}
    for r in recs:
        by_key.setdefault(key(r), []).append(r)
    problems = []
    for k, (verdict, direction, decided) in sorted(want.items()):
        lines = by_key.get(k, [])
        deciding = [r for r in lines if r["verdict"] == verdict and r["direction"] == direction]
        if not deciding:
            problems.append(f"{k}: no {verdict} {direction} line (have {[(r['verdict'], r['direction']) for r in lines]})")
            continue
        for r in deciding:
            sub = {f: r["decided_by"].get(f) for f in decided}
            if sub != decided:
                problems.append(f"{k}: decided_by {r['decided_by']} != {decided}")
        if verdict == "allow" and any(r["verdict"] == "deny" for r in lines):
            problems.append(f"{k}: allowed, yet a deny line: {lines}")
        if verdict == "deny" and direction == "egress" and any(r["direction"] == "ingress" for r in lines):
            problems.append(f"{k}: denied at egress, yet an ingress line: {lines}")
    assert not problems, f"{len(recs)} lines in {flow_file(lab)}:\n" + "\n".join(problems[:20])
    # The attribution's text fields as `flows` prints them.
    nopol = next(r for r in recs if r["decided_by"]["kind"] == "no-policy-allowed")
    assert nopol["policy"] is None and nopol["rule"] == "no policy allowed it"
    admin = next(r for r in recs if r["decided_by"]["kind"] == "admin")
    assert admin["policy"] == "guard-ya" and admin["rule"] == "admin tier priority 7 ingress rule 0 (no z)"


def test_established_traffic_is_not_logged(lab):
    """Allowed y/a -> x/b TCP 80 and z/c -> y/c UDP 81: many packets, one line per direction."""
    start = len(read_lines(lab))
    with netns.in_netns(lab.pods["z/c"].netns):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2.0)
    u.connect((ip4(lab, "y/c"), 81))
    for i in range(100):
        u.send(b"ping %d" % i)
        assert u.recv(2048)  # the echo: the flow is established after the first round trip
    udp_port = u.getsockname()[1]
    u.close()
    tcp_ports = []
    for _ in range(5):  # each connection: SYN, SYN-ACK, ACK, data, FINs
        with netns.in_netns(lab.pods["y/a"].netns):
            t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.settimeout(2.0)
        t.connect((ip4(lab, "x/b"), 80))
        tcp_ports.append(t.getsockname()[1])
        assert t.recv(100)
        t.close()

    def mine(r: dict) -> bool:
        return (r["protocol"] == "udp" and r["src_port"] == udp_port and r["dst_port"] == 81) or (
            r["protocol"] == "tcp" and r["src_port"] in tcp_ports and r["dst_port"] == 80)

    def done(recs: list[dict]) -> bool:
        return sum(1 for r in recs[start:] if mine(r)) >= 2 * (1 + len(tcp_ports))

    recs = [r for r in wait_lines(lab, done)[start:] if mine(r)]
    time.sleep(0.5)  # anything logged late would show now
    recs = [r for r in read_lines(lab)[start:] if mine(r)]
    per_flow: dict[tuple, list[str]] = {}
    for r in recs:
        per_flow.setdefault((r["protocol"], r["src_port"]), []).append(r["direction"])
        assert r["verdict"] == "allow", r
    assert len(per_flow) == 1 + len(tcp_ports), per_flow
    for flow, directions in per_flow.items():
        assert sorted(directions) == ["egress", "ingress"], (flow, directions)  # first packet only


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(hdr))
    c = _checksum(pseudo + hdr)
    return hdr[:16] + struct.pack("!H", c) + hdr[18:]


def flood(ns: str, src: str, dst: str, dport: int, seconds: float, max_packets: int) -> tuple[int, float]:
    """Raw TCP SYNs from inside ``ns`` (lab addresses only), bounded in count and time."""
    assert src.startswith("10.233.") and dst.startswith("10.233.")
    with netns.in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    sent, t0 = 0, time.monotonic()
    try:
        while sent < max_packets and time.monotonic() - t0 < seconds:
            for _ in range(200):
                sport = 20000 + (sent % 40000)
                s.sendto(syn(src, dst, sport, dport), (dst, 0))
                sent += 1
    finally:
        s.close()
    return sent, time.monotonic() - t0


def test_rate_limit_holds_under_a_syn_flood(lab):
    src_ref, dst_ref = "z/b", "x/c"  # denied: x admits only y on TCP 80
    src, dst = ip4(lab, src_ref), ip4(lab, dst_ref)
    time.sleep(PER_SOURCE_BURST / PER_SOURCE_RATE)  # earlier tests' tokens refilled
    start = len(read_lines(lab))
    sent, elapsed = flood(lab.pods[src_ref].netns, src, dst, 81, seconds=3.0, max_packets=100000)
    time.sleep(0.5)  # the reader's batch timeout is 50 ms
    recs = [r for r in read_lines(lab)[start:] if r["src_ip"] == src and r["dst_port"] == 81]
    bound = PER_SOURCE_RATE * elapsed + PER_SOURCE_BURST
    # z/b's own egress allows each SYN (allowed logging is on): that verdict has its own buckets.
    denied = [r for r in recs if r["verdict"] == "deny"]
    allowed = [r for r in recs if r["verdict"] == "allow"]
    print(f"flood: {sent} SYNs in {elapsed:.2f}s ({sent / elapsed:.0f}/s); {len(denied)} deny and "
          f"{len(allowed)} allow lines; bound {bound:.0f} each")
    assert sent > 5 * bound, "the flood was too small to test the limit"
    assert len(denied) <= bound + 1 and len(allowed) <= bound + 1
    assert len(denied) >= PER_SOURCE_BURST  # the burst itself was logged: the limit is not a blackout
    assert len(denied) + len(allowed) == len(recs)
    assert all(r["direction"] == "ingress" and r["decided_by"]["kind"] == "no-policy-allowed" for r in denied)
    # The agent counted them, bounded by labels.
    status, text = lab.http_get("/metrics")
    assert status == 200
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    by_policy = samples[("policy_agent_flow_denied_by_policy_total",
                         (("policy", "x/web-from-y"), ("tier", "networkpolicy")))]
    assert by_policy >= len(denied)
    assert samples[("policy_agent_flow_denied_by_namespace_total", (("namespace", "x"),))] >= len(denied)
    assert samples[("policy_agent_flow_denied_by_policy_total", (("policy", "guard-ya"), ("tier", "admin")))] >= 1


def test_json_line_format(lab):
    recs = read_lines(lab)
    assert recs
    types = {"time": str, "verdict": str, "direction": str, "protocol": str, "src_ip": str, "dst_ip": str,
             "rule": str, "decided_by": dict}
    nullable = {"src_port": int, "dst_port": int, "src_pod": str, "dst_pod": str, "policy": str, "iface": str}
    for r in recs:
        for f, t in types.items():
            assert isinstance(r[f], t), (f, r)
        for f, t in nullable.items():
            assert r[f] is None or isinstance(r[f], t), (f, r)
        assert r["verdict"] in ("deny", "allow") and r["direction"] in ("ingress", "egress")
        assert r["time"].endswith("Z") and r["decided_by"]["id"].startswith(f"pa:{r['verdict'][0]}:")
        assert r["iface"] is None or r["iface"].startswith("eni")
    with open(flow_file(lab)) as f:
        first = f.readline()
    assert first.endswith("\n") and "\n" not in first[:-1]  # one JSON object per line


@pytest.mark.parametrize("src,dst,port", [("z/a", "y/a", 80), ("x/a", "x/b", 81), ("y/b", "z/c", 80)])
def test_live_explain_sees_no_drift_on_flow_log_rules(lab, src, dst, port):
    """The kernel prints NFLOG and hashlimit back in its own words: live explain must still
    find the chains on a logged path in sync, and step over the log rule to the verdict."""
    proc = subprocess.run([sys.executable, "-m", "policy_agent.cli", "explain", "--netns", lab.node_netns,
                           "--from", src, "--to", dst, "--port", str(port)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # denied
    assert "drift: none" in proc.stdout, proc.stdout
    assert "verdict: DROP" in proc.stdout
