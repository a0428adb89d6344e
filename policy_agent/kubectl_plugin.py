#!/usr/bin/env python3
"""`kubectl policy-agent`: run a `policy-agent` command inside the agent pod on a node.

    kubectl policy-agent --node NODE explain --from x/a --to y/b --port 80
    kubectl policy-agent --node NODE status | dump | flows [ARGS...]

Installed as the executable ``kubectl-policy_agent`` (kubectl maps ``policy-agent`` to it).
It finds the agent pod on NODE the way an operator would:

    kubectl get pods -n policy-agent-system -l app.kubernetes.io/name=policy-agent \\
        --field-selector spec.nodeName=NODE -o json

and then replaces itself with

    kubectl exec -n policy-agent-system POD -c policy-agent -- policy-agent COMMAND ARGS...

kubectl's connection flags given before the command (--kubeconfig, --context, --cluster,
--user, --request-timeout) are passed to both calls; KUBECONFIG is honoured by kubectl
itself. ``--print-command`` prints the exec argv (JSON) instead of running it.
Stdlib only: it starts in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

NAMESPACE = "policy-agent-system"
SELECTOR = "app.kubernetes.io/name=policy-agent"  # the DaemonSet's selector (manifests/30-daemonset.yaml)
CONTAINER = "policy-agent"
COMMANDS = ("explain", "flows", "dump", "status")
PASSTHROUGH = ("kubeconfig", "context", "cluster", "user", "request_timeout")


class PluginError(RuntimeError):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubectl policy-agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", required=True, help="node whose agent runs the command (spec.nodeName)")
    p.add_argument("-n", "--namespace", default=NAMESPACE, help=f"the agent's namespace (default {NAMESPACE})")
    p.add_argument("-l", "--selector", default=SELECTOR, help=f"the agent pods' labels (default {SELECTOR})")
    p.add_argument("-c", "--container", default=CONTAINER, help=f"the agent container (default {CONTAINER})")
    p.add_argument("--kubectl", default="kubectl", help="kubectl binary (default: kubectl on PATH)")
    for name in PASSTHROUGH:
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=argparse.SUPPRESS)
    p.add_argument("--print-command", action="store_true", help="print the kubectl exec argv as JSON, do not run it")
    p.add_argument("command", choices=COMMANDS, help="policy-agent subcommand to run in the agent pod")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments, passed as they are")
    return p


def _global_flags(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for name in PASSTHROUGH:
        v = getattr(args, name)
        if v is not None:
            out.append(f"--{name.replace('_', '-')}={v}")
    return out


def find_pod(args: argparse.Namespace) -> str:
    """The Running agent pod on args.node (the newest if a rollout left two)."""
    argv = [args.kubectl, *_global_flags(args), "get", "pods", "-n", args.namespace, "-l", args.selector,
            "--field-selector", f"spec.nodeName={args.node}", "-o", "json"]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        raise PluginError(f"{' '.join(argv)} failed: {p.stderr.strip()}")
    try:
        items = json.loads(p.stdout).get("items") or []
    except ValueError as exc:
        raise PluginError(f"kubectl get pods printed no JSON: {exc}") from None
    if not items:
        raise PluginError(f"no policy-agent pod on node {args.node!r} (namespace {args.namespace}, "
                          f"selector {args.selector}): is the node name right and the DaemonSet scheduled there?")
    running = [i for i in items if (i.get("status") or {}).get("phase") == "Running"
               and not (i.get("metadata") or {}).get("deletionTimestamp")]
    if not running:
        phases = ", ".join(f"{i['metadata']['name']}: {(i.get('status') or {}).get('phase', '?')}" for i in items)
        raise PluginError(f"the policy-agent pod on node {args.node!r} is not running ({phases})")
    running.sort(key=lambda i: i["metadata"].get("creationTimestamp") or "")
    return running[-1]["metadata"]["name"]


def exec_argv(args: argparse.Namespace, pod: str) -> list[str]:
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    tty = ["-t"] if args.command == "flows" and "--follow" in rest and sys.stdout.isatty() else []
    return [args.kubectl, *_global_flags(args), "exec", "-n", args.namespace, pod, "-c", args.container, *tty,
            "--", "policy-agent", args.command, *rest]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if os.sep not in args.kubectl and shutil.which(args.kubectl) is None:
        print(f"kubectl policy-agent: {args.kubectl!r} not found on PATH", file=sys.stderr)
        return 2
    try:
        pod = find_pod(args)
    except PluginError as exc:
        print(f"kubectl policy-agent: {exc}", file=sys.stderr)
        return 2
    cmd = exec_argv(args, pod)
    if args.print_command:
        print(json.dumps(cmd))
        return 0
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)  # the command's exit status (explain: 0 allowed, 1 denied) is ours
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
