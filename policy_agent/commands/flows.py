"""`policy-agent flows`: the flow verdict log of the agent on this node.

Reads the JSON lines the agent writes (flow_log_file; the rotated ``.1`` first), filters
them and prints one line per verdict, or the JSON lines themselves with ``-o json``.
``--follow`` keeps reading as the agent appends (and across a rotation).

    policy-agent flows --namespace shop --verdict deny --since 10m
    policy-agent flows --pod shop/frontend-1 --follow
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
from typing import IO, Iterator

from policy_agent.obs.flowlog import default_path

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "flows", help="show the flow verdict log (denied, optionally allowed, new connections) of this node",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines as they are logged")
    p.add_argument("--namespace", "-n", help="only flows from or to a pod of this namespace")
    p.add_argument("--pod", help="only flows from or to this pod: NAME (with --namespace) or NAMESPACE/NAME")
    p.add_argument("--verdict", choices=("deny", "allow"), help="only this verdict")
    p.add_argument("--since", help="only lines newer than a duration (30s, 10m, 2h, 1d) or an ISO 8601 time")
    p.add_argument("--output", "-o", choices=("text", "json"), default="text", help="text (default) or json lines")
    p.add_argument("--file", help="the flow log file (default: the agent's, from --netns)")
    p.add_argument("--netns", default=os.environ.get("POLICY_AGENT_NETNS", ""),
                   help="the agent's --netns, which names its default file [POLICY_AGENT_NETNS]")
    p.set_defaults(func=run)


def parse_since(text: str | None, now: float) -> float | None:
    """A duration back from ``now`` or an ISO time -> Unix time (ValueError if neither)."""
    if not text:
        return None
    m = _DURATION.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: not a duration (30s, 10m, 2h, 1d) nor an ISO 8601 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def record_time(rec: dict) -> float:
    return dt.datetime.fromisoformat(str(rec.get("time", "")).replace("Z", "+00:00")).timestamp()


class Filter:
    def __init__(self, namespace: str | None, pod: str | None, verdict: str | None, since: float | None) -> None:
        if pod and "/" not in pod and not namespace:
            raise ValueError("--pod NAME needs --namespace (or give --pod NAMESPACE/NAME)")
        self.namespace = namespace
        self.pod = pod if (not pod or "/" in pod) else f"{namespace}/{pod}"
        self.verdict = verdict
        self.since = since

    def __call__(self, rec: dict) -> bool:
        if self.verdict and rec.get("verdict") != self.verdict:
            return False
        pods = (rec.get("src_pod") or "", rec.get("dst_pod") or "")
        if self.pod and self.pod not in pods:
            return False
        if self.namespace and not any(p.split("/", 1)[0] == self.namespace for p in pods if p):
            return False
        if self.since is not None:
            try:
                if record_time(rec) < self.since:
                    return False
            except ValueError:
                return False
        return True


def _side(rec: dict, side: str) -> str:
    who = rec.get(f"{side}_pod") or rec.get(f"{side}_ip") or "?"
    port = rec.get(f"{side}_port")
    if port is None or side != "dst":
        return who
    return f"[{who}]:{port}" if ":" in who else f"{who}:{port}"


def why(rec: dict) -> str:
    d = rec.get("decided_by") or {}
    kind = d.get("kind")
    if kind == "no-policy-allowed":
        return f"no policy allowed it (isolated by {', '.join(d.get('isolating_policies') or []) or '?'})"
    if kind == "no-policy-selects":
        return "no policy selects the pod"
    if kind == "networkpolicy":
        return f"networkpolicy {rec.get('policy')} {rec.get('rule')}"
    if kind in ("admin", "baseline"):
        return f"clusternetworkpolicy {rec.get('policy')} ({rec.get('rule')})"
    return str(rec.get("rule") or "unknown")


def format_text(rec: dict) -> str:
    icmp = f" type {rec['icmp_type']}" if "icmp_type" in rec else ""
    return (f"{rec.get('time', '?')}  {rec.get('verdict', '?'):<5} {rec.get('direction', '?'):<7} "
            f"{rec.get('protocol', '?')}{icmp}  {_side(rec, 'src')} -> {_side(rec, 'dst')}  {why(rec)}")


def _records(f: IO[str], err: IO[str]) -> Iterator[dict]:
    """Complete lines from the current position; a line still being written is left
    for the next pass (the position stays before it)."""
    while True:
        pos = f.tell()
        line = f.readline()
        if not line:
            return
        if not line.endswith("\n"):
            f.seek(pos)
            return
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            print(f"policy-agent flows: skipped a line that is not JSON: {line[:80]!r}", file=err)
            continue
        if isinstance(rec, dict):
            yield rec


def run(args: argparse.Namespace, out: IO[str] | None = None, err: IO[str] | None = None,
        stop_after: float | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    path = args.file or default_path(args.netns or None)
    try:
        keep = Filter(args.namespace, args.pod, args.verdict, parse_since(args.since, time.time()))
    except ValueError as exc:
        print(f"policy-agent flows: {exc}", file=err)
        return 2
    show = (lambda r: json.dumps(r, separators=(",", ":"))) if args.output == "json" else format_text
    if not os.path.exists(path) and not args.follow:
        print(f"policy-agent flows: no flow log at {path} (is the agent running here with flow_log on? "
              "see --file / --netns)", file=err)
        return 1
    shown = 0
    if os.path.exists(path + ".1"):
        with open(path + ".1", encoding="utf-8") as f:
            for rec in _records(f, err):
                if keep(rec):
                    print(show(rec), file=out)
                    shown += 1
    f = None
    inode = None
    deadline = None if stop_after is None else time.monotonic() + stop_after
    try:
        while True:
            if f is None and os.path.exists(path):
                f = open(path, encoding="utf-8")  # noqa: SIM115 - followed across rotations
                inode = os.fstat(f.fileno()).st_ino
            if f is not None:
                for rec in _records(f, err):
                    if keep(rec):
                        print(show(rec), file=out)
                        shown += 1
                out.flush()
            if not args.follow or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(0.2)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if f is not None and (st.st_ino != inode or st.st_size < f.tell()):
                for rec in _records(f, err):  # rotated: what was appended before it, then the new file
                    if keep(rec):
                        print(show(rec), file=out)
                f.close()
                f = None
    finally:
        if f is not None:
            f.close()
    return 0
