"""Long fuzzing run of parse -> compile -> apply (issue 10, "Prove it: Fuzzing").

Generates clusters with tests/fuzz/fuzz_strategies.py and checks each with
tests/fuzz/fuzz_pipeline.py (invariants and oracle are described there): every
cluster on the fake kernel, every ``--kernel-every``-th one also on the real
kernel in a private network namespace (root; nothing outside that netns is
touched). Findings are counted, not raised: the run goes on and the summary
lists the first few of each kind.

Usage (as root for the real kernel):
  .venv/bin/python bench/reliability/fuzz.py --examples 20000 --kernel-every 50 \
      [--seconds 600] [--seed 1] [--json bench/reliability/fuzz-summary.json]
Exit status: 1 if any crash, stopped object, widening, divergence or valid object
rejected was found, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "fuzz"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

import fuzz_pipeline as fp  # noqa: E402
import fuzz_strategies as fs  # noqa: E402


class _TimeUp(Exception):
    pass


def machine() -> dict:
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iptables": subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout.strip(),
        "ipset": subprocess.run(["ipset", "--version"], capture_output=True, text=True).stdout.strip().split("\n")[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="clusters to generate (fake kernel)")
    ap.add_argument("--kernel-every", type=int, default=50, help="also run every Nth cluster on the real kernel (0: never)")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this much wall time (0: no limit)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--big-rules", type=float, default=0.04, help="share of good policies with 1,000 rules")
    ap.add_argument("--flows", type=int, default=200, help="flows sampled per cluster")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "reliability", "fuzz-summary.json"))
    args = ap.parse_args(argv)

    fp.quiet_logs()
    fake, real = fp.Stats(), fp.Stats()
    kernel = fp.RealKernel(tag="h7fzb") if args.kernel_every and os.geteuid() == 0 else None
    if args.kernel_every and kernel is None:
        print("not root: the real-kernel part is skipped", file=sys.stderr)
    n = [0]
    t0 = time.monotonic()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fs.cluster_st(big_rules=args.big_rules))
    def one(cluster):
        if args.seconds and time.monotonic() - t0 > args.seconds:
            raise _TimeUp
        n[0] += 1
        fake.add(fp.run_cluster(cluster, fp.fake_dataplane, flow_budget=args.flows))
        if kernel is not None and n[0] % args.kernel_every == 0:
            real.add(fp.run_cluster(cluster, kernel.make, flow_budget=args.flows, real_kernel=True))
        if n[0] % 500 == 0:
            print(f"{n[0]} clusters, {time.monotonic() - t0:.0f} s, findings: "
                  f"{len(fake.crashes) + len(real.crashes)} crashes, {len(fake.stopped) + len(real.stopped)} stopped, "
                  f"{len(fake.widenings) + len(real.widenings)} widenings", file=sys.stderr, flush=True)

    try:
        one()
    except _TimeUp:
        pass
    except Exception as exc:  # noqa: BLE001 - hypothesis' own errors: report, keep the figures
        print(f"generator stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if kernel is not None:
            kernel.close()
    wall = time.monotonic() - t0
    f, r = fake.summary(), real.summary()
    doc = {
        "machine": machine(),
        "workload": {
            "examples_requested": args.examples, "kernel_every": args.kernel_every, "seed": args.seed,
            "seconds_limit": args.seconds, "big_rules": args.big_rules, "flows_per_cluster": args.flows,
        },
        "wall_seconds": round(wall, 1),
        "fake_kernel": f,
        "real_kernel": r,
        "totals": {
            k: f[k] + r[k]
            for k in ("clusters", "objects_total", "crashes", "stopped_others", "widenings", "divergences",
                      "valid_objects_rejected", "flows_checked", "apply_failures")
        },
    }
    text = json.dumps(doc, indent=1, sort_keys=True)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    t = doc["totals"]
    bad = t["crashes"] + t["stopped_others"] + t["widenings"] + t["divergences"] + t["valid_objects_rejected"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
