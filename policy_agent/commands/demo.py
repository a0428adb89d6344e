"""`policy-agent demo`: the x/y/z lab, a matrix before and after two policies, the rules for one pod.

Needs root. Uses examples/demo/ (cluster.yaml, default-deny.yaml, allow-y-to-x-a.yaml) and
tears the lab down at the end, also on failure or Ctrl-C (unless --keep).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples", "demo")
POLICIES = ("default-deny.yaml", "allow-y-to-x-a.yaml")
FOCUS_POD = "x/a"


def register(sub) -> None:
    p = sub.add_parser("demo", help="bring up the x/y/z lab, apply example policies, show what changed (root)")
    p.add_argument("--name", default="demo", help="lab name (default: demo)")
    p.add_argument("--examples", default=EXAMPLES, help="directory with cluster.yaml and the example policies")
    p.add_argument("--keep", action="store_true", help="leave the lab up at the end (`policy-agent lab down --name demo`)")
    p.set_defaults(func=run)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _pod_rules(lab, ref: str) -> str:
    """The kernel's rules for one pod: its ingress/egress chains, the policy chains they jump to,
    and the ipsets those use (from `policy-agent dump --netns`)."""
    from policy_agent.shared.naming import from_workload_chain, to_workload_chain

    iface = lab.pods[ref].interface
    proc = subprocess.run([sys.executable, "-m", "policy_agent.cli", "--log-level", "error", "dump",
                           "--netns", lab.node_netns], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return f"(policy-agent dump failed: {proc.stderr.strip()})"
    lines = proc.stdout.splitlines()
    chains = {to_workload_chain(iface), from_workload_chain(iface)}
    for ln in lines:  # policy chains the pod's chains jump to
        parts = ln.split()
        if "-A" in parts and parts[parts.index("-A") + 1] in chains and "-j" in parts:
            target = parts[parts.index("-j") + 1]
            if target.startswith(("pa-pi-", "pa-po-")):
                chains.add(target)
    out, sets = [], set()
    for ln in lines:
        parts = ln.split()
        if "-A" in parts and parts[parts.index("-A") + 1] in chains:
            out.append(ln.split("    # ")[0] if "    # " in ln else ln)
            if "--match-set" in parts:
                sets.add(parts[parts.index("--match-set") + 1])
    section, current = None, None
    for ln in lines:
        if ln.startswith("# "):
            section, current = ln, None
            continue
        if section == "# ipsets":
            if not ln.startswith(" "):
                current = ln.split(" ", 1)[0]
            if current in sets:
                out.append(ln)
    return "\n".join(out)


def run(args) -> int:
    from policy_agent.lab import lab as L

    if os.geteuid() != 0:
        print("policy-agent demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    spec = os.path.join(args.examples, "cluster.yaml")
    policies = [os.path.join(args.examples, p) for p in POLICIES]
    t0 = time.monotonic()
    lab = L.Lab(args.name)
    try:
        L.down(args.name)  # a leftover of an earlier, interrupted demo
        _say(f"== 1. Lab up: namespaces x, y, z with pods a, b, c, wired by vpcip-cni, the agent enforcing "
             f"(lab '{args.name}')")
        lab.up(L.load_docs([spec]))
        for p in lab.status()["pods"]:
            _say(f"   {p['namespace']}/{p['name']:<2} {','.join(p['ips']):<14} {p['interface']:<15} {p['netns']}")
        _say("")
        _say("== 2. Reachability before any policy (real TCP connections from inside each pod):")
        before = lab.probe(80, "TCP")
        _say(L.format_matrix(before, 80, "TCP"))
        _say("")
        _say("== 3. Apply " + " and ".join(os.path.relpath(p) for p in policies) + ":")
        for p in policies:
            with open(p) as f:
                _say("".join("   " + ln for ln in f if not ln.startswith("#")).rstrip())
            _say("   ---")
        t = time.monotonic()
        lab.apply(L.load_docs(policies))
        _say(f"   enforced in {time.monotonic() - t:.2f}s")
        _say("")
        _say("== 4. Reachability after:")
        after = lab.probe(80, "TCP")
        _say(L.format_matrix(after, 80, "TCP"))
        _say("")
        _say(f"== 5. The rules the kernel now holds for pod {FOCUS_POD} "
             f"(interface {lab.pods[FOCUS_POD].interface}; `policy-agent dump --netns {lab.node_netns}`):")
        _say(_pod_rules(lab, FOCUS_POD))
        _say("")
        was = {(r["from"], r["to"]): r["connected"] for r in before}
        now = {(r["from"], r["to"]): r["connected"] for r in after}
        lost = sorted(k for k in now if was.get(k) and not now[k])
        kept_to_a = sorted(f for (f, t), ok in now.items() if t == FOCUS_POD and ok and f != FOCUS_POD)
        _say("== 6. What changed:")
        _say(f"   The default-deny policy isolated every pod in namespace x for ingress, so {len(lost)} of the "
             f"{sum(1 for v in was.values() if v)} connections that worked before are now dropped by the pods' "
             f"ingress chains (only replies of established flows and what a policy allows get in).")
        _say(f"   The allow policy adds one exception: pod x/a accepts TCP 80 from namespace y "
             f"({', '.join(kept_to_a) or 'nobody'} can still reach it), while pods outside x are not affected at all.")
        _say("")
        _say(f"demo finished in {time.monotonic() - t0:.1f}s")
        return 0
    except L.LabError as exc:
        print(f"policy-agent demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            _say(f"lab '{args.name}' left up: `policy-agent lab probe --name {args.name}`, "
                 f"`policy-agent lab down --name {args.name}`")
        else:
            L.down(args.name)
            _say(f"lab '{args.name}' torn down")
