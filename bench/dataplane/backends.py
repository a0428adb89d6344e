"""Legacy backend choice: python-iptables (libiptc, one commit) vs iptables-legacy-restore,
and ipset deltas: one ``ipset restore`` batch vs per-entry netlink (pyroute2).

Same N rules of our shape (hash comment, human comment, set match, MARK target)
into an empty legacy filter table in a private namespace. Prints JSON.
usage: python bench/dataplane/backends.py [N]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from policy_agent.lab import netns

N = int(sys.argv[1]) if len(sys.argv) > 1 else 4700


def restore_text(n: int) -> str:
    lines = ["*filter", ":pa-bench - [0:0]"]
    for i in range(n):
        lines.append(f'-A pa-bench -s 10.233.{i // 250}.{i % 250}/32 -m comment --comment "pa:{i:016d}" '
                     f'-m comment --comment "ns/pol ingress rule {i}" -m set --match-set pa4s-bench src '
                     f'-j MARK --set-xmark 0x10000/0x10000')
    return "\n".join(lines + ["COMMIT"]) + "\n"


def python_iptables(ns: str, n: int) -> float:
    """Fork, setns into ``ns``, build and commit the rules with libiptc; return seconds."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            with netns.in_netns(ns):
                import iptc

                t0 = time.perf_counter()
                table = iptc.Table(iptc.Table.FILTER)
                table.autocommit = False
                chain = table.create_chain("pa-bench")
                for i in range(n):
                    rule = iptc.Rule()
                    rule.src = f"10.233.{i // 250}.{i % 250}/32"
                    rule.create_match("comment").comment = f"pa:{i:016d}"
                    rule.create_match("comment").comment = f"ns/pol ingress rule {i}"
                    m = rule.create_match("set")
                    m.match_set = ["pa4s-bench", "src"]
                    t = rule.create_target("MARK")
                    t.set_xmark = "0x10000/0x10000"
                    chain.append_rule(rule)
                table.commit()
                os.write(w, str(time.perf_counter() - t0).encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100)
    os.waitpid(pid, 0)
    return float(out)


def legacy_restore(ns: str, n: int) -> float:
    text = restore_text(n)
    t0 = time.perf_counter()
    netns.run(ns, "iptables-legacy-restore", "--noflush", "--wait", "10", input=text)
    return time.perf_counter() - t0


def ipset_batch(ns: str, n: int) -> float:
    text = "".join(f"add pa4s-bench 10.233.{i // 250}.{i % 250}\n" for i in range(n))
    t0 = time.perf_counter()
    netns.run(ns, "ipset", "restore", input=text)
    return time.perf_counter() - t0


def ipset_netlink(ns: str, n: int) -> float:
    from pyroute2 import IPSet

    with netns.in_netns(ns):
        ips = IPSet()
    try:
        t0 = time.perf_counter()
        for i in range(n):
            ips.add("pa4s-bench", f"10.233.{100 + i // 250}.{i % 250}", etype="net")
        return time.perf_counter() - t0
    finally:
        ips.close()


def main() -> int:
    ns = netns.unique_name("dpbench", "legacy")
    out: dict = {"rules": N}
    try:
        res: dict[str, list[float]] = {"python_iptables_s": [], "legacy_restore_s": []}
        for _ in range(3):
            for key, fn in (("python_iptables_s", python_iptables), ("legacy_restore_s", legacy_restore)):
                netns.create(ns)
                netns.run(ns, "ipset", "create", "pa4s-bench", "hash:net")
                res[key].append(fn(ns, N))
                netns.delete(ns)
        out.update({k: round(statistics.median(v), 4) for k, v in res.items()})
        netns.create(ns)
        netns.run(ns, "ipset", "create", "pa4s-bench", "hash:net")
        for n in (1, 10, 100, 5000):
            out[f"ipset_restore_batch_{n}_s"] = round(ipset_batch(ns, n), 4)
            netns.run(ns, "ipset", "flush", "pa4s-bench")
        for n in (1, 10, 100, 1000):
            out[f"ipset_netlink_{n}_s"] = round(ipset_netlink(ns, n), 4)
            netns.run(ns, "ipset", "flush", "pa4s-bench")
    finally:
        netns.delete(ns)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
