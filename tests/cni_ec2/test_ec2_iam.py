"""docs/iam-policy.json allows exactly the EC2 actions cni_shim/ipam/ec2.py calls."""

from __future__ import annotations

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_iam_policy_allows_exactly_the_actions_the_provider_calls():
    src = (ROOT / "cni_shim/ipam/ec2.py").read_text()
    called = set(re.findall(r'self\._call\(\s*"(\w+)"', src))
    # Every EC2 request goes through _call: no direct client method calls.
    assert not re.search(r"self\.client\.(?!meta\b)\w+\(", src)
    if "TagSpecifications" in src:
        called.add("CreateTags")  # tag-on-create needs ec2:CreateTags (scoped to CreateNetworkInterface)
    policy = json.loads((ROOT / "docs/iam-policy.json").read_text())
    allowed = set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        allowed |= {a.removeprefix("ec2:") for a in acts}
        assert all(a.startswith("ec2:") and "*" not in a for a in acts)
    assert len(called) >= 10 and allowed == called
