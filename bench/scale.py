"""The scale series: every benchmark on bench/workload.py at several sizes, one JSON file.

For each size (pods; 0.2 policies per pod, 20 pods per namespace, 110 local pods):
  compile    bench/compile/run.py --pods N            full compile, incremental p50/p99 per change
  dataplane  bench/dataplane/run.py --pods N --no-packets, nft and legacy
                                                      from empty vs raw restore, deltas
  agent      bench/agent/latency.py --scale N         event -> enforced p99, RSS (in-process source)
  kube       bench/agent/kube_scale.py --pods N       against a real kube-apiserver: restart to ready,
                                                      agent RSS, informer list cost, event -> enforced p99
Sizes above --dataplane-max / --agent-max / --kube-max run the compile part only (said in the output).
Then draw the curves with bench/plot.py.

usage: sudo .venv/bin/python bench/scale.py [--sizes 2000,10000,50000,100000]
           [--dataplane-max 50000] [--agent-max 50000] [--kube-max 50000] [--parts compile,dataplane,agent,kube]
           [--out bench/results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run(argv: list[str], timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, *argv, "--json", f.name], capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:], "argv": argv}
        with open(f.name) as fh:
            out = json.load(fh)
        out["bench_wall_s"] = round(time.monotonic() - t0, 1)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,10000,50000,100000")
    ap.add_argument("--dataplane-max", type=int, default=50_000)
    ap.add_argument("--agent-max", type=int, default=50_000)
    ap.add_argument("--backends", default="nft,legacy")
    ap.add_argument("--events", type=int, default=100, help="agent events per scenario")
    ap.add_argument("--kube-max", type=int, default=50_000)
    ap.add_argument("--kube-events", type=int, default=200, help="changes per kind against the API server")
    ap.add_argument("--parts", default="compile,dataplane,agent,kube", help="which benchmarks to (re)run")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "scale.json"))
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    result: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "sizes": {}}
    if os.path.exists(args.out):  # resume: keep what an earlier (partial) run measured
        with open(args.out) as f:
            result = json.load(f)
    parts = set(args.parts.split(","))
    for n in sizes:
        entry = result["sizes"].setdefault(str(n), {})
        reps = 200  # a p99 per kind of change
        if "compile" in parts:
            print(f"[{n}] compile", file=sys.stderr, flush=True)
            entry["compile"] = run([os.path.join(HERE, "compile", "run.py"), "--pods", str(n), "--reps", str(reps)],
                                   1800)
        if "dataplane" not in parts:
            pass
        elif n <= args.dataplane_max:
            for backend in args.backends.split(","):
                print(f"[{n}] dataplane {backend}", file=sys.stderr, flush=True)
                entry[f"dataplane_{backend}"] = run([os.path.join(HERE, "dataplane", "run.py"), "--pods", str(n),
                                                     "--backend", backend, "--no-packets"], 1800)
        else:
            entry["dataplane_skipped"] = f"above --dataplane-max {args.dataplane_max}"
        if "agent" not in parts:
            pass
        elif n <= args.agent_max:
            print(f"[{n}] agent", file=sys.stderr, flush=True)
            entry["agent"] = run([os.path.join(HERE, "agent", "latency.py"), "--scale", str(n), "--backend", "nft",
                                  "--events", str(args.events), "--idle", "10"], 1800)
        else:
            entry["agent_skipped"] = f"above --agent-max {args.agent_max}"
        if "kube" not in parts:
            pass
        elif n <= args.kube_max:
            print(f"[{n}] agent against kube-apiserver", file=sys.stderr, flush=True)
            entry["kube"] = run([os.path.join(HERE, "agent", "kube_scale.py"), "--pods", str(n), "--events",
                                 str(args.kube_events)], 3600)
        else:
            entry["kube_skipped"] = f"above --kube-max {args.kube_max}"
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
