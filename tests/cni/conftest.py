"""Fixtures for the CNI tests (helpers live in cni_lab_helpers.py)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile

import pytest
from cni_lab_helpers import Lab, pool_doc, sh

_counter = itertools.count()


@pytest.fixture
def make_lab():
    labs: list[Lab] = []

    def make(pool: dict | None = None, start: bool = True, daemon_args: tuple = (), env: dict | None = None) -> Lab:
        n = next(_counter)
        tag = f"pa-cni-{os.getpid()}-{n}"
        tmp = tempfile.mkdtemp(prefix=f"{tag}-")
        lab = Lab(
            tag=tag, tmp=tmp, node=f"{tag}-node", socket=os.path.join(tmp, "ipamd.sock"),
            state_dir=os.path.join(tmp, "state"), pool_file=os.path.join(tmp, "pool.json"),
            endpoint_dir=os.path.join(tmp, "endpoints"), status_dir=os.path.join(tmp, "status"),
            daemon_log=os.path.join(tmp, "ipamd.log"),
        )
        labs.append(lab)
        sh("ip", "netns", "add", lab.node)
        lab.netns.append(lab.node)
        sh("ip", "-n", lab.node, "link", "set", "lo", "up")
        # The node's own address, and forwarding between pods.
        # (on lo: this kernel has no dummy module)
        sh("ip", "-n", lab.node, "addr", "add", "10.233.199.1/32", "dev", "lo")
        sh("ip", "-n", lab.node, "addr", "add", "fd00:233::199:1/128", "dev", "lo")
        lab.in_node("sysctl", "-qw", "net.ipv4.ip_forward=1")
        lab.in_node("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        with open(lab.pool_file, "w") as f:
            json.dump(pool if pool is not None else pool_doc(), f)
        if start:
            lab.start_daemon(*daemon_args, env=env)
        return lab

    yield make
    for lab in labs:
        try:
            lab.stop_daemon()
        finally:
            for ns in reversed(lab.netns):
                sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(lab.tmp, ignore_errors=True)
