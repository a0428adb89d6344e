"""`policy-agent explain`: why a flow is allowed or denied on a node, from YAML input.

Reads Kubernetes YAML like `render`, compiles the desired state for --node and
walks one NEW packet through it, printing the verdict, a two-sentence summary
and the trace of rules hit. Exit status: 0 allowed, 1 denied, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import structlog

from policy_agent.model import ClusterSnapshot, ModelError, load_yaml, load_yaml_keep_going

log = structlog.get_logger(__name__)

_SUFFIXES = (".yaml", ".yml", ".json")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain",
        help="explain why a flow is allowed or denied on a node",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--node", required=True, help="node whose ruleset is evaluated")
    p.add_argument("--from", dest="src", required=True, metavar="NS/POD|IP|node", help="source")
    p.add_argument("--to", dest="dst", required=True, metavar="NS/POD|IP|node", help="destination")
    p.add_argument("--port", type=int, default=None, help="destination port")
    p.add_argument("--protocol", default="TCP", type=str.upper, choices=("TCP", "UDP", "SCTP"))
    p.add_argument(
        "--family", type=int, choices=(4, 6), default=None, help="address family (default: IPv4 if both ends have it)"
    )
    p.add_argument(
        "--node-ip",
        action="append",
        default=[],
        metavar="IP",
        help="an address of the node (for 'node' and addrtype LOCAL); repeatable",
    )
    p.add_argument("--iface-prefix", default=None, help="host veth prefix (default: eni)")
    p.add_argument("--keep-going", action="store_true", help="skip invalid objects instead of failing")
    p.add_argument("--ignore-unknown", action="store_true", help="skip kinds other than Namespace, Pod, NetworkPolicy")
    p.add_argument("paths", nargs="+", metavar="PATH", help="YAML/JSON files or directories")
    p.set_defaults(func=run)


def _files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in _SUFFIXES)
        else:
            out.append(path)
    return out


def load_snapshot(paths: list[str], keep_going: bool, ignore_unknown: bool, err=None) -> ClusterSnapshot | None:
    """Read every file into one snapshot; print errors; None when input is unusable."""
    err = err or sys.stderr
    objects: list = []
    failed = False
    for f in _files(paths):
        try:
            text = f.read_text()
        except OSError as exc:
            print(f"error: cannot read {f}: {exc.strerror}", file=err)
            return None
        if keep_going:
            objs, errors = load_yaml_keep_going(text, str(f), ignore_unknown=ignore_unknown)
            for e in errors:
                print(f"error: {e}", file=err)
            failed = failed or bool(errors)
            objects += objs
        else:
            try:
                objects += load_yaml(text, str(f), ignore_unknown=ignore_unknown)
            except ModelError as exc:
                print(f"error: {exc}", file=err)
                return None
    if failed:
        log.warning("explain_input_errors_skipped")
    return ClusterSnapshot.of(objects)


def run(args, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    from policy_agent.compiler.options import NodeConfig
    from policy_agent.explain import ExplainError, explain_flow

    snapshot = load_snapshot(args.paths, args.keep_going, args.ignore_unknown, err)
    if snapshot is None:
        return 2
    try:
        kw = {"iface_prefix": args.iface_prefix} if args.iface_prefix else {}
        node = NodeConfig(node_name=args.node, **kw)
        result = explain_flow(
            snapshot, node, args.src, args.dst, args.protocol, args.port, node_ips=args.node_ip, family=args.family
        )
    except (ExplainError, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    out.write(result.render())
    return 0 if result.allowed else 1
