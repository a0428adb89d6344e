"""Draw the scale series (bench/scale.py's JSON) into PNGs for docs/performance.md.

usage: .venv/bin/python bench/plot.py [bench/results/scale.json] [--out docs/img]
Needs the `bench` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("remote_pod_add", "remote_pod_delete", "remote_pod_label_change", "local_pod_add", "local_pod_delete",
         "local_pod_label_change", "namespace_label_change", "policy_add", "policy_update", "policy_delete",
         "policy_add_selecting_local_pod", "policy_update_selecting_local_pod", "policy_delete_selecting_local_pod",
         "cnp_add", "cnp_delete")
KUBE_KINDS = ("local_pod_gets_address", "remote_pod_gets_address", "local_pod_label_change", "remote_pod_label_change",
              "policy_add", "namespace_label_change", "local_pod_delete")


def series(data: dict, get) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for size in sorted(data["sizes"], key=int):
        try:
            y = get(data["sizes"][size])
        except (KeyError, TypeError):
            continue
        if y is not None:
            xs.append(int(size))
            ys.append(y)
    return xs, ys


SIZES: list[int] = []


def setup(ax, title: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_xticks(SIZES)
    ax.set_xticklabels([f"{s // 1000}k" for s in SIZES])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("pods in the cluster (0.2 policies per pod, 110 local)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)


def target(ax, y: float, label: str) -> None:
    ax.axhline(y, color="crimson", linestyle="--", linewidth=1)
    ax.text(ax.get_xlim()[0], y, f" {label}", color="crimson", va="bottom", fontsize=8)


def save(fig, out: str, name: str, note: str) -> None:
    fig.text(0.01, 0.01, note, fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=os.path.join(HERE, "results", "scale.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "img"))
    args = ap.parse_args()
    with open(args.data) as f:
        data = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    SIZES[:] = sorted(int(s) for s in data["sizes"])
    m = next((e["compile"]["machine"] for e in data["sizes"].values() if "machine" in e.get("compile", {})), {})
    note = f"bench/scale.py {data.get('started', '')}; {m.get('cpus', '?')} vCPU {m.get('cpu', '')}; " \
           "shared machine: load in docs/performance.md"

    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs, ys = series(data, lambda e: e["compile"]["full_compile"]["median_s"])
    ax.plot(xs, ys, "o-", label="full compile, wall (median of 5)")
    xs, ys = series(data, lambda e: e["compile"]["full_compile"].get("cpu_median_s"))
    ax.plot(xs, ys, "s:", label="full compile, CPU time (median of 5)")
    setup(ax, "Full compile", "seconds")
    target(ax, 1.0, "target 1 s at 50k")
    ax.legend(fontsize=8)
    save(fig, args.out, "scale-full-compile.png", note)

    fig, ax = plt.subplots(figsize=(8.4, 5.2))
    cmap = plt.get_cmap("tab20")
    for i, kind in enumerate(KINDS):
        xs, ys = series(data, lambda e, k=kind: e["compile"]["incremental"][k]["op+desired"].get("cpu_p99_ms"))
        ax.plot(xs, ys, "o-", color=cmap(i), markersize=3, linewidth=1, label=kind)
    xs, ys = series(data, lambda e: max(v["op+desired"]["p99_ms"] for v in e["compile"]["incremental"].values()))
    ax.plot(xs, ys, "k--", linewidth=2, label="worst kind, wall clock")
    setup(ax, "Incremental compile p99 per kind (op + desired), CPU time; dashed: worst wall clock", "ms")
    ax.set_yscale("log")
    target(ax, 5.0, "target 5 ms")
    ax.legend(fontsize=6, loc="upper left", ncol=2)
    save(fig, args.out, "scale-incremental-p99.png", note)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for backend, style in (("nft", "-"), ("legacy", "--")):
        key = f"dataplane_{backend}"
        xs, ys = series(data, lambda e, k=key: e[k]["from_empty"]["ours_s"])
        a1.plot(xs, ys, "o" + style, label=f"agent apply, {backend}")
        xs, ys = series(data, lambda e, k=key: e[k]["from_empty"]["raw_restore_s"])
        a1.plot(xs, ys, "s" + style, label=f"raw ipset+iptables restore, {backend}")
        xs, ys = series(data, lambda e, k=key: e[k]["from_empty"]["ratio_median"])
        a2.plot(xs, ys, "o" + style, label=f"warm process, {backend}")
        xs, ys = series(data, lambda e, k=key: e[k].get("first_apply_fresh_process", {}).get("ratio_median"))
        a2.plot(xs, ys, "^" + style, label=f"fresh process, {backend}")
    setup(a1, "Program from empty (median of 3)", "seconds")
    a1.set_yscale("log")
    a1.legend(fontsize=7)
    setup(a2, "Apply from empty / raw restore", "ratio")
    target(a2, 1.5, "target 1.5x")
    a2.set_ylim(bottom=0)
    a2.legend(fontsize=7)
    save(fig, args.out, "scale-apply-from-empty.png", note)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for backend, style in (("nft", "-"), ("legacy", "--")):
        for kind, mark in (("policy_add", "o"), ("local_pod_add", "s"), ("remote_pod_add", "^")):
            xs, ys = series(data, lambda e, b=backend, k=kind: e[f"dataplane_{b}"]["deltas"][k]["apply_ms"])
            ax.plot(xs, ys, mark + style, label=f"{kind}, {backend}")
    setup(ax, "One small delta vs the ruleset already in the kernel (median)", "ms")
    ax.legend(fontsize=7)
    ax.set_ylim(bottom=0)
    save(fig, args.out, "scale-deltas.png", note)

    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for kind in KUBE_KINDS:
        xs, ys = series(data, lambda e, k=kind: e["kube"]["agent_in_process"]["latency_ms"][k]["p99"])
        ax.plot(xs, ys, "o-", label=f"{kind} p99")
    setup(ax, "Event -> enforced p99: API request sent -> kernel commit (real kube-apiserver, nft)", "ms")
    target(ax, 100.0, "target 100 ms")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    save(fig, args.out, "scale-event-enforced-p99.png", note)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for tag, mark in (("cold", "o-"), ("restart", "s-")):
        xs, ys = series(data, lambda e, t=tag: e["kube"]["agent_process"][t]["ready_s"])
        ax.plot(xs, ys, mark, label=f"policy-agent run -> /readyz, {tag} (list + first apply)")
    for mode, mark in (("cache", "^:"), ("pages", "v:")):
        xs, ys = series(data, lambda e, m=mode: e["kube"]["informer"][m]["list_seconds"])
        ax.plot(xs, ys, mark, label=f"Pod informer list -> InSync ({mode})")
    setup(ax, "Restart to ready against kube-apiserver", "seconds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    save(fig, args.out, "scale-restart-ready.png", note)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs, ys = series(data, lambda e: e["kube"]["agent_process"]["restart"]["rss_after_settle_mb"])
    ax.plot(xs, ys, "o-", label="policy-agent run (real API server), RSS once ready")
    xs, ys = series(data, lambda e: e["kube"]["agent_process"]["restart"]["peak_rss_mb"])
    ax.plot(xs, ys, "s--", label="same, peak (VmHWM)")
    xs, ys = series(data, lambda e: e["compile"]["peak_rss_mb"])
    ax.plot(xs, ys, "^:", label="compile bench peak RSS (compiler only)")
    setup(ax, "Memory", "MB")
    target(ax, 250.0, "target 250 MB at 50k")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    save(fig, args.out, "scale-rss.png", note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
