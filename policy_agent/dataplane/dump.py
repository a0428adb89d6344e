"""What is in the kernel now (not what we meant to write), for ``policy-agent dump``.

Chains, rules and counters come from ``iptables-save -c``; every rule line is
labelled with its human comment (policy, direction, rule). Sets and members come
from ``ipset save``. What a set stands for, and which pod owns an interface,
cannot be read from the kernel, so apply records them in a small JSON state file
(see apply.default_state_path) and the dump joins the two; a set or endpoint
missing from either side is shown as such.
"""

from __future__ import annotations

import json
from typing import Any

from policy_agent.dataplane import iptables as ipt
from policy_agent.dataplane import ipsets as ips
from policy_agent.dataplane.kernel import Kernel
from policy_agent.shared.naming import from_workload_chain, owns_chain, to_workload_chain


def _load_state(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _rule(r: ipt.KRule) -> dict[str, Any]:
    return {"line": r.save_line(), "packets": r.packets, "bytes": r.bytes, "hash": r.hash, "origin": r.origin}


def collect(kernel: Kernel, state_path: str | None = None, families: tuple[int, ...] = (4, 6)) -> dict[str, Any]:
    meta = _load_state(state_path)
    doc: dict[str, Any] = {"backend": kernel.backend, "tables": [], "ipsets": [], "endpoints": []}
    kernel_chains: dict[int, dict[str, ipt.KChain]] = {}
    for family in families:
        for name, t in sorted(ipt.parse_save(kernel.iptables_save(family)).items()):
            hooks = [
                dict(_rule(r), chain=c.name) for c in t.chains.values() if c.builtin for r in c.rules if r.ours
            ]
            owned = t.owned()
            if not owned and not hooks:
                continue
            kernel_chains.setdefault(family, {}).update(owned)
            doc["tables"].append({
                "family": family,
                "table": name,
                "hooks": hooks,
                "chains": [{"name": c.name, "rules": [_rule(r) for r in c.rules]} for c in owned.values()],
            })
    origins = meta.get("ipsets", {})
    for name, s in sorted(ips.parse_ipset_save(kernel.ipset_save()).items()):
        doc["ipsets"].append({
            "name": name, "family": s.family, "type": s.type, "members": sorted(s.members),
            "origin": origins.get(name, {}).get("origin") or ("(not in the state file)" if name not in origins else ""),
        })
    for e in meta.get("endpoints", []):
        v4 = kernel_chains.get(4, {})
        tw, fw = v4.get(to_workload_chain(e["interface"])), v4.get(from_workload_chain(e["interface"]))

        def jumps(ch: ipt.KChain | None) -> list[str]:
            return [r.target for r in ch.rules if r.target and owns_chain(r.target)] if ch else []

        doc["endpoints"].append(dict(
            e,
            programmed=bool(tw and fw),
            kernel_ingress_chains=jumps(tw),
            kernel_egress_chains=jumps(fw),
        ))
    return doc


def render_text(doc: dict[str, Any]) -> str:
    out = [f"# backend: {doc['backend']}"]
    for t in doc["tables"]:
        out.append(f"*{t['table']}  # IPv{t['family']}")
        for h in t["hooks"]:
            out.append(f"[{h['packets']}:{h['bytes']}] {h['line']}")
        for c in t["chains"]:
            out.append(f":{c['name']}")
        for c in t["chains"]:
            for r in c["rules"]:
                tail = f"    # {r['origin']}" if r["origin"] else ""
                out.append(f"[{r['packets']}:{r['bytes']}] {r['line']}{tail}")
        out.append("COMMIT")
    out.append("# ipsets")
    for s in doc["ipsets"]:
        out.append(f"{s['name']} {s['type']} IPv{s['family']} ({len(s['members'])} members): {s['origin']}")
        out.extend(f"  {m}" for m in s["members"])
    out.append("# local endpoints")
    for e in doc["endpoints"]:
        state = "programmed" if e["programmed"] else "NOT PROGRAMMED"
        out.append(
            f"{e['namespace']}/{e['pod']} {e['interface']} {' '.join(e['ips'])} [{state}] "
            f"ingress: {', '.join(e['ingress_policies']) or '-'}; egress: {', '.join(e['egress_policies']) or '-'}"
        )
    return "\n".join(out) + "\n"
