"""`policy-agent explain`: why a flow is allowed or denied on a node.

With files: reads Kubernetes YAML like `render`, compiles the desired state for
--node and walks one NEW packet through it, printing the verdict, a two-sentence
summary and the trace of rules hit.

Without files (live, on the node): asks the agent running here (its root-only
Unix socket, as `status`; give --netns as the agent has it). The agent answers
from the state it last applied AND the kernel now: the kernel's verdict, the
trace with each rule's live packet/byte counters, and drift between the kernel
and its desired state for every chain and set on the path. With no agent
answering, the kernel alone answers (our chains, sets and the dataplane state
file), marked "agent not running: answered from the kernel alone"; then --from
and --to name local pods (NS/POD) or addresses.

Exit status: 0 allowed, 1 denied, 2 bad input, 3 no answer (no agent, and the
kernel could not be read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import structlog

from policy_agent import config as config_mod
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
    p.add_argument("--node", default=None, help="node whose ruleset is evaluated (with files; required there)")
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
    p.add_argument("--fallbacks", action="store_true",
                   help="with --keep-going: enforce the stand-ins the agent uses for unparseable "
                   "NetworkPolicies and ClusterNetworkPolicies")
    p.add_argument("--ignore-unknown", action="store_true", help="skip kinds other than Namespace, Pod, NetworkPolicy")
    p.add_argument("--json", action="store_true", help="live: print the agent's JSON answer")
    p.add_argument("--timeout", type=float, default=10.0, help="live: seconds to wait for the agent")
    p.add_argument("--kernel-only", action="store_true", help="live: do not ask the agent, read the kernel alone")
    config_mod.add_arguments(p, only=("netns", "status_socket", "iptables_backend", "state_file", "ipv6"))
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="YAML/JSON files or directories; none: ask the agent on this node (live)")
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


def load_snapshot(paths: list[str], keep_going: bool, ignore_unknown: bool, err=None,
                  fallbacks: bool = False) -> ClusterSnapshot | None:
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
            objs, errors = load_yaml_keep_going(text, str(f), ignore_unknown=ignore_unknown, fallbacks=fallbacks)
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

    if not args.paths:
        return run_live(args, out, err)
    if not args.node:
        print("error: --node is required with files (without files the agent on this node answers)", file=err)
        return 2
    snapshot = load_snapshot(args.paths, args.keep_going, args.ignore_unknown, err, getattr(args, "fallbacks", False))
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


def _ask_agent(target: str, params: list[tuple[str, str]], timeout: float) -> tuple[int, dict] | None:
    """The agent's /explain answer, or None when no agent answers on ``target``."""
    import json
    from urllib.parse import urlencode

    from policy_agent.obs.server import get

    try:
        code, body = get(target, "/explain?" + urlencode(params), timeout)
    except OSError as exc:
        log.debug("explain_agent_unreachable", target=target, error=str(exc))
        return None
    try:
        return code, json.loads(body.decode())
    except ValueError:
        # An agent from before /explain answers 404 in text: treat it as not answering.
        log.warning("explain_agent_answer_unreadable", target=target, status=code)
        return None


def run_live(args, out, err) -> int:
    import json

    from policy_agent.explain import ExplainError
    from policy_agent.live_explain import FlowQuery, answer, read_kernel, render_text

    try:
        cfg = config_mod.from_args(args, require_node=False)
        query = FlowQuery(args.src, args.dst, args.protocol, args.port, args.family, tuple(args.node_ip))
    except (config_mod.ConfigError, ExplainError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    from policy_agent.obs.server import status_socket_path

    doc = None
    if not args.kernel_only:
        try:
            target = status_socket_path(cfg.status_socket, cfg.netns)
        except ValueError as exc:
            print(f"error: {exc}", file=err)
            return 2
        params = [("from", query.src), ("to", query.dst), ("protocol", query.protocol)]
        params += [("port", str(query.port))] if query.port is not None else []
        params += [("family", str(query.family))] if query.family else []
        params += [("node_ip", a) for a in query.node_ips]
        got = _ask_agent(target, params, args.timeout)
        if got is not None:
            code, body = got
            if code != 200 or "answers" not in body:
                print(f"error: the agent at {target} answered {code}: {body.get('error', body)}", file=err)
                return 2 if code == 400 else 3
            doc = body["answers"][0]
            if "error" in doc:
                print(f"error: {doc['error']}", file=err)
                return 2
    if doc is None:
        from policy_agent.dataplane.apply import default_state_path
        from policy_agent.dataplane.backend import detect_backend
        from policy_agent.dataplane.kernel import SystemKernel
        from policy_agent.dataplane.runner import CommandError, Runner

        runner = Runner(cfg.netns or None)
        try:
            kernel = SystemKernel(runner, detect_backend(runner, cfg.iptables_backend))
            view = read_kernel(kernel, (4, 6) if cfg.ipv6 else (4,),
                               cfg.state_file or default_state_path(cfg.netns or None))
        except (CommandError, OSError, ValueError) as exc:
            print(f"error: no agent answered and the kernel could not be read: {exc}", file=err)
            return 3
        doc = answer(view, [query])["answers"][0]
        if "error" in doc:
            print(f"error: {doc['error']} (answered from the kernel alone: no agent running)", file=err)
            return 2
    if args.json:
        out.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    else:
        out.write(render_text(doc))
    return 0 if doc["allowed"] else 1
