"""How one small delta's restore grows with the ruleset already in the kernel.

The lower bound of an incremental apply was one `iptables-restore --noflush` per family
(and one `ipset restore` for member changes). This times exactly that process for a
delta the size of a policy add (a new 7-rule chain and one rule replaced in an existing
chain), against a filter table already holding N rules, for each backend; and, on nft,
the same delta fed to the agent's long-lived restore (runner.RestoreSession), done when
the kernel announces the commit (nftgen.py), alternating with the process. The N rules
are the compiler's real rules (10k workload), copied under new chain names to reach N.
Also times an `ipset restore` adding one member to a set of M members.

usage: python bench/dataplane/delta_floor.py [--sizes 0,2500,10000,40000] [--reps 7] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import workload as w  # noqa: E402

from policy_agent.compiler import Compiler  # noqa: E402
from policy_agent.compiler.options import NodeConfig  # noqa: E402
from policy_agent.dataplane.kernel import SystemKernel, binary, legacy_available  # noqa: E402
from policy_agent.dataplane.runner import Runner  # noqa: E402
from policy_agent.desired import render_ipset_restore  # noqa: E402
from policy_agent.lab import netns  # noqa: E402

AREA = "i13bdf"


def _leaf(c) -> bool:
    """A chain that jumps nowhere: its rules restore into any table."""
    return bool(c.rules) and all(r.action.chain_target is None for r in c.rules)


def filler(d, n: int) -> tuple[str, list[str]]:
    """Restore text holding ``n`` of the compiler's rules (chains renamed), and the names."""
    src = [c for _n, c in sorted(d.table(4).items()) if _leaf(c) and "set" in " ".join(c.render_lines())]
    out, names, k, rules = [], [], 0, 0
    while rules < n:
        c = src[k % len(src)]
        name = f"pa-pad-{k}"
        names.append(name)
        out.append(f":{name} - [0:0]")
        cut = len(f"-A {c.name} ")
        out += [f"-A {name} {ln[cut:]}" for ln in c.render_lines()]
        rules += len(c.rules)
        k += 1
    return "*filter\n" + "\n".join(out) + "\nCOMMIT\n", names


def delta(d, names: list[str], r: int) -> str:
    body: list[str] = []
    for _n, c in sorted(d.table(4).items()):  # 7 real rules (a policy add writes about that many)
        if _leaf(c):
            cut = len(f"-A {c.name} ")
            body += [ln[cut:] for ln in c.render_lines()]
        if len(body) >= 7:
            break
    body = body[:7]
    lines = [f":pa-delta-{r} - [0:0]", *(f"-A pa-delta-{r} {b}" for b in body)]
    if names:
        lines.append(f"-R {names[len(names) // 2]} 1 {body[0]}")
    return "*filter\n" + "\n".join(lines) + "\nCOMMIT\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0,2500,10000,40000")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    namespaces, pods, pols = w.cluster(10_000)
    d = Compiler(NodeConfig(w.NODE)).load(w.snapshot(namespaces, pods, pols)).desired()
    sets_text = render_ipset_restore(d)
    result: dict = {"nproc": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()], "reps": args.reps,
                    "iptables_restore_ms": {}, "ipset_add_one_ms": {}}
    backends = ["nft"] + (["legacy"] if legacy_available() else [])
    for backend in backends:
        restore = binary(backend, 4, "restore")
        per: dict = {}
        for n in (int(x) for x in args.sizes.split(",")):
            ns = netns.unique_name(AREA, f"{backend[0]}{n}")
            netns.create(ns)
            try:
                netns.run(ns, "ipset", "restore", input=sets_text)
                text, names = filler(d, n)
                if n:
                    netns.run(ns, restore, "--noflush", input=text, timeout=300)
                # A process per delta (what every apply started before), and (nft) the same
                # deltas fed to the agent's long-lived restore, done at the announced commit,
                # alternating so both see the same machine.
                kernel = SystemKernel(Runner(ns), backend)
                times: list[float] = []
                fed: list[float] = []
                for r in range(args.reps):
                    t0 = time.perf_counter()
                    kernel.runner.run([restore, "--noflush"], input=delta(d, names, 2 * r))
                    times.append(time.perf_counter() - t0)
                    if backend == "nft":
                        kernel.settle()
                        t0 = time.perf_counter()
                        kernel.iptables_restore_start(4, delta(d, names, 2 * r + 1)).wait()
                        fed.append(time.perf_counter() - t0)
                        kernel.settle()  # what the agent does after reporting the commit
                kernel.close()
                rules = sum(1 for ln in netns.run(ns, binary(backend, 4, "save")).stdout.splitlines()
                            if ln.startswith("-A"))
                per[str(n)] = {"median_ms": round(1000 * statistics.median(times), 1),
                               "min_ms": round(1000 * min(times), 1), "rules_in_kernel": rules}
                if fed:
                    per[str(n)]["long_lived_median_ms"] = round(1000 * statistics.median(fed), 2)
                    per[str(n)]["long_lived_max_ms"] = round(1000 * max(fed), 2)
            finally:
                netns.delete(ns)
        result["iptables_restore_ms"][backend] = per
    # ipset: one member added to a set of M members (ipset restore never reads sets back)
    for m in (100, 10_000, 100_000):
        ns = netns.unique_name(AREA, f"s{m}")
        netns.create(ns)
        try:
            netns.run(ns, "ipset", "restore",
                      input="create pa4s-big hash:net family inet maxelem 1048576\n"
                      + "".join(f"add pa4s-big 10.{234 + i // 65536}.{(i // 256) % 256}.{i % 256}\n" for i in range(m)))
            times = []
            for r in range(args.reps):
                t0 = time.perf_counter()
                netns.run(ns, "ipset", "restore", input=f"add pa4s-big 10.250.0.{r + 1}\n")
                times.append(time.perf_counter() - t0)
            result["ipset_add_one_ms"][str(m)] = round(1000 * statistics.median(times), 1)
        finally:
            netns.delete(ns)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
