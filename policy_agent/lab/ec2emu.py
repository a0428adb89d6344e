"""An EC2 EMULATOR for labs and tests: moto's EC2 server, an IMDSv2 server, a fault proxy.

Nothing here talks to AWS. All three are real HTTP servers on 127.0.0.1 (random ports):
vpcip-ipamd --provider ec2 talks HTTP to them exactly as on a node
(AWS_ENDPOINT_URL_EC2 -> the proxy -> moto; AWS_EC2_METADATA_SERVICE_ENDPOINT -> the
IMDS server), only the far ends are emulated. moto is a test dependency (the `test`
extra); this module imports it only when a server is started.

- ``start_moto()``: moto's ThreadedMotoServer (server mode).
- ``make_node(ec2, ...)``: a VPC, a subnet, a security group and one instance in moto.
- ``ImdsServer(metadata_for(ec2, node))``: IMDSv2 (PUT token, GETs with it; else 401).
- ``FaultProxy(moto_url)``: forwards EC2 query requests to moto; injects errors
  (``fail``) or latency (``delay``, modelling real EC2 API latency) per action; answers
  InsufficientFreeAddressesInSubnet as EC2 would where moto never runs out; and can
  emulate the hypervisor's hot-plug (``on_attach``/``on_detach``): after an attach, a
  link with the ENI's MAC appears (the lab makes a veth in the node netns).

Run as a process (the lab does, inside the lab's node netns, so the daemon reaches it):
  python -m policy_agent.lab.ec2emu serve --out FILE [--instance-type T] [--subnet CIDR]
      [--hotplug] [--delay SECONDS]     writes {"ec2", "imds", "moto", "node"} to FILE, serves
  python -m policy_agent.lab.ec2emu describe --ec2 URL --instance ID
      prints the ENIs EC2 (moto) reports attached to the instance, as JSON
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Callable

REGION = "us-east-1"
# Fake credentials: moto accepts any; these only keep boto3's credential chain from
# looking further (and the tests check they never reach a log).
CREDS = {"aws_access_key_id": "AKIAVPCIPTESTKEY0000", "aws_secret_access_key": "vpcip-test-secret-never-logged"}
MOTO_AMI = "ami-03cf127a"  # one of moto's built-in AMIs (DescribeImages costs seconds per reset)


def start_moto():
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    return srv, f"http://{host}:{port}"


def reset_moto(url: str) -> None:
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    c.request("POST", "/moto-api/reset")
    c.getresponse().read()
    c.close()


def ec2_client(url: str):
    import boto3

    return boto3.session.Session(region_name=REGION, **CREDS).client("ec2", endpoint_url=url)


def client_env(ec2_url: str, imds_url: str) -> dict[str, str]:
    """The environment a vpcip-ipamd needs to use the emulator (fake credentials)."""
    return {"AWS_ENDPOINT_URL_EC2": ec2_url, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds_url,
            "AWS_ACCESS_KEY_ID": CREDS["aws_access_key_id"], "AWS_SECRET_ACCESS_KEY": CREDS["aws_secret_access_key"],
            "AWS_REGION": REGION}


@dataclass
class Node:
    """A VPC, a subnet and one instance in moto."""

    instance_id: str
    instance_type: str
    subnet_id: str
    subnet_cidr: str
    subnet_v6: str
    vpc_id: str
    vpc_cidr: str
    sg: str
    primary_eni: str
    extra: dict = field(default_factory=dict)


def make_node(ec2, instance_type: str = "m5.large", subnet_cidr: str = "10.233.0.0/20",
              dual_stack: bool = False, vpc_cidr: str = "10.233.0.0/16") -> Node:
    vpc = ec2.create_vpc(CidrBlock=vpc_cidr, AmazonProvidedIpv6CidrBlock=dual_stack)["Vpc"]
    kw = {}
    v6 = ""
    if dual_stack:
        vpc6 = ec2.describe_vpcs(VpcIds=[vpc["VpcId"]])["Vpcs"][0]["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"]
        v6 = vpc6.replace("/56", "/64")
        kw["Ipv6CidrBlock"] = v6
    subnet = ec2.create_subnet(VpcId=vpc["VpcId"], CidrBlock=subnet_cidr, AvailabilityZone=REGION + "a", **kw)["Subnet"]
    sg = ec2.create_security_group(GroupName="node", Description="node", VpcId=vpc["VpcId"])["GroupId"]
    inst = ec2.run_instances(ImageId=MOTO_AMI, InstanceType=instance_type, MinCount=1, MaxCount=1,
                             SubnetId=subnet["SubnetId"], SecurityGroupIds=[sg])["Instances"][0]
    eni = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]
    return Node(inst["InstanceId"], instance_type, subnet["SubnetId"], subnet_cidr, v6, vpc["VpcId"],
                vpc_cidr, sg, eni)


def metadata_for(ec2, node: Node) -> dict[str, str]:
    """The IMDS paths (under latest/meta-data/) for the node, read from moto."""
    enis = ec2.describe_network_interfaces(
        Filters=[{"Name": "attachment.instance-id", "Values": [node.instance_id]}])["NetworkInterfaces"]
    md = {
        "instance-id": node.instance_id, "instance-type": node.instance_type,
        "placement/availability-zone": REGION + "a", "placement/region": REGION,
    }
    macs = []
    for e in enis:
        mac = e["MacAddress"]
        macs.append(mac + "/")
        p = f"network/interfaces/macs/{mac}/"
        if e["Attachment"]["DeviceIndex"] == 0:
            md["mac"] = mac
        md[p + "interface-id"] = e["NetworkInterfaceId"]
        md[p + "device-number"] = str(e["Attachment"]["DeviceIndex"])
        md[p + "subnet-id"] = e["SubnetId"]
        md[p + "vpc-id"] = e["VpcId"]
        md[p + "subnet-ipv4-cidr-block"] = node.subnet_cidr
        if node.subnet_v6:
            md[p + "subnet-ipv6-cidr-blocks"] = node.subnet_v6
        md[p + "vpc-ipv4-cidr-blocks"] = node.vpc_cidr
        md[p + "security-group-ids"] = "\n".join(g["GroupId"] for g in e["Groups"])
        md[p + "local-ipv4s"] = "\n".join(a["PrivateIpAddress"] for a in e["PrivateIpAddresses"])
        if e.get("Ipv6Addresses"):
            md[p + "ipv6s"] = "\n".join(a["Ipv6Address"] for a in e["Ipv6Addresses"])
    md["network/interfaces/macs/"] = "\n".join(macs)
    return md


class ImdsServer:
    """IMDSv2: PUT latest/api/token, then GETs carrying the token; anything else is 401."""

    def __init__(self, metadata: dict[str, str], host: str = "127.0.0.1") -> None:
        self.metadata = metadata
        self.tokens: set[str] = set()
        self.unauthorized = 0
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(400)
                tok = secrets.token_hex(16)
                outer.tokens.add(tok)
                self._send(200, tok)

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") not in outer.tokens:
                    outer.unauthorized += 1
                    return self._send(401)
                path = self.path.removeprefix("/latest/meta-data/")
                if path in outer.metadata:
                    return self._send(200, outer.metadata[path])
                self._send(404)

        self.httpd = http.server.ThreadingHTTPServer((host, 0), H)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


HotplugHook = Callable[[str, int, str], None]  # (eni id, device index, MAC)


class FaultProxy:
    """Forwards EC2 query requests to moto; injects errors and latency per action."""

    def __init__(self, upstream: str, enforce_subnet_capacity: bool = True) -> None:
        self.upstream = urllib.parse.urlparse(upstream)
        # moto 5.2.5 never runs out of subnet addresses (asked for more than a subnet has,
        # it loops forever); EC2 answers InsufficientFreeAddressesInSubnet. The proxy does.
        self.enforce = enforce_subnet_capacity
        self._ec2 = ec2_client(upstream)
        self.faults: dict[str, list] = {}  # action -> [remaining, code, status]
        self.delays: dict[str, float] = {}  # action (or "*") -> seconds added before forwarding
        self.seen: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.on_attach: HotplugHook | None = None
        self.on_detach: HotplugHook | None = None
        self._attachments: dict[str, tuple[str, int, str]] = {}  # attachment id -> (eni, device, mac)
        self.lock = threading.Lock()
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _answer(self, status: int, data: bytes, headers=()) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                q = urllib.parse.parse_qs(body.decode())
                action = q.get("Action", [""])[0]
                with outer.lock:
                    outer.seen[action] = outer.seen.get(action, 0) + 1
                    outer.in_flight[action] = outer.in_flight.get(action, 0) + 1
                    f = outer.faults.get(action)
                    inject = f is not None and f[0] > 0
                    if inject:
                        f[0] -= 1
                    delay = outer.delays.get(action, outer.delays.get("*", 0.0))
                try:
                    if delay > 0:
                        time.sleep(delay)
                    if outer.enforce and outer._exhausted(action, q):
                        return self._answer(400, (
                            b"<Response><Errors><Error><Code>InsufficientFreeAddressesInSubnet</Code><Message>"
                            b"The specified subnet does not have enough free addresses to satisfy the request."
                            b"</Message></Error></Errors><RequestID>capacity</RequestID></Response>"))
                    if inject:
                        return self._answer(f[2], (
                            f"<Response><Errors><Error><Code>{f[1]}</Code><Message>injected by the test proxy"
                            f"</Message></Error></Errors><RequestID>fault</RequestID></Response>").encode())
                    hot = outer._before(action, q)
                    c = http.client.HTTPConnection(outer.upstream.hostname, outer.upstream.port, timeout=30)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    c.request("POST", self.path, body=body, headers=headers)
                    r = c.getresponse()
                    data = r.read()
                    c.close()
                    if r.status == 200:
                        outer._after(action, q, data, hot)
                    self._answer(r.status, data, [(k, v) for k, v in r.getheaders() if k.lower() not in (
                        "content-length", "transfer-encoding", "connection", "server", "date")])
                finally:
                    with outer.lock:
                        outer.in_flight[action] -= 1

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _before(self, action: str, q: dict):
        if action == "DetachNetworkInterface" and self.on_detach is not None:
            return self._attachments.pop(q.get("AttachmentId", [""])[0], None)
        return None

    def _after(self, action: str, q: dict, data: bytes, hot) -> None:
        """The hypervisor's side of an attach/detach: a link with the ENI's MAC comes and goes."""
        try:
            if action == "AttachNetworkInterface" and self.on_attach is not None:
                eni, dev = q["NetworkInterfaceId"][0], int(q["DeviceIndex"][0])
                m = re.search(rb"<attachmentId>([^<]+)</attachmentId>", data)
                mac = self._ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]["MacAddress"]
                if m:
                    self._attachments[m.group(1).decode()] = (eni, dev, mac)
                self.on_attach(eni, dev, mac)
            elif action == "DetachNetworkInterface" and hot is not None and self.on_detach is not None:
                self.on_detach(*hot)
        except Exception as exc:  # noqa: BLE001 - the emulated hot-plug must never break the API answer
            print(f"ec2emu: hotplug after {action} failed: {exc}", file=sys.stderr, flush=True)

    def _exhausted(self, action: str, q: dict) -> bool:
        if action == "AssignPrivateIpAddresses" and "SecondaryPrivateIpAddressCount" in q:
            want = int(q["SecondaryPrivateIpAddressCount"][0])
            eni = self._ec2.describe_network_interfaces(NetworkInterfaceIds=q["NetworkInterfaceId"])
            subnet = eni["NetworkInterfaces"][0]["SubnetId"]
        elif action == "CreateNetworkInterface":
            want, subnet = 1, q["SubnetId"][0]
        else:
            return False
        free = self._ec2.describe_subnets(SubnetIds=[subnet])["Subnets"][0]["AvailableIpAddressCount"]
        return want > free

    def fail(self, action: str, times: int, code: str = "RequestLimitExceeded", status: int = 503) -> None:
        with self.lock:
            self.faults[action] = [times, code, status]

    def delay(self, action: str, seconds: float) -> None:
        """Add ``seconds`` before every ``action`` call ("*": every call without its own delay)."""
        with self.lock:
            self.delays[action] = seconds

    def busy(self, action: str) -> int:
        with self.lock:
            return self.in_flight.get(action, 0)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def enis_of(ec2, node: Node) -> dict[str, dict]:
    """Every ENI in the node's subnet, by id (attached or not)."""
    out = ec2.describe_network_interfaces(Filters=[{"Name": "subnet-id", "Values": [node.subnet_id]}])
    return {e["NetworkInterfaceId"]: e for e in out["NetworkInterfaces"]}


def addresses_of(eni: dict) -> set[str]:
    """Pod addresses EC2 holds on the ENI: secondary IPv4s and every address of its /28s."""
    out = {a["PrivateIpAddress"] for a in eni.get("PrivateIpAddresses", []) if not a.get("Primary")}
    for p in eni.get("Ipv4Prefixes", []):
        out |= {str(a) for a in ipaddress.ip_network(p["Ipv4Prefix"])}
    return out


# --- the lab's emulator process ----------------------------------------------------------


def hotplug_link_name(device: int) -> str:
    """The stand-in link for ENI device N: ens(5+N), as Nitro instances name them (never eni*: pods)."""
    return f"ens{5 + device}"


def _hotplug_add(eni: str, device: int, mac: str) -> None:
    name = hotplug_link_name(device)
    subprocess.run(["ip", "link", "del", name], capture_output=True)
    subprocess.run(["ip", "link", "add", name, "address", mac, "type", "veth", "peer", "name", name + "p"],
                   check=True, capture_output=True)
    print(f"ec2emu: hotplug {eni} device {device} -> link {name} ({mac})", file=sys.stderr, flush=True)


def _hotplug_del(eni: str, device: int, mac: str) -> None:
    subprocess.run(["ip", "link", "del", hotplug_link_name(device)], capture_output=True)
    print(f"ec2emu: unplug {eni} device {device}", file=sys.stderr, flush=True)


def serve(out: str, instance_type: str, subnet: str, hotplug: bool, delay: float) -> int:
    srv, url = start_moto()
    ec2 = ec2_client(url)
    node = make_node(ec2, instance_type=instance_type, subnet_cidr=subnet)
    imds = ImdsServer(metadata_for(ec2, node))
    proxy = FaultProxy(url)
    if delay > 0:
        proxy.delay("*", delay)
    if hotplug:  # this process runs inside the lab's node netns: links appear there
        proxy.on_attach, proxy.on_detach = _hotplug_add, _hotplug_del
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"ec2": proxy.url, "imds": imds.url, "moto": url, "node": asdict(node), "pid": os.getpid(),
                   "emulator": "moto server mode + IMDSv2 test server; not AWS"}, f)
    os.replace(tmp, out)
    print(f"ec2emu: EC2 EMULATOR (moto) at {proxy.url}, IMDS at {imds.url}, instance {node.instance_id}",
          file=sys.stderr, flush=True)
    stop.wait()
    proxy.close()
    imds.close()
    srv.stop()
    return 0


def describe(ec2_url: str, instance_id: str) -> list[dict]:
    ec2 = ec2_client(ec2_url)
    out = ec2.describe_network_interfaces(
        Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])["NetworkInterfaces"]
    return [{"id": e["NetworkInterfaceId"], "device": e["Attachment"]["DeviceIndex"], "mac": e["MacAddress"],
             "primary_ip": e["PrivateIpAddress"], "addresses": sorted(addresses_of(e))} for e in out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m policy_agent.lab.ec2emu",
                                 description="EC2 EMULATOR (moto) + IMDSv2 server for labs; never AWS")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--out", required=True)
    s.add_argument("--instance-type", default="m5.large")
    s.add_argument("--subnet", default="10.233.0.0/20")
    s.add_argument("--hotplug", action="store_true", help="make a veth with the ENI's MAC appear on attach")
    s.add_argument("--delay", type=float, default=0.0, help="seconds added to every EC2 call (models EC2 latency)")
    d = sub.add_parser("describe")
    d.add_argument("--ec2", required=True)
    d.add_argument("--instance", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.out, args.instance_type, args.subnet, args.hotplug, args.delay)
    print(json.dumps(describe(args.ec2, args.instance)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
