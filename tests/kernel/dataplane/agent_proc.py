"""Stand-in agent process for restart tests: apply one sample state and exit.

usage: python agent_proc.py <netns> <backend> <variant> <json pods>
Prints the ApplyReport summary as JSON on stdout. No flush at start or exit.
"""

from __future__ import annotations

import json
import sys

from policy_agent.lab import specs as s
from policy_agent.dataplane.apply import Dataplane


def variant(name: str) -> list[s.Policy]:
    b = s.PolicyRule(s.Peer("x", "app=b"), (("tcp", 80),))
    c81 = s.PolicyRule(s.Peer("x", "app=c"), (("tcp", 81),))
    rules = {"s1": (b,), "s2": (b, c81)}[name]
    return [s.Policy("x", "allow-to-a", "app=a", ingress=rules)]


def main() -> int:
    ns, backend, name, pods = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    pods = [s.Pod("x", n, tuple(ips), frozenset({f"app={n}"}), True) for n, ips in pods.items()]
    report = Dataplane(netns=ns, backend=backend).apply(s.build(pods, variant(name)), allow_sweep=True)
    print(json.dumps({"lines_written": report.lines_written, "iptables_lines": report.iptables_lines}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
