"""Cost of flow verdict logging under a flood of denied SYNs (docs/performance.md).

State machine: a node netns with two pod netns behind eni veths (the lab's addresses,
10.233.51.1 -> 10.233.51.2); pod b is isolated by a deny-all ingress NetworkPolicy
compiled by the real compiler and applied by the real dataplane. For each mode the
same bounded flood runs: one sender process in pod a sends raw TCP SYNs with varying
source ports to b:81 (every one a NEW flow, every one dropped at b's endpoint chain),
at most ``--packets`` packets or ``--seconds`` seconds. Modes:

  off        no NFLOG rule (flow_log false)
  default    the agent's defaults: 100/s node-wide, burst 200; 20/s per source, burst 50
  unlimited  1,000,000/s, no per-source limit: every packet goes to the reader

The reader is the agent's own (policy_agent.obs.flowlog.FlowLogReader) in a child
process: its CPU is the agent's cost. Reported per mode: packets sent and dropped (the
kernel's DROP counter), the sender's system CPU per packet (the kernel path of each
packet, softirq forwarding included, runs in the sender's context), the packets/s
reached, lines the reader wrote (the kernel's delivered rate) and the reader's CPU.

    sudo .venv/bin/python bench/flows/synflood.py [--packets 300000] [--seconds 10] [--repeat 3]

Everything happens inside namespaces this script creates and deletes; traffic goes only
between them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from policy_agent.compiler.options import FlowLogOptions, NodeConfig  # noqa: E402
from policy_agent.dataplane.apply import Dataplane  # noqa: E402
from policy_agent.lab import netns  # noqa: E402
from policy_agent.lab import specs as s  # noqa: E402

SRC, DST = "10.233.51.1", "10.233.51.2"
MODES = {
    "off": None,
    "default": FlowLogOptions(),
    "unlimited": FlowLogOptions(rate=1_000_000, burst=1_000_000, per_source_rate=0),
}

SENDER = r"""
import os, random, resource, socket, struct, sys, time
sys.path.insert(0, sys.argv[1])
from policy_agent.shared.netns import in_netns
ns, src, dst, n, seconds = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
assert src.startswith("10.233.") and dst.startswith("10.233.")
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, 20)
pkts = []
for sport in range(20000, 60000):
    h = struct.pack("!HHIIBBHHH", sport, 81, random.getrandbits(32), 0, 0x50, 0x02, 65535, 0, 0)
    pkts.append(h[:16] + struct.pack("!H", csum(pseudo + h)) + h[18:])
with in_netns(ns):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
sent = 0
while sent < n and time.monotonic() - t0 < seconds:
    for p in pkts[:1000]:
        s.sendto(p, (dst, 0))
    pkts = pkts[1000:] + pkts[:1000]
    sent += 1000
t1, r1 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
print(sent, t1 - t0, r1.ru_stime - r0.ru_stime, r1.ru_utime - r0.ru_utime)
"""

READER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from policy_agent.obs.flowlog import FlowLogReader, Resolver
r = FlowLogReader(30210, sys.argv[3], Resolver(lambda: (0, None)), netns=sys.argv[2]).start()
print("ready", flush=True)
sys.stdin.read()
r.stop()
print(r.lines, r.lost_batches, flush=True)
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_counters(node: str) -> tuple[int, int]:
    """(packets logged by NFLOG rules, packets dropped by the deny rule) in our endpoint chains."""
    out = netns.run(node, "iptables-save", "-c").stdout
    logged = dropped = 0
    for ln in out.splitlines():
        if ln.startswith("[") and "pa-tw-" in ln:
            pk = int(ln[1:].split(":", 1)[0])
            if "-j NFLOG" in ln:
                logged += pk
            elif ln.rstrip().endswith("-j DROP"):
                dropped += pk
    return logged, dropped


def run_mode(name: str, opts, node: str, pod_a: str, args) -> dict:
    pods = [s.Pod("x", "a", (SRC,), frozenset({"app=a"}), True), s.Pod("x", "b", (DST,), frozenset({"app=b"}), True)]
    state = s.build(pods, [s.Policy("x", "deny-b", "app=b", ingress=())], NodeConfig(s.NODE, flow_log=opts))
    dp = Dataplane(netns=node, backend="nft", state_path=os.path.join(args.tmp, "dp.json"), families=(4,))
    dp.apply(state, allow_sweep=True)
    netns.run(node, "iptables", "-Z")
    out_file = os.path.join(args.tmp, f"flows-{name}.jsonl")
    reader = subprocess.Popen([sys.executable, "-c", READER, ROOT, node, out_file], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        while (ln := reader.stdout.readline()) and ln.strip() != "ready":
            pass  # structlog's start line
        assert ln, "the reader did not start"
        cpu0 = cpu_seconds(reader.pid)
        res = subprocess.run([sys.executable, "-c", SENDER, ROOT, pod_a, SRC, DST, str(args.packets),
                              str(args.seconds)], capture_output=True, text=True, check=True)
        time.sleep(0.3)  # the reader's batch timeout is 50 ms
        cpu1 = cpu_seconds(reader.pid)
    finally:
        lines_out, _ = reader.communicate("", timeout=30)
    sent, wall, sys_cpu, user_cpu = res.stdout.split()
    sent, wall, sys_cpu = int(sent), float(wall), float(sys_cpu)
    lines, lost = (int(x) for x in lines_out.strip().splitlines()[-1].split())
    logged, dropped = drop_counters(node)
    return {"mode": name, "sent": sent, "seconds": round(wall, 3), "pps": round(sent / wall),
            "dropped": dropped, "nflog_matched": logged, "lines": lines, "lost_batches": lost,
            "sender_sys_us_per_packet": round(sys_cpu / sent * 1e6, 3),
            "reader_cpu_seconds": round(cpu1 - cpu0, 3),
            "lines_per_second": round(lines / wall, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packets", type=int, default=300_000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.packets > 2_000_000 or args.seconds > 60:
        p.error("the flood is bounded: at most 2,000,000 packets and 60 seconds")
    node, pod_a, pod_b = (netns.unique_name("flbench", r) for r in ("node", "poda", "podb"))
    made: list[str] = []
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        try:
            for ns in (node, pod_a, pod_b):
                netns.create(ns)
                made.append(ns)
            netns.enable_forwarding(node)
            netns.add_veth(node, pod_a, s.Pod("x", "a", (SRC,)).iface, (SRC,))
            netns.add_veth(node, pod_b, s.Pod("x", "b", (DST,)).iface, (DST,))
            for _ in range(args.repeat):
                for name, opts in MODES.items():
                    results.append(run_mode(name, opts, node, pod_a, args))
        finally:
            for ns in reversed(made):
                netns.delete(ns)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'mode':<10} {'sent':>8} {'pps':>8} {'dropped':>8} {'lines':>7} {'lines/s':>8} "
          f"{'sys us/pkt':>10} {'reader cpu s':>12}")
    for r in results:
        print(f"{r['mode']:<10} {r['sent']:>8} {r['pps']:>8} {r['dropped']:>8} {r['lines']:>7} "
              f"{r['lines_per_second']:>8} {r['sender_sys_us_per_packet']:>10} {r['reader_cpu_seconds']:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
