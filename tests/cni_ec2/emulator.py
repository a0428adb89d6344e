"""Test-side names for the EC2 EMULATOR, which lives in policy_agent/lab/ec2emu.py (the lab
runs it too): moto's server mode, an IMDSv2 server and a fault proxy, all real HTTP on 127.0.0.1."""

from __future__ import annotations

import json

from policy_agent.lab.ec2emu import (  # noqa: F401 - re-exported for the tests
    CREDS,
    REGION,
    FaultProxy,
    ImdsServer,
    Node,
    addresses_of,
    client_env,
    ec2_client,
    enis_of,
    make_node,
    metadata_for,
    reset_moto,
    start_moto,
)


def dump(obj) -> str:
    return json.dumps(obj, default=str, indent=1)
