"""vpcip-ipamd with the EC2 provider, against an EC2 EMULATOR (moto server mode; never AWS).

Three measurements, written to docs/performance-cni.md (section "EC2 provider"):

1. ADD latency, warm pool vs empty pool. The real `vpcip-cni` executable and the real
   `vpcip-ipamd --provider ec2` in a private node netns; the emulator (policy_agent/lab/
   ec2emu.py: moto + IMDSv2 + the fault proxy) runs in the same netns. "warm": a warm
   target keeps free addresses (WARM_IP_TARGET=5), every ADD finds one. "empty":
   MINIMUM_IP_TARGET=1 and no warm target, pods kept, so every ADD finds the pool empty
   and waits for the background fill (one AssignPrivateIpAddresses). Each run once with
   the emulator as fast as it is and once with an added per-call delay (--delay, default
   0.15 s) modelling real EC2 API latency (100-300 ms per call is typical; not measured here).
2. Time to fill the warm pool, in process (Pool + Ec2Provider through the proxy): the
   initial fill with WARM_ENI_TARGET=1 (one ENI's worth) and a full node
   (MINIMUM_IP_TARGET = max pods, every ENI attached and filled), for m5.large (3 ENIs x
   10 IPs) and c5.18xlarge (15 x 50), with and without the per-call delay.
3. EC2 calls per 100 pod starts, IP mode vs prefix mode: m5.large, churn with at most 15
   pods running (each start beyond 15 stops the oldest), a simulated clock advancing 3 s
   per start, IP_COOLDOWN 30 s, default targets (WARM_ENI_TARGET=1; prefix mode
   WARM_PREFIX_TARGET=1), a reconcile after every start and stop (an upper bound on
   calls: the daemon reconciles at most every --pool-interval). Counted by
   Ec2Provider.calls. IP mode runs against the emulator AND a stateful botocore stub;
   prefix mode only against the stub (moto 5.2.5 ignores Ipv4PrefixCount); the stub
   answers from its own ENI/prefix state after botocore has validated every request
   against the EC2 model.

Run as root: .venv/bin/python bench/cni/ec2.py [--delay 0.15] [--pods 20] [--out docs/performance-cni.md]
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "cni"))
sys.path.insert(0, ROOT)

from cni_lab_helpers import VPCIP_CNI, Lab, sh  # noqa: E402

from cni_shim.ipam.ec2 import Ec2Provider, Ec2Settings  # noqa: E402
from cni_shim.ipam.imds import Imds  # noqa: E402
from cni_shim.ipam.limits import ENI_LIMITS  # noqa: E402
from cni_shim.ipam.pool import Pool, PoolShort, Targets  # noqa: E402
from cni_shim.ipam.retry import Backoff  # noqa: E402
from policy_agent.lab import ec2emu  # noqa: E402

MARK = "<!-- bench/cni/ec2.py -->"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1)))))]


# --- 1. ADD latency through the real executable and daemon -----------------------------


def add_latency(delay: float, mode: str, pods: int) -> list[float]:
    tag = f"i12b-bench-{os.getpid()}-{mode[0]}{int(delay * 1000)}"
    tmp = tempfile.mkdtemp(prefix="i12b-ec2-bench-")
    lab = Lab(tag=tag, tmp=tmp, node=f"{tag}-node", socket=os.path.join(tmp, "ipamd.sock"),
              state_dir=os.path.join(tmp, "state"), pool_file=os.path.join(tmp, "unused.json"),
              endpoint_dir=os.path.join(tmp, "endpoints"), status_dir=os.path.join(tmp, "status"),
              daemon_log=os.path.join(tmp, "ipamd.log"))
    sh("ip", "netns", "add", lab.node)
    lab.netns.append(lab.node)
    sh("ip", "-n", lab.node, "link", "set", "lo", "up")
    out = os.path.join(tmp, "emu.json")
    emu = subprocess.Popen(["ip", "netns", "exec", lab.node, sys.executable, "-m", "policy_agent.lab.ec2emu", "serve",
                            "--out", out, "--instance-type", "c5.18xlarge", "--delay", str(delay), "--hotplug"],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "emu.log"), "w"))
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(out):
            if time.monotonic() > deadline or emu.poll() is not None:
                raise RuntimeError(f"emulator did not start: {open(os.path.join(tmp, 'emu.log')).read()}")
            time.sleep(0.1)
        info = json.load(open(out))
        targets = ["--warm-ip-target", "5"] if mode == "warm" else ["--minimum-ip-target", "1"]
        lab.start_daemon("--provider", "ec2", "--cluster-name", "bench", "--log-level", "warning", *targets,
                         env=ec2emu.client_env(info["ec2"], info["imds"]))
        conf = json.dumps(lab.conf(requestTimeoutSeconds=30))
        samples = []
        for i in range(pods + 1):
            ns = lab.new_pod_netns(f"p{i}")
            if mode == "warm":
                # let the background top-up finish: this sample measures a warm hit
                for _ in range(200):
                    if lab.dump()["stats"]["available"] >= 5:
                        break
                    time.sleep(0.05)
            env = lab.env("ADD", cid=f"cid-p{i}", netns=ns, pod=f"p{i}")
            t0 = time.perf_counter()
            p = subprocess.run([VPCIP_CNI], input=conf, env=env, capture_output=True, text=True)
            dt = (time.perf_counter() - t0) * 1000
            if p.returncode != 0:
                raise RuntimeError(f"ADD p{i} failed: {p.stdout} {p.stderr} {lab.log_text()}")
            if i:  # the first ADD warms page cache and imports
                samples.append(dt)
        return samples
    finally:
        lab.stop_daemon()
        emu.terminate()
        emu.wait(20)
        for ns in reversed(lab.netns):
            sh("ip", "netns", "del", ns, check=False)


# --- 2. fill time, in process ------------------------------------------------------------


class Emu:
    """moto + IMDS + proxy in this process (the provider talks HTTP to them)."""

    def __init__(self) -> None:
        self.srv, self.url = ec2emu.start_moto()
        self.proxy = ec2emu.FaultProxy(self.url)
        self.imds = None

    def node(self, instance_type: str) -> Ec2Provider:
        ec2emu.reset_moto(self.url)
        ec2 = ec2emu.ec2_client(self.url)
        node = ec2emu.make_node(ec2, instance_type=instance_type, subnet_cidr="10.233.0.0/20")
        if self.imds:
            self.imds.close()
        self.imds = ec2emu.ImdsServer(ec2emu.metadata_for(ec2, node))
        os.environ.update(ec2emu.client_env(self.proxy.url, self.imds.url))
        prov = Ec2Provider.from_environment(Ec2Settings(cluster_name="bench", leaked_eni_grace=1e9), imds=Imds())
        prov.backoff = Backoff(sleep=lambda s: None, rng=random.Random(1))
        return prov

    def close(self) -> None:
        self.proxy.close()
        if self.imds:
            self.imds.close()
        self.srv.stop()


def fill_time(emu: Emu, instance_type: str, full: bool, delay: float) -> tuple[float, int, int, Counter]:
    prov = emu.node(instance_type)
    lim = prov.limits
    targets = Targets(minimum_ip=lim.max_enis * (lim.ips_per_eni - 1), cooldown=0) if full else Targets(warm_eni=1)
    pool = Pool(prov, targets)
    emu.proxy.delay("*", delay)
    prov.calls.clear()
    t0 = time.perf_counter()
    for _ in range(lim.max_enis * 2 + 2):
        pool.reconcile(0)
        st = pool.stats(0)
        if st.total >= (targets.minimum_ip if full else lim.slots_per_eni):
            break
    dt = time.perf_counter() - t0
    emu.proxy.delay("*", 0)
    st = pool.stats(0)
    return dt, st.total, st.enis, Counter(prov.calls)


# --- 3. EC2 calls per 100 pod starts ------------------------------------------------------


class StubEc2:
    """A stateful EC2 stand-in behind botocore's before-call hook (as Stubber answers), for
    prefix mode, which moto ignores. botocore validates each request against the EC2 model
    before the hook runs; the hook answers from this object's ENIs, addresses and /28s."""

    def __init__(self, client, instance_id: str, subnet: str) -> None:
        self.instance_id = instance_id
        self.subnet = ipaddress.ip_network(subnet)
        self.enis: dict[str, dict] = {}
        self.free = iter(list(self.subnet.hosts())[4:])  # addresses, handed out in order
        self.free28 = iter(list(self.subnet.subnets(new_prefix=28))[8:])
        self.ids = itertools.count(1)
        self._eni("eni-primary", 0)
        self._params: dict = {}
        client.meta.events.register_first("before-parameter-build.ec2.*", self._keep)
        client.meta.events.register_first("before-call.ec2.*", self._answer)

    def _keep(self, params, **_):
        self._params = dict(params)  # the API parameters, as the caller gave them

    def _eni(self, eid: str, dev: int | None) -> dict:
        e = {"NetworkInterfaceId": eid, "PrivateIpAddress": str(next(self.free)), "SubnetId": "subnet-bench",
             "MacAddress": f"02:00:00:00:{len(self.enis):02x}:01", "Status": "in-use" if dev is not None else "available",
             "secondary": [], "prefixes": [], "TagSet": []}
        if dev is not None:
            e["Attachment"] = {"DeviceIndex": dev, "AttachmentId": f"attach-{eid}", "InstanceId": self.instance_id}
        self.enis[eid] = e
        return e

    def _view(self, e: dict) -> dict:
        out = {k: v for k, v in e.items() if k not in ("secondary", "prefixes")}
        out["PrivateIpAddresses"] = [{"PrivateIpAddress": e["PrivateIpAddress"], "Primary": True}] + [
            {"PrivateIpAddress": a, "Primary": False} for a in e["secondary"]]
        out["Ipv4Prefixes"] = [{"Ipv4Prefix": p} for p in e["prefixes"]]
        return out

    def _answer(self, model, **_):
        op, params = model.name, self._params
        if op == "DescribeNetworkInterfaces":
            r = {"NetworkInterfaces": [self._view(e) for e in self.enis.values() if
                                       ("Attachment" in e) == ("attachment.instance-id" in json.dumps(params))]}
        elif op == "CreateNetworkInterface":
            e = self._eni(f"eni-{next(self.ids):04d}", None)
            e["TagSet"] = params["TagSpecifications"][0]["Tags"]
            r = {"NetworkInterface": self._view(e)}
        elif op == "AttachNetworkInterface":
            e = self.enis[params["NetworkInterfaceId"]]
            e["Attachment"] = {"DeviceIndex": params["DeviceIndex"], "AttachmentId": f"attach-{e['NetworkInterfaceId']}"}
            e["Status"] = "in-use"
            r = {"AttachmentId": e["Attachment"]["AttachmentId"]}
        elif op == "AssignPrivateIpAddresses":
            e = self.enis[params["NetworkInterfaceId"]]
            if "Ipv4PrefixCount" in params:
                new = [str(next(self.free28)) for _ in range(params["Ipv4PrefixCount"])]
                e["prefixes"] += new
                r = {"NetworkInterfaceId": e["NetworkInterfaceId"], "AssignedIpv4Prefixes": [{"Ipv4Prefix": p} for p in new]}
            else:
                new = [str(next(self.free)) for _ in range(params["SecondaryPrivateIpAddressCount"])]
                e["secondary"] += new
                r = {"NetworkInterfaceId": e["NetworkInterfaceId"],
                     "AssignedPrivateIpAddresses": [{"PrivateIpAddress": a} for a in new]}
        elif op == "UnassignPrivateIpAddresses":
            e = self.enis[params["NetworkInterfaceId"]]
            e["prefixes"] = [p for p in e["prefixes"] if p not in params.get("Ipv4Prefixes", [])]
            e["secondary"] = [a for a in e["secondary"] if a not in params.get("PrivateIpAddresses", [])]
            r = {}
        elif op == "DetachNetworkInterface":
            for e in self.enis.values():
                if e.get("Attachment", {}).get("AttachmentId") == params["AttachmentId"]:
                    e.pop("Attachment")
                    e["Status"] = "available"
            r = {}
        elif op == "DeleteNetworkInterface":
            self.enis.pop(params["NetworkInterfaceId"], None)
            r = {}
        elif op == "ModifyNetworkInterfaceAttribute":
            r = {}
        else:
            raise RuntimeError(f"the bench stub does not answer {op}")
        from botocore.awsrequest import AWSResponse

        return AWSResponse(None, 200, {}, None), r


def stub_provider(prefix: bool) -> Ec2Provider:
    import boto3

    facts_if = ec2emu.Node("i-bench", "m5.large", "subnet-bench", "10.233.0.0/20", "", "vpc-bench", "10.233.0.0/16",
                           "sg-bench", "eni-primary")
    from cni_shim.ipam.imds import InstanceFacts, InterfaceFacts

    facts = InstanceFacts("i-bench", "m5.large", "us-east-1a", "us-east-1", "02:00:00:00:00:01", (InterfaceFacts(
        "02:00:00:00:00:01", "eni-primary", 0, "subnet-bench", "vpc-bench", ("10.233.0.0/20",), (), ("10.233.0.0/16",),
        ("sg-bench",), (), ()),))
    client = boto3.session.Session(region_name="us-east-1", **ec2emu.CREDS).client(
        "ec2", endpoint_url="http://127.0.0.1:9")  # never reached: the hook answers first
    StubEc2(client, facts_if.instance_id, facts_if.subnet_cidr)
    return Ec2Provider(client, facts, Ec2Settings(cluster_name="bench", prefix_delegation=prefix),
                       backoff=Backoff(sleep=lambda s: None))


def churn_calls(prov: Ec2Provider, starts: int = 100, running: int = 15) -> tuple[Counter, int]:
    pool = Pool(prov, Targets(cooldown=30.0, warm_eni=1, warm_prefix=1))
    now = 0.0
    pool.reconcile(now)
    live: list[tuple[str, str, str]] = []
    for i in range(starts):
        now += 3.0
        if len(live) >= running:
            pool.release(live.pop(0), now)
            pool.reconcile(now)
        key = ("bench", f"c{i}", "eth0")
        try:
            pool.allocate(key, now)
        except PoolShort:
            pool.demand += 1
            pool.reconcile(now)
            pool.demand -= 1
            pool.allocate(key, now)
        live.append(key)
        pool.reconcile(now)
    return Counter(prov.calls), pool.stats(now).enis


def fmt_calls(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=0.15, help="seconds added per EC2 call (models EC2 latency)")
    ap.add_argument("--pods", type=int, default=20, help="ADD samples per mode and delay")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "performance-cni.md"))
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    lines = [MARK, "## EC2 provider (against an EC2 EMULATOR: moto server mode, not AWS)", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}, kernel {platform.release()}) by `bench/cni/ec2.py --delay {args.delay:g} "
             f"--pods {args.pods}`. EC2 is moto {__import__('moto').__version__} in server mode behind the fault proxy "
             "(policy_agent/lab/ec2emu.py); \"+delay\" adds "
             f"{args.delay * 1000:.0f} ms to every EC2 call at the proxy to model real EC2 API latency "
             "(typically 100-300 ms per call; a model, not a measurement of AWS). Absolute times are this "
             "emulator's; the differences between rows are the point.", ""]
    # 1
    lines += ["### ADD latency: warm pool vs empty pool (ADD waits for the fill)", "",
              "Real `vpcip-cni` + `vpcip-ipamd --provider ec2` (c5.18xlarge, subnet /20) in a private node netns, "
              f"{args.pods} pods one after another, each sample from spawn to exit of the executable. warm: "
              "WARM_IP_TARGET=5 (the sample waits until the top-up is done, so every ADD finds a free address); "
              "empty: MINIMUM_IP_TARGET=1, pods kept, so every ADD finds no free address, wakes the background "
              "fill and waits for it (one AssignPrivateIpAddresses), never holding the pool lock.", "",
              "| pool | EC2 per-call delay | samples | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    for delay in (0.0, args.delay):
        for mode in ("warm", "empty"):
            xs = add_latency(delay, mode, args.pods)
            lines.append(f"| {mode} | {delay * 1000:.0f} ms | {len(xs)} | {statistics.median(xs):.1f} | "
                         f"{pct(xs, 99):.1f} | {max(xs):.1f} |")
            print(lines[-1], flush=True)
    lines += ["", "The ADD samples are dominated by the interpreter start and the machine load; what the EC2 wait "
              "adds is the empty-minus-warm difference, about one EC2 call. DEL and warm ADDs never wait for a "
              "fill in flight (tests/cni_ec2/test_ec2_add_path.py)."]
    # 2
    lines += ["", "### Time to fill the warm pool", "",
              "In process: Pool + Ec2Provider through the proxy to moto, reconcile until the target is met. "
              "Initial = WARM_ENI_TARGET=1 (one ENI's worth of addresses, the primary ENI's); full node = "
              "MINIMUM_IP_TARGET = max addresses (every ENI attached and filled).", "",
              "| instance | fill | EC2 per-call delay | seconds | addresses | ENIs | EC2 calls |", "|---|---|---|---|---|---|---|"]
    emu = Emu()
    try:
        for itype in ("m5.large", "c5.18xlarge"):
            for full in (False, True):
                for delay in (0.0, args.delay):
                    dt, total, enis, calls = fill_time(emu, itype, full, delay)
                    lines.append(f"| {itype} ({ENI_LIMITS[itype][0]} ENIs x {ENI_LIMITS[itype][1]} IPs) | "
                                 f"{'full node' if full else 'initial (1 ENI)'} | {delay * 1000:.0f} ms | {dt:.2f} | "
                                 f"{total} | {enis} | {sum(calls.values())}: {fmt_calls(calls)} |")
                    print(lines[-1], flush=True)
        # 3
        ip_emu, ip_emu_enis = churn_calls(emu.node("m5.large"))
    finally:
        emu.close()
    ip_stub, ip_stub_enis = churn_calls(stub_provider(prefix=False))
    pd_stub, pd_stub_enis = churn_calls(stub_provider(prefix=True))
    lines += ["", "### EC2 calls per 100 pod starts: IP mode vs prefix mode", "",
              "m5.large, 100 pod starts with at most 15 pods running (the 16th start stops the oldest), clock +3 s "
              "per start, IP_COOLDOWN 30 s, default targets (WARM_ENI_TARGET=1 / WARM_PREFIX_TARGET=1), a reconcile "
              "after every start and stop. Calls counted by Ec2Provider.calls (the initial fill included).", "",
              "| mode | EC2 backend | calls | ENIs at the end | by action |", "|---|---|---|---|---|",
              f"| IP (secondary addresses) | emulator (moto) | {sum(ip_emu.values())} | {ip_emu_enis} | {fmt_calls(ip_emu)} |",
              f"| IP (secondary addresses) | stateful stub | {sum(ip_stub.values())} | {ip_stub_enis} | {fmt_calls(ip_stub)} |",
              f"| prefix (/28 per slot) | stateful stub | {sum(pd_stub.values())} | {pd_stub_enis} | {fmt_calls(pd_stub)} |",
              "", f"Machine load average (1 min) {load0:.1f} before and {os.getloadavg()[0]:.1f} after "
              "(other engineers' test suites share the cores).", ""]
    text = "\n".join(lines)
    print(text)
    try:
        with open(args.out) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = ""
    doc = doc.split(MARK)[0].rstrip() + "\n\n" + text
    with open(args.out, "w") as f:
        f.write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
