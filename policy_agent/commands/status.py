"""`policy-agent status`: ask the running agent (its /status endpoint) how it is doing.

By default it reads the agent's root-only Unix socket (setting status_socket; the
default path depends on netns, so give --netns as the agent has it). --url reads
/status over TCP instead, which the agent serves only with status_over_tcp.

Exit status: 0 ready, 1 running but not ready, 3 agent unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from policy_agent import config as config_mod


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="show the running agent's status", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--url", default=None,
                   help="agent base URL, e.g. http://127.0.0.1:9909 (needs status_over_tcp on the agent); "
                        "default: the agent's Unix socket")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the agent")
    config_mod.add_arguments(p, only=("status_socket", "netns"))
    p.set_defaults(func=main)


def _age(seconds: Any) -> str:
    return "never" if seconds is None else f"{seconds:.1f}s ago"


def _source_line(name: str, v: dict[str, Any]) -> str:
    line = f"\n  {name}: {'in sync' if v['in_sync'] else 'NOT in sync'} (syncs: {v['syncs']})"
    if not v.get("gates_sync", True):
        line += ", not needed to apply"
    health = v.get("health")
    if health and not health.get("healthy", True):
        line += f", UNHEALTHY: {health.get('state')}: {health.get('detail')}"
    return line


def render(s: dict[str, Any]) -> str:
    lines = [
        f"node:          {s['node']}",
        f"ready:         {'yes' if s['ready'] else 'no'}",
        f"in sync:       {'yes' if s['in_sync'] else 'no'}"
        + "".join(_source_line(name, v) for name, v in s["sources"].items()),
    ]
    if s.get("unready_reason"):
        lines.append(f"unready:       {s['unready_reason']}")
    fails = s.get("apply_failures") or {}
    if fails.get("consecutive"):
        lines.append(f"apply failing: {fails['consecutive']} in a row (last error: {fails.get('last_error')})")
    if s.get("last_apply_time"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["last_apply_time"]))
        lines.append(f"last apply:    {when} ({_age(s['last_apply_age_seconds'])}, "
                     f"took {s['last_apply_duration_seconds'] * 1000:.1f} ms, {s['last_apply_reason']})")
    else:
        lines.append("last apply:    never")
    c = s["counts"]
    lines += [
        f"applies:       {s['applies']}"
        + (f" (generation {s['applied_generation']} of {s['observed_generation']} enforced)"
           if "applied_generation" in s else ""),
        f"pending:       {s['pending_events']} events",
        f"objects:       {c['namespaces']} namespaces, {c['pods']} pods, {c['policies']} policies, "
        f"{c['endpoint_records']} endpoint records, {c['links']} links",
        f"programmed:    {c['local_endpoints']} local endpoints, {c['rules']} rules, {c['ipsets']} ipsets",
        f"errors:        {s['errors']['total']}" + (f" (last: {s['errors']['last']})" if s["errors"]["last"] else ""),
    ]
    for e in s["errors"]["recent"][-5:]:
        lines.append(f"  {e['source']}: {e['message']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from policy_agent.obs.server import fetch_status, status_socket_path

    target = args.url
    if not target:
        try:
            cfg = config_mod.from_args(args, require_node=False)
            target = status_socket_path(cfg.status_socket, cfg.netns)
        except (config_mod.ConfigError, ValueError) as exc:
            print(f"policy-agent status: {exc}", file=sys.stderr)
            return 2
    try:
        s = fetch_status(target, timeout=args.timeout)
    except (OSError, ValueError) as exc:
        hint = "" if args.url else " (as root on the node, or inside the agent's pod; --url for TCP)"
        print(f"policy-agent status: cannot reach the agent at {target}: {exc}{hint}", file=sys.stderr)
        return 3
    print(json.dumps(s, indent=2, sort_keys=True) if args.json else render(s))
    return 0 if s.get("ready") else 1
