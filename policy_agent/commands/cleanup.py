"""`policy-agent cleanup`: remove every chain, rule and set of ours (both families, both backends), nothing else."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("cleanup", help="remove all our iptables chains/rules and ipsets, nothing else")
    p.add_argument("--netns", default=None, help="network namespace to clean (default: the current one)")
    p.add_argument("--backend", choices=("auto", "nft", "legacy"), default="auto", help="primary iptables backend")
    p.add_argument("--state-file", default=None, help="apply's metadata file to remove")
    p.set_defaults(func=run)


def run(args) -> int:
    from policy_agent.dataplane.apply import Dataplane, default_state_path

    dp = Dataplane(netns=args.netns, backend=args.backend, state_path=args.state_file or default_state_path(args.netns))
    report = dp.cleanup()
    json.dump({k: v for k, v in report.summary().items() if k != "seconds"}, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0
