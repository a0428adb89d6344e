"""CNI ADD/DEL latency of the real `vpcip-cni` executable (interpreter start included).

Workload: one node netns running vpcip-ipamd (static pool, 4 ENIs x 14 IPv4+IPv6 slots,
cooldown 0), pod netns created beforehand (not timed). Each sample is one
subprocess of the executable, from spawn to exit, as a runtime would see it.
  alone:     ADD one pod at a time, then DEL one at a time
  parallel:  10 ADDs started together (then 10 DELs), repeated
  handshake: ADD with policyWaitSeconds=10 and a stand-in agent that writes the
             status file as soon as the endpoint record appears (polling 5 ms)

Run as root: .venv/bin/python bench/cni/bench_cni.py [--rounds N] [--out docs/performance-cni.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "cni"))
sys.path.insert(0, ROOT)

from cni_lab_helpers import VPCIP_CNI, Lab, pool_doc, sh  # noqa: E402

from policy_agent.shared import endpoint  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def timed(lab: Lab, command: str, conf: dict, pod: str, netns: str) -> float:
    import json

    env = lab.env(command, cid=f"cid-{pod}", netns=netns, pod=pod)
    t0 = time.perf_counter()
    p = subprocess.run([VPCIP_CNI], input=json.dumps(conf), env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{command} {pod} failed: {p.stdout} {p.stderr}")
    return dt * 1000


def make_lab(tmp: str) -> Lab:
    tag = f"pa-cni-bench-{os.getpid()}"
    lab = Lab(tag=tag, tmp=tmp, node=f"{tag}-node", socket=os.path.join(tmp, "ipamd.sock"),
              state_dir=os.path.join(tmp, "state"), pool_file=os.path.join(tmp, "pool.json"),
              endpoint_dir=os.path.join(tmp, "endpoints"), status_dir=os.path.join(tmp, "status"),
              daemon_log=os.path.join(tmp, "ipamd.log"))
    sh("ip", "netns", "add", lab.node)
    lab.netns.append(lab.node)
    sh("ip", "-n", lab.node, "link", "set", "lo", "up")
    import json

    with open(lab.pool_file, "w") as f:
        json.dump(pool_doc(enis=4, per_eni=14, limits=(4, 15)), f)
    lab.start_daemon("--log-level", "warning")
    return lab


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4, help="rounds of 10 pods per mode")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "performance-cni.md"))
    args = ap.parse_args()
    import tempfile

    load_before = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="pa-cni-bench-")
    lab = make_lab(tmp)
    rows = []
    try:
        pods = [f"b{i:02d}" for i in range(10)]
        nss = {p: lab.new_pod_netns(p) for p in pods}
        conf = lab.conf()
        # warm-up (page cache, daemon imports)
        timed(lab, "ADD", conf, pods[0], nss[pods[0]])
        timed(lab, "DEL", conf, pods[0], nss[pods[0]])
        add_alone, del_alone, add_par, del_par, add_hs = [], [], [], [], []
        for _ in range(args.rounds):
            for p in pods:
                add_alone.append(timed(lab, "ADD", conf, p, nss[p]))
            for p in pods:
                del_alone.append(timed(lab, "DEL", conf, p, nss[p]))
        for _ in range(args.rounds):
            with ThreadPoolExecutor(10) as ex:
                add_par += list(ex.map(lambda p: timed(lab, "ADD", conf, p, nss[p]), pods))
            with ThreadPoolExecutor(10) as ex:
                del_par += list(ex.map(lambda p: timed(lab, "DEL", conf, p, nss[p]), pods))
        # handshake: a stand-in agent answers each record with a status file
        stop = threading.Event()

        def agent():
            seen = set()
            while not stop.is_set():
                for _path, rec in endpoint.scan_records(lab.endpoint_dir):
                    if isinstance(rec, endpoint.EndpointRecord) and (rec.key, rec.container_id, rec.created) not in seen:
                        seen.add((rec.key, rec.container_id, rec.created))
                        endpoint.write_status(lab.status_dir, endpoint.EndpointStatus(
                            rec.namespace, rec.pod, rec.container_id, rec.interface, time.time()))
                time.sleep(0.005)

        t = threading.Thread(target=agent, daemon=True)
        t.start()
        hs_conf = lab.conf(policyWaitSeconds=10)
        for _ in range(args.rounds):
            for p in pods:
                add_hs.append(timed(lab, "ADD", hs_conf, p, nss[p]))
                endpoint.remove_status(lab.status_dir, "default", p)
                timed(lab, "DEL", conf, p, nss[p])
        stop.set()
        for name, xs in (("ADD alone", add_alone), ("DEL alone", del_alone), ("ADD 10 in parallel", add_par),
                         ("DEL 10 in parallel", del_par), ("ADD alone + agent handshake", add_hs)):
            rows.append((name, len(xs), statistics.median(xs), pct(xs, 99), max(xs)))
        t0 = time.perf_counter()
        for _ in range(10):
            subprocess.run([sys.executable, "-S", "-c", "pass"], check=True)
        bare = (time.perf_counter() - t0) * 100
    finally:
        lab.stop_daemon()
        for ns in reversed(lab.netns):
            sh("ip", "netns", "del", ns, check=False)
    lines = [
        "# CNI latency (vpcip-cni + vpcip-ipamd)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, kernel {platform.release()}), by `bench/cni/bench_cni.py "
        f"--rounds {args.rounds}`.",
        "",
        "State: one node netns running vpcip-ipamd (static pool, 4 ENIs x 14 IPv4+IPv6 slots, cooldown 0,",
        "warm pool already claimed); 10 pod netns created beforehand. Workload: each sample is one run of",
        "the real executable from spawn to exit (interpreter start, stdin config, socket round trip, veth",
        "pair + addresses + routes + permanent neighbours + host route + endpoint record, checkpoint fsync).",
        "'10 in parallel' = 10 executables started together. Handshake = policyWaitSeconds > 0 with a",
        "stand-in agent polling the record directory every 5 ms and writing the status file.",
        "",
        "| operation | samples | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for name, n, p50, p99, mx in rows:
        lines.append(f"| {name} | {n} | {p50:.1f} | {p99:.1f} | {mx:.1f} |")
    lines += ["", f"Machine load average (1 min) {load_before:.1f} before and {os.getloadavg()[0]:.1f} after the run "
              "(other engineers' test suites share the 2 cores); figures above are wall-clock under that load.",
              "", f"For scale: a bare `python -S -c pass` start costs {bare:.1f} ms here.",
              "Targets (issue 5): ADD p50 <= 100 ms, p99 <= 250 ms without the handshake wait.", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    keep = ""  # the EC2-provider section bench/cni/ec2.py appends stays
    try:
        with open(args.out) as f:
            old = f.read()
        mark = "<!-- bench/cni/ec2.py -->"
        if mark in old:
            keep = "\n" + mark + old.split(mark, 1)[1]
    except FileNotFoundError:
        pass
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + keep)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
