"""Run inside a private netns: vpcip-ipamd --provider ec2 killed -9 mid-create/attach/assign,
restarted, then EC2 must hold exactly what the daemon's checkpoint holds. Prints JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from emulator import CREDS, REGION, ImdsServer, addresses_of, ec2_client, enis_of, make_node, metadata_for, start_moto  # noqa: E402

from cni_shim import client  # noqa: E402

IPAMD = os.path.join(os.path.dirname(sys.executable), "vpcip-ipamd")


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def run(point: str) -> dict:
    srv, url = start_moto()
    try:
        ec2 = ec2_client(url)
        node = make_node(ec2)
        imds = ImdsServer(metadata_for(ec2, node))
        tmp = tempfile.mkdtemp(prefix="i12-kill9-")
        sock, state, logf = f"{tmp}/ipamd.sock", f"{tmp}/state", f"{tmp}/ipamd.log"
        env = {**os.environ, "AWS_ENDPOINT_URL_EC2": url, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url,
               "AWS_ACCESS_KEY_ID": CREDS["aws_access_key_id"],
               "AWS_SECRET_ACCESS_KEY": CREDS["aws_secret_access_key"], "AWS_REGION": REGION}
        base = [IPAMD, "--provider", "ec2", "--socket", sock, "--state-dir", state, "--log-format", "json",
                "--cluster-name", "lab", "--cooldown-seconds", "0", "--pool-interval", "0.5",
                # no links with the ENIs' MACs in this netns (test_lab_ec2 covers the plumbing)
                "--no-eni-plumbing"]
        # Start 1: warm 12 on m5.large (9 per ENI) needs a second ENI; pause at the point and die.
        with open(logf, "w") as lf:
            p = subprocess.Popen(base + ["--warm-ip-target", "12"], env={**env, "VPCIP_IPAMD_FAULT": f"{point}=120"},
                                 stdout=lf, stderr=subprocess.STDOUT)
        wait_for(lambda: '"fault_pause"' in open(logf).read(), 60, f"the daemon to pause at {point}")
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        before = {i: sorted(addresses_of(e)) for i, e in enis_of(ec2, node).items()}
        # Start 2: no fault, a lower target, leaked-ENI GC with no grace.
        with open(logf, "a") as lf:
            q = subprocess.Popen(base + ["--warm-ip-target", "2", "--leaked-eni-grace-seconds", "0",
                                         "--eni-gc-interval", "1"], env=env, stdout=lf, stderr=subprocess.STDOUT)
        try:
            def settled():
                try:
                    d = client.call(sock, {"op": "dump"}, 5)["result"]
                except (client.DaemonUnavailable, client.DaemonFailed):
                    return None
                pool = {e["id"]: sorted(s["ipv4"] for s in e["slots"]) for e in d["pool"]["enis"]}
                ec2now = {i: sorted(addresses_of(e)) for i, e in enis_of(ec2, node).items()}
                return (pool, ec2now, d) if pool == ec2now and d["stats"]["available"] == 2 else None
            try:
                pool, ec2now, d = wait_for(settled, 60, "EC2 and the pool to agree")
            except SystemExit:
                d = client.call(sock, {"op": "dump"}, 5)["result"]
                pool = {e["id"]: sorted(s["ipv4"] for s in e["slots"]) for e in d["pool"]["enis"]}
                ec2now = {i: sorted(addresses_of(e)) for i, e in enis_of(ec2, node).items()}
            with open(os.path.join(state, "ipam.json")) as f:
                ck = json.load(f)
            checkpoint = {e["id"]: sorted(s["ipv4"] for s in e["slots"]) for e in ck["enis"]}
        finally:
            q.send_signal(signal.SIGTERM)
            q.wait(10)
        return {"point": point, "before": before, "pool": pool, "ec2": ec2now, "checkpoint": checkpoint,
                "primary": node.primary_eni, "log_tail": open(logf).read()[-3000:]}
    finally:
        srv.stop()


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1])))
