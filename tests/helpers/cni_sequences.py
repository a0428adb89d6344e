"""Pieces shared by the CNI identity tests on the fake plumbing and on the real kernel."""

from __future__ import annotations

import os
import threading
import time

from policy_agent.shared import endpoint


def first_ipv4(result: dict) -> str:
    """The first address of a CNI ADD result, without its prefix length."""
    return result["ips"][0]["address"].split("/")[0]


def read_record(endpoint_dir: str, ns: str, pod: str) -> endpoint.EndpointRecord | None:
    try:
        return endpoint.read_record(os.path.join(endpoint_dir, f"{ns}.{pod}.json"))
    except FileNotFoundError:
        return None


def stand_in_agent(endpoint_dir: str, status_dir: str, ns: str, pod: str, uid: str, cid: str = "cid-new",
                   timeout: float = 60.0, after: float = 0.0, poll: float = 0.02) -> threading.Thread:
    """A thread that writes the status file the way the agent does (naming the record's
    container and ``uid``), ``after`` seconds once the record of sandbox ``cid`` is there."""

    def run() -> None:
        path = os.path.join(endpoint_dir, f"{ns}.{pod}.json")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rec = endpoint.read_record(path)
            except (OSError, ValueError):
                rec = None
            if rec is not None and rec.container_id == cid:
                if after:
                    time.sleep(after)
                endpoint.write_status(status_dir, endpoint.EndpointStatus(
                    ns, pod, rec.container_id, rec.interface, time.time(), (), uid))
                return
            time.sleep(poll)

    t = threading.Thread(target=run)
    t.start()
    return t
