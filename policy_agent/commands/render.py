"""`policy-agent render`: Kubernetes YAML -> the desired ruleset for one node, as text.

Reads files and directories (recursively: *.yaml, *.yml, *.json; "-" = stdin),
compiles for --node and prints, deterministically, with section headers:
the local endpoints, iptables-save text for IPv4 and IPv6 and ipset-restore text.

Exit status: 0 rendered; 2 an object (or file) is invalid and nothing was
rendered (the message names file, object and field); with --keep-going the
valid objects are rendered anyway, every error is listed on stderr and the
status is 1 (a partial render is output, not a usage error). Kinds other than
Namespace, Pod, NetworkPolicy, ClusterNetworkPolicy and Node (Deployments,
Services, ...) are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable

import structlog

from policy_agent.compiler import compile
from policy_agent.compiler.options import DEFAULT_MARK_MASK, ENDPOINT_TO_HOST_ACTIONS, FlowLogOptions, NodeConfig
from policy_agent.desired import DesiredState, render_ipset_restore, render_iptables_save
from policy_agent.model.parse import describe_cnp_fallback, load_yaml, load_yaml_keep_going
from policy_agent.model.types import ClusterSnapshot, ModelError, Pod
from policy_agent.shared.naming import DEFAULT_IFACE_PREFIX

log = structlog.get_logger(__name__)

_SUFFIXES = (".yaml", ".yml", ".json")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "render",
        help="print the iptables/ipset ruleset for one node from Kubernetes YAML",
        description="Compile Namespaces, Pods and NetworkPolicies (YAML/JSON files or directories) "
        "into the desired iptables and ipset state of one node and print it.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="YAML/JSON file or directory ('-' = stdin)")
    p.add_argument("--node", required=True, help="node name (pods with spec.nodeName == NODE are local)")
    p.add_argument("--iface-prefix", default=DEFAULT_IFACE_PREFIX, help="host veth prefix (default eni)")
    p.add_argument("--keep-going", action="store_true", help="render the valid objects despite invalid ones (exit 1)")
    p.add_argument("--fallbacks", action="store_true",
                   help="with --keep-going: also render the stand-ins the agent enforces for unparseable "
                   "NetworkPolicies and ClusterNetworkPolicies (docs/decisions/policy-fallback.md, cnp-fallback.md)")
    p.add_argument("--mark-mask", type=lambda s: int(s, 0), default=DEFAULT_MARK_MASK, help="mark bits we may use")
    p.add_argument("--deny-action", choices=("DROP", "REJECT"), default="DROP")
    p.add_argument("--endpoint-to-host-action", choices=ENDPOINT_TO_HOST_ACTIONS, default="RETURN")
    p.add_argument("--no-ipv6", action="store_true", help="render IPv4 only")
    p.add_argument("--flow-log", action=argparse.BooleanOptionalAction, default=True,
                   help="NFLOG rules for denied new connections, as the agent writes them by default")
    p.add_argument("--flow-log-allowed", action="store_true", help="NFLOG rules for allowed new connections too")
    p.set_defaults(func=run)


def _files(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for path in paths:
        if path != "-" and os.path.isdir(path):
            found = []
            for root, dirs, files in os.walk(path):
                dirs.sort()
                found += [os.path.join(root, f) for f in files if f.endswith(_SUFFIXES)]
            out += sorted(found)
        else:
            out.append(path)
    return out


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def load(paths: Iterable[str], keep_going: bool, fallbacks: bool = False) -> tuple[list, list[str]]:
    """(objects, error messages). Without keep_going the first error raises."""
    objects: list = []
    errors: list[str] = []
    for path in _files(paths):
        try:
            text = _read(path)
        except OSError as exc:
            if not keep_going:
                raise
            errors.append(f"{path}: {exc.strerror or exc}")
            continue
        if keep_going:
            objs, errs = load_yaml_keep_going(text, path, ignore_unknown=True, fallbacks=fallbacks)
            errors += [str(e) for e in errs]
        else:
            objs = load_yaml(text, path, ignore_unknown=True)
        objects += objs
    return objects, errors


def render_text(state: DesiredState, node: NodeConfig, snapshot: ClusterSnapshot) -> str:
    """The whole dump, deterministic."""
    local = sum(1 for p in snapshot.pods.values() if isinstance(p, Pod) and p.node_name == node.node_name)
    out = [
        f"# policy-agent render: node {node.node_name}, iface prefix {node.iface_prefix}, "
        f"{len(snapshot.namespaces)} namespaces, {len(snapshot.pods)} pods ({local} on this node), "
        f"{len(snapshot.policies)} network policies"
        + (
            f", {len(snapshot.cluster_policies)} cluster network policies, {len(snapshot.nodes)} nodes"
            if snapshot.cluster_policies or snapshot.nodes
            else ""
        ),
        "",
        "# ==== local endpoints ====",
    ]
    for ep in state.endpoints:
        out.append(
            f"# {ep.namespace}/{ep.pod} {ep.interface} ips={','.join(ep.ips) or '-'} "
            f"ingress={','.join(ep.ingress_policies) or '-'} egress={','.join(ep.egress_policies) or '-'}"
        )
    if snapshot.cluster_policies:
        # Evaluation order of the tiers around NetworkPolicy (admin first, baseline last).
        out += ["", "# ==== cluster network policies (evaluation order) ===="]
        for c in sorted(snapshot.cluster_policies.values(), key=lambda c: (c.tier.value != "Admin", c.priority, c.name)):
            out.append(
                f"# {c.tier.value.lower()} tier priority {c.priority} {c.name}: subject namespaces "
                f"{c.subject_namespaces.canonical()} pods {c.subject_pods.canonical()}, "
                f"{len(c.ingress)} ingress rules, {len(c.egress)} egress rules"
                + (f"; STAND-IN for an unparseable policy ({describe_cnp_fallback(c)}): {c.fallback_reason}"
                   if c.fallback_reason else "")
            )
    families = [4, 6] if node.ipv6 else [4]
    for family in families:
        out += ["", f"# ==== {'iptables' if family == 4 else 'ip6tables'} (IPv{family}) ===="]
        out.append(render_iptables_save(state, family).rstrip("\n"))
    out += ["", "# ==== ipset ===="]
    sets = render_ipset_restore(state).rstrip("\n")
    if sets:
        out.append(sets)
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    try:
        node = NodeConfig(
            node_name=args.node,
            iface_prefix=args.iface_prefix,
            mark_mask=args.mark_mask,
            deny_action=args.deny_action,
            endpoint_to_host_action=args.endpoint_to_host_action,
            ipv6=not args.no_ipv6,
            flow_log=FlowLogOptions(deny=args.flow_log, allow=args.flow_log_allowed)
            if (args.flow_log or args.flow_log_allowed) else None,
        )
    except ValueError as exc:
        print(f"policy-agent render: {exc}", file=sys.stderr)
        return 2
    try:
        objects, errors = load(args.paths, args.keep_going, getattr(args, "fallbacks", False))
    except ModelError as exc:
        print(f"policy-agent render: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"policy-agent render: {exc}", file=sys.stderr)
        return 2
    for e in errors:
        print(f"policy-agent render: {e}", file=sys.stderr)
    snapshot = ClusterSnapshot.of(objects)
    state = compile(snapshot, node)
    sys.stdout.write(render_text(state, node, snapshot))
    log.debug("rendered", node=node.node_name, objects=len(objects), errors=len(errors))
    return 1 if errors else 0
