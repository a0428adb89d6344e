"""kill -9 of a real vpcip-ipamd (EC2 provider, moto) mid-create, mid-attach and mid-assign: after a
restart and the leaked-ENI GC, EC2 holds exactly what the checkpoint holds. Runs in a private netns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.mark.kernel
@pytest.mark.parametrize("point", ["pause-after-create", "pause-after-attach", "pause-after-assign"])
def test_kill9_mid_ec2_change_leaks_nothing_after_restart(point):
    ns = f"i12-kill9-{os.getpid()}-{point.rsplit('-', 1)[1]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.join(HERE, "kill9_scenario.py"), point],
                             capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if point == "pause-after-assign":
            assert any(r["before"].values())  # EC2 assigned addresses the checkpoint never saw...
        else:
            assert len(r["before"]) == 2  # an ENI of ours (unattached, or attached) was left behind...
        # ...and after the restart nothing is left that the checkpoint does not hold.
        assert r["ec2"] == r["pool"] == r["checkpoint"], r["log_tail"]
        assert list(r["ec2"]) == [r["primary"]] and len(r["ec2"][r["primary"]]) == 2
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
