"""`policy-agent dump`: our chains (with counters and origins), ipsets and endpoints, as in the kernel now."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("dump", help="show our chains, ipsets and endpoints as they are in the kernel now")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--netns", default=None, help="network namespace to read (default: the current one)")
    p.add_argument("--backend", choices=("auto", "nft", "legacy"), default="auto", help="iptables backend")
    p.add_argument("--state-file", default=None, help="apply's metadata file (default: /run/policy-agent/dataplane[-NETNS].json)")
    p.set_defaults(func=run)


def run(args) -> int:
    from policy_agent.dataplane.apply import default_state_path
    from policy_agent.dataplane.backend import detect_backend
    from policy_agent.dataplane.dump import collect, render_text
    from policy_agent.dataplane.kernel import SystemKernel
    from policy_agent.dataplane.runner import Runner

    runner = Runner(args.netns)
    kernel = SystemKernel(runner, detect_backend(runner, args.backend))
    doc = collect(kernel, args.state_file or default_state_path(args.netns))
    if args.format == "json":
        json.dump(doc, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(doc))
    return 0
