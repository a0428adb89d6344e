"""Per-packet cost of pa-FORWARD orderings, on the compiler's real 10k ruleset.

Builds the node of bench/dataplane/run.py's per-packet run (the workload's packet pair
behind real veths, the full compiled ruleset applied by Dataplane), then alternates
modes, each switched in by one iptables-restore (order rotated every round):

  none      FORWARD starts with `-j ACCEPT`: none of our rules is evaluated
  ct_only   `--ctstate RELATED,ESTABLISHED -j ACCEPT` then `-j ACCEPT` first in FORWARD
  shipped   pa-FORWARD as the compiler renders it now
  <variant> pa-FORWARD with its pod-entry rules replaced (--variants, see VARIANTS)

Per sample: iperf3 TCP throughput (--seconds) and a bounded TCP connect loop (--conns).
Ratios are medians of per-round ratios against ct_only (same load within a round).

usage: python bench/dataplane/forward_variants.py [--backend nft|legacy] [--rounds 9]
           [--seconds 2] [--conns 1500] [--variants split,combined,no_antispoof] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import workload as w  # noqa: E402

from policy_agent import logs  # noqa: E402
from policy_agent.compiler import Compiler  # noqa: E402
from policy_agent.compiler.options import NodeConfig  # noqa: E402
from policy_agent.dataplane.kernel import binary  # noqa: E402
from policy_agent.lab import netns  # noqa: E402
from pairlab import pair_lab, sample  # noqa: E402
from policy_agent.shared.naming import CHAIN_FORWARD  # noqa: E402

AREA = "i13bfv"
BYPASS = "-m comment --comment bench-bypass -j ACCEPT"
CT_ONLY = "-m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment bench-ct-only -j ACCEPT"


def variants(wild: str, eset: str) -> dict[str, list[str]]:
    """Replacement pod-entry rules (the part of pa-FORWARD before the INVALID drops)."""
    est = "-m conntrack --ctstate RELATED,ESTABLISHED"
    ok = f"-m set --match-set {eset} src,src"
    bad = f"-m set ! --match-set {eset} src,src"
    return {
        # before this work: anti-spoofing drop, then the two established accepts
        "split": [f"-i {wild} {bad} -j DROP", f"-i {wild} {est} -j ACCEPT", f"-o {wild} {est} -j ACCEPT"],
        # one rule for an established packet from a pod with its own address
        "combined": [f"-i {wild} {est} {ok} -j ACCEPT", f"-i {wild} {bad} -j DROP", f"-o {wild} {est} -j ACCEPT"],
        # NOT safe (no anti-spoofing for established flows): what the set lookup costs
        "no_antispoof": [f"{est} -j ACCEPT", f"-i {wild} {bad} -j DROP"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--backend", choices=("nft", "legacy"), default="nft")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--conns", type=int, default=1500)
    ap.add_argument("--variants", default="split,combined,no_antispoof")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    logs.configure("console", "warning", stream=sys.stderr)
    namespaces, pods, pols = w.cluster(args.pods)
    d = Compiler(NodeConfig(w.NODE)).load(w.snapshot(namespaces, pods, pols)).desired()
    server, client = w.packet_pair(pods)
    eps = {(e.namespace, e.pod): e for e in d.endpoints}
    s_ep, c_ep = eps[server.key], eps[client.key]
    s_ip = str(server.ips[0])
    iperf_port, conn_port = w.PAIR_PORTS
    fwd = d.table(4)[CHAIN_FORWARD]
    shipped = fwd.render_lines()
    eset = next(m for r in fwd.rules if (m := r.match.src_iface_set))
    wild = next(r.match.in_iface for r in fwd.rules if r.match.in_iface)
    # the shipped chain's rules from the first INVALID drop on are kept by every variant
    tail_at = next(i for i, r in enumerate(fwd.rules) if "INVALID" in r.match.ctstate)
    alts = {k: v for k, v in variants(wild, eset).items() if k in args.variants.split(",")}
    modes = ["none", "ct_only", "shipped", *alts]
    restore = binary(args.backend, 4, "restore")
    res: dict[str, list[float]] = {f"{k}_{m}": [] for k in ("tput", "cps") for m in modes}
    with pair_lab(AREA, args.backend, d, s_ep, c_ep, conn_port, iperf_port) as (node, pc):

        def switch(mode: str) -> None:
            text = "*filter\n"
            lines = [f"-F {CHAIN_FORWARD}"]
            if mode in alts:
                lines += [f"-A {CHAIN_FORWARD} {x}" for x in alts[mode]] + shipped[tail_at:]
            else:
                lines += shipped
            netns.run(node, restore, "--noflush", input=text + "\n".join(lines) + "\nCOMMIT\n")
            # bypass rules for none / ct_only at the top of FORWARD
            save = netns.run(node, binary(args.backend, 4, "save")).stdout
            drop = [f"-D FORWARD {x}" for x in (CT_ONLY, BYPASS) if x.split("--comment ")[1].split()[0] in save]
            add = {"none": [BYPASS], "ct_only": [CT_ONLY, BYPASS]}.get(mode, [])
            ins = [f"-I FORWARD {i + 1} {x}" for i, x in enumerate(add)]
            if drop or ins:
                netns.run(node, restore, "--noflush", input="*filter\n" + "\n".join(drop + ins) + "\nCOMMIT\n")

        for mode in modes:  # every variant really enforces: allowed port open, other port closed
            switch(mode)
            if mode in ("shipped", *alts):
                ok = netns.probe(pc, s_ip, conn_port, "TCP", 2.0)
                denied = netns.probe(pc, s_ip, w.DENIED_PORT, "TCP", 1.0)
                if not ok or denied:
                    raise SystemExit(f"{mode}: not enforcing (allowed={ok}, denied port open={denied})")
        for r in range(args.rounds):
            k = r % len(modes)
            for mode in modes[k:] + modes[:k]:
                switch(mode)
                tput, cps = sample(pc, s_ip, iperf_port, conn_port, args.seconds, args.conns)
                res[f"tput_{mode}"].append(tput)
                res[f"cps_{mode}"].append(cps)

    def paired(k: str, a: str, b: str) -> dict:
        rs = [x / y for x, y in zip(res[f"{k}_{a}"], res[f"{k}_{b}"])]
        q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0]] * 3
        return {"median": round(statistics.median(rs), 3), "q1": round(q[0], 3), "q3": round(q[2], 3)}

    result = {
        "backend": args.backend, "rounds": args.rounds, "seconds": args.seconds, "conns": args.conns,
        "loadavg": [round(x, 2) for x in os.getloadavg()], "nproc": os.cpu_count(),
        "tcp_gbit_median": {m: round(statistics.median(res[f"tput_{m}"]) / 1e9, 2) for m in modes},
        "conn_per_s_median": {m: round(statistics.median(res[f"cps_{m}"])) for m in modes},
        "over_ct_only": {f"{k}_{m}": paired(k, m, "ct_only") for k in ("tput", "cps") for m in modes if m != "ct_only"},
        "over_none": {f"{k}_{m}": paired(k, m, "none") for k in ("tput", "cps") for m in modes if m != "none"},
        "variants": {k: alts[k] for k in alts},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
