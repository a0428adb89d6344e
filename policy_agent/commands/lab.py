"""`policy-agent lab`: a local cluster in network namespaces (see policy_agent/lab/lab.py).

  lab up --spec FILE [--name NAME] [--no-agent] [--provider static|ec2]
  lab apply -f FILE... / lab delete -f FILE...
  lab probe [--port P] [--protocol TCP|UDP] [--from NS/POD] [--to NS/POD|IP] [--json]
  lab status [--json]
  lab down [--name NAME]
  lab list
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(sub) -> None:
    p = sub.add_parser("lab", help="a local cluster in network namespaces (needs root)",
                       description="A local cluster in network namespaces: pods wired by the real vpcip-cni, "
                                   "TCP/UDP servers in each pod, the agent enforcing NetworkPolicies.")
    lsub = p.add_subparsers(dest="lab_command", metavar="SUBCOMMAND")
    lsub.required = True

    def common(sp):
        sp.add_argument("--name", default="default", help="which lab (default: default)")
        return sp

    up = common(lsub.add_parser("up", help="create the lab from Namespaces and Pods"))
    up.add_argument("--spec", required=True,
                    help="Kubernetes YAML with Namespaces and Pods (NetworkPolicies optional); a pod whose "
                         "spec.nodeName names another node than lab-NAME is a remote peer")
    up.add_argument("--no-agent", action="store_true", help="do not start the agent (everything stays open)")
    up.add_argument("--apiserver", action="store_true", help="watch a real kube-apiserver inside the lab")
    up.add_argument("--provider", choices=("static", "ec2"), default="static",
                    help="where vpcip-ipamd gets ENIs and addresses: a pool file (static) or an EC2 EMULATOR "
                         "(moto + IMDSv2 in the node netns; never AWS; needs the test extra)")
    up.add_argument("--timeout", type=float, default=180.0)
    up.set_defaults(func=cmd_up)

    for verb in ("apply", "delete"):
        sp = common(lsub.add_parser(verb, help=f"{verb} NetworkPolicies, Pods, Namespaces; returns when enforced"))
        sp.add_argument("-f", "--filename", dest="files", action="append", required=True, help="YAML file (repeatable)")
        sp.add_argument("--timeout", type=float, default=60.0)
        sp.set_defaults(func=cmd_apply if verb == "apply" else cmd_delete)

    pr = common(lsub.add_parser("probe", help="real connections between the lab's pods, in parallel"))
    pr.add_argument("--port", type=int, default=80)
    pr.add_argument("--protocol", default="TCP", type=str.upper, choices=("TCP", "UDP"))
    pr.add_argument("--from", dest="src", help="NS/POD (default: every pod)")
    pr.add_argument("--to", dest="dst", help="NS/POD or IP (default: every pod)")
    pr.add_argument("--timeout", type=float, default=1.0, help="seconds per attempt")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_probe)

    st = common(lsub.add_parser("status", help="namespaces, pods, IPs, interfaces, agent sync"))
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    dn = common(lsub.add_parser("down", help="remove everything the lab created (also after a crash)"))
    dn.set_defaults(func=cmd_down)

    ls = lsub.add_parser("list", help="labs that exist (state or namespaces)")
    ls.set_defaults(func=cmd_list)

    kc = common(lsub.add_parser("kubectl", help="kubectl against the lab's apiserver (lab up --apiserver)"))
    kc.add_argument("args", nargs=argparse.REMAINDER)
    kc.set_defaults(func=cmd_kubectl)


def _fail(msg: str) -> int:
    print(f"policy-agent lab: {msg}", file=sys.stderr)
    return 1


def _root() -> str | None:
    if os.geteuid() != 0:
        return "needs root (it creates network namespaces)"
    return None


def cmd_up(args) -> int:
    from policy_agent.lab import lab as L

    if (err := _root()):
        return _fail(err)
    try:
        docs = L.load_docs([args.spec])
        lab = L.Lab(args.name)
        lab.up(docs, agent=not args.no_agent, timeout=args.timeout, apiserver=args.apiserver,
               provider=args.provider)
    except L.LabError as exc:
        return _fail(str(exc))
    st = lab.status()
    print(f"lab {lab.name} up: node netns {lab.node_netns}, {len(st['pods'])} pods, "
          f"agent {'in sync' if st['in_sync'] else ('not started' if args.no_agent else 'NOT in sync')}")
    if lab.apiserver:
        print(f"kube-apiserver {lab.apiserver['server']}: `policy-agent lab kubectl --name {lab.name} get pods -A`")
    return 0


def _change(args, verb: str) -> int:
    from policy_agent.lab import lab as L

    if (err := _root()):
        return _fail(err)
    try:
        lab = L.Lab.load(args.name)
        docs = L.load_docs(args.files)
        keys = lab.apply(docs, args.timeout) if verb == "apply" else lab.delete(docs, args.timeout)
    except L.LabError as exc:
        return _fail(str(exc))
    done = "configured" if verb == "apply" else "deleted"
    for d in docs:
        k = L.obj_key(d)
        print(f"{k} {done if k in keys else 'unchanged'}")
    return 0


def cmd_apply(args) -> int:
    return _change(args, "apply")


def cmd_delete(args) -> int:
    return _change(args, "delete")


def cmd_probe(args) -> int:
    from policy_agent.lab import lab as L

    if (err := _root()):
        return _fail(err)
    try:
        lab = L.Lab.load(args.name)
        results = lab.probe(args.port, args.protocol, args.src, args.dst, timeout=args.timeout)
    except L.LabError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps({"port": args.port, "protocol": args.protocol, "results": results}))
    else:
        print(L.format_matrix(results, args.port, args.protocol))
    return 0


def cmd_status(args) -> int:
    from policy_agent.lab import lab as L

    try:
        lab = L.Lab.load(args.name)
        st = lab.status()
    except L.LabError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps({"node_netns": st["node_netns"], "in_sync": st["in_sync"], "pods": st["pods"],
                          "name": st["name"], "node": st["node"]}))
        return 0
    print(f"lab {st['name']}: node {st['node']}, node netns {st['node_netns']}, agent in sync: "
          f"{'yes' if st['in_sync'] else 'no'}")
    rows = [("POD", "IPS", "INTERFACE", "NETNS", "NODE")]
    rows += [(f"{p['namespace']}/{p['name']}", ",".join(p["ips"]), p["interface"], p["netns"], p["node"])
             for p in st["pods"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_down(args) -> int:
    from policy_agent.lab import lab as L

    if (err := _root()):
        return _fail(err)
    try:
        removed = L.down(args.name)
    except L.LabError as exc:
        return _fail(str(exc))
    print(f"lab {args.name} down ({len(removed)} network namespaces removed)")
    return 0


def cmd_list(args) -> int:
    from policy_agent.lab import lab as L

    for name in L.list_labs():
        print(name)
    return 0


def cmd_kubectl(args) -> int:
    from policy_agent.lab import lab as L

    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    try:
        return L.Lab.load(args.name).kubectl(rest)
    except L.LabError as exc:
        return _fail(str(exc))
