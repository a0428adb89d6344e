"""First apply of a fresh process into an empty node: the apply path before and after
the from-empty work of issue 13, and the raw restore, side by side in one run.

"before" is a copy of this tree's policy_agent with each from-empty optimisation
switched off by a checked source patch (PATCHES: automatic GC during the apply,
the streamed ipset restore, bulk member canonicalisation, concurrent read-back saves,
one rendering per rule); "after" is the tree as it is. Each sample is a new Python
process (imports and backend detection excluded from the timing, as in run.py) that
unpickles the compiler's real output and applies it into a fresh node namespace; the
raw sample is `ipset restore` + `iptables-restore --noflush` v4 and v6 of the very text
the state renders to, run one after the other from this process (setns, no `ip netns
exec`) into a fresh namespace. Order rotated every round; medians and per-round ratios.

usage: python bench/dataplane/apply_before_after.py [--pods 10000] [--backend nft|legacy]
           [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import workload as w  # noqa: E402

from policy_agent.compiler import Compiler  # noqa: E402
from policy_agent.compiler.options import NodeConfig  # noqa: E402
from policy_agent.dataplane.kernel import binary  # noqa: E402
from policy_agent.dataplane.runner import Runner  # noqa: E402
from policy_agent.desired import render_ipset_restore, render_iptables_save  # noqa: E402
from policy_agent.lab import netns  # noqa: E402

AREA = "i13bba"
# The timed child is run.py's, so both benches time an apply the same way.
from run import CHILD_APPLY as CHILD  # noqa: E402

# (file, old, new): each must apply exactly once, or the "before" copy is not what it claims.
PATCHES = [
    ("dataplane/apply.py", "    was = gc.isenabled()\n    gc.disable()\n", "    was = False\n"),
    ("dataplane/apply.py", 'self._open = getattr(kernel, "ipset_restore_stream", None)', "self._open = None"),
    ("dataplane/apply.py", 'start = getattr(k, "iptables_save_start", None)', "start = None"),
    ("dataplane/ipsets.py", '        if s.type == "hash:net" and members:', '        if False:'),
    ("dataplane/ipsets.py", '        if s.type == "hash:ip,port" and members and', '        if False and'),
    ("desired.py", "        return list(self._rendered[1])",
     "        return [f'-A {self.name} -m comment --comment \"{RULE_HASH_PREFIX}{h}\" {r.body()}'\n"
     "                for h, r in zip(self.hashes, self.rules)]"),
]


def before_tree(dest: str) -> str:
    shutil.copytree(os.path.join(ROOT, "policy_agent"), os.path.join(dest, "policy_agent"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for rel, old, new in PATCHES:
        p = os.path.join(dest, "policy_agent", rel)
        with open(p) as f:
            text = f.read()
        if text.count(old) != 1:
            raise SystemExit(f"patch for {rel} does not apply: {old!r}")
        with open(p, "w") as f:
            f.write(text.replace(old, new))
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--backend", choices=("nft", "legacy"), default="nft")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    namespaces, pods, pols = w.cluster(args.pods)
    d = Compiler(NodeConfig(w.NODE)).load(w.snapshot(namespaces, pods, pols)).desired()
    tmp = tempfile.mkdtemp(prefix="i13b-before-")
    samples: dict[str, list[float]] = {"before": [], "after": [], "raw": []}
    try:
        trees = {"before": before_tree(tmp), "after": ROOT}
        state = os.path.join(tmp, "desired.pickle")
        with open(state, "wb") as f:
            pickle.dump(d, f)  # before any rendering: nothing cached on the chains
        texts = (render_ipset_restore(d), render_iptables_save(d, 4), render_iptables_save(d, 6))
        sides = ("before", "after", "raw")
        for r in range(args.rounds):
            for side in sides[r % 3:] + sides[: r % 3]:
                ns = netns.unique_name(AREA, f"{side[0]}{r}")
                netns.create(ns)
                try:
                    if side == "raw":
                        run = Runner(ns)
                        t0 = time.perf_counter()
                        run.run(["ipset", "restore"], input=texts[0])
                        run.run([binary(args.backend, 4, "restore"), "--noflush"], input=texts[1])
                        run.run([binary(args.backend, 6, "restore"), "--noflush"], input=texts[2])
                        samples[side].append(time.perf_counter() - t0)
                    else:
                        out = subprocess.run([sys.executable, "-c", CHILD, state, ns, args.backend, trees[side]],
                                             capture_output=True, text=True, timeout=600, check=True).stdout
                        samples[side].append(float(out.strip().splitlines()[-1]))
                finally:
                    netns.delete(ns)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def ratio(a: str) -> dict:
        rs = [x / y for x, y in zip(samples[a], samples["raw"])]
        return {"median": round(statistics.median(rs), 2), "min": round(min(rs), 2), "max": round(max(rs), 2)}

    result = {
        "pods": len(pods), "policies": len(pols), "local_pods": len(d.endpoints), "backend": args.backend,
        "rounds": args.rounds, "nproc": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
        "raw_lines": sum(len(t.splitlines()) for t in texts),
        "median_s": {k: round(statistics.median(v), 3) for k, v in samples.items()},
        "best_s": {k: round(min(v), 3) for k, v in samples.items()},
        "over_raw": {"before": ratio("before"), "after": ratio("after")},
        "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
