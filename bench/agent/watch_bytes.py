"""Bytes on the wire per pod list item and per pod watch event, from the real
kube-apiserver (the test suite's local etcd + kube-apiserver 1.20.2), the inputs of the
fan-out model in docs/scale.md.

1. Creates --pods realistic pods (bench/agent/informer_memory.py's Deployment pod:
   managedFields, probes, env, two containers, kubelet-written status) in 20 namespaces.
2. Lists all pods with resourceVersion=0 (watch cache) as JSON, JSON with
   Accept-Encoding gzip, and protobuf; with a limit=500 paginated list (etcd) as JSON;
   and with fieldSelector=spec.nodeName=<one node> (a node's own pods).
3. Opens one JSON and one protobuf watch on all pods, then runs --lifecycles pod
   lifecycles as a kubelet-less cluster can: create (ADDED), status written by the
   "kubelet" (MODIFIED: IPs, conditions), a label change (MODIFIED), graceful delete
   (MODIFIED: deletionTimestamp) and the final delete (DELETED). Bytes per event type
   (JSON; protobuf frames in total).

usage: sudo .venv/bin/python bench/agent/watch_bytes.py [--pods 2000] [--lifecycles 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import http.client
import json
import shutil
import ssl
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "apiserver"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from informer_memory import pod_template  # noqa: E402
from kube_cluster import TOKEN, start_local  # noqa: E402

PROTO = "application/vnd.kubernetes.protobuf"


class Raw:
    """GETs over one TLS connection, reading the bytes as sent."""

    def __init__(self, server: str, ca: str) -> None:
        host, port = server.removeprefix("https://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.check_hostname = False

    def conn(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=600)

    def get(self, path: str, accept: str = "application/json", gzip_ok: bool = False) -> tuple[bytes, dict]:
        c = self.conn()
        headers = {"Authorization": f"Bearer {TOKEN}", "Accept": accept}
        if gzip_ok:
            headers["Accept-Encoding"] = "gzip"
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        body = r.read()
        c.close()
        if r.status != 200:
            raise RuntimeError(f"GET {path}: {r.status} {body[:300]!r}")
        return body, dict(r.getheaders())


def pod_body(tmpl: dict, i: int) -> dict:
    body = {"metadata": {"name": f"web-{i:05d}", "labels": dict(tmpl["metadata"]["labels"], app=f"app-{i % 200}"),
                         "annotations": tmpl["metadata"]["annotations"]},
            "spec": dict(tmpl["spec"], nodeName=f"node-{i % 100}", volumes=[])}
    body["spec"]["containers"] = [dict(c, volumeMounts=[]) for c in tmpl["spec"]["containers"]]
    return body


def status_body(tmpl: dict, i: int) -> dict:
    ip = f"10.233.{(i >> 8) & 255}.{i & 255}"
    return {"status": dict(tmpl["status"], podIP=ip, podIPs=[{"ip": ip}])}


def watch_reader(raw: Raw, rv: str, accept: str, out: dict, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        c = raw.conn()
        c.request("GET", f"/api/v1/pods?watch=true&resourceVersion={rv}&timeoutSeconds=600",
                  headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept})
        r = c.getresponse()
        out["status"] = r.status
        buf = b""
        while not stop.is_set():
            chunk = r.read1(65536)
            if not chunk:
                break
            out["bytes"] = out.get("bytes", 0) + len(chunk)
            buf += chunk
            if accept == PROTO:  # 4-byte big-endian length, then the WatchEvent message
                while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                    n = struct.unpack(">I", buf[:4])[0]
                    out.setdefault("frames", []).append(4 + n)
                    buf = buf[4 + n:]
            else:
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    ev = json.loads(line)
                    out.setdefault("events", []).append((ev["type"], len(line) + 1))
        c.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=2000)
    ap.add_argument("--lifecycles", type=int, default=50)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pa-kube-bytes-"))
    cl = start_local(work)
    res: dict = {"server": "kube-apiserver 1.20.2 (local, etcd)", "pods": a.pods}
    try:
        from kubernetes import client

        api = cl.api_client()
        core = client.CoreV1Api(api)
        nss = [f"bench-{i}" for i in range(20)]
        for ns in nss:
            core.create_namespace({"metadata": {"name": ns}})
        tmpl = pod_template()

        def create(i: int) -> None:
            ns = nss[i % len(nss)]
            core.create_namespaced_pod(ns, pod_body(tmpl, i))
            core.patch_namespaced_pod_status(f"web-{i:05d}", ns, status_body(tmpl, i))

        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            for f in [ex.submit(create, i) for i in range(a.pods)]:
                f.result()

        raw = Raw(cl.server, str(cl.local.workdir / "pki" / "server.crt"))
        lists = {}
        body, _ = raw.get("/api/v1/pods?resourceVersion=0")
        doc = json.loads(body)
        n = len(doc["items"])
        rv = doc["metadata"]["resourceVersion"]
        lists["json_rv0"] = len(body)
        gz, headers = raw.get("/api/v1/pods?resourceVersion=0", gzip_ok=True)
        lists["json_gzip_rv0"] = len(gz)
        lists["gzip_served"] = headers.get("Content-Encoding") == "gzip"
        if not lists["gzip_served"]:
            lists["json_gzip_rv0"] = len(gzip.compress(body, 6))  # what gzip would give
        pb, _ = raw.get("/api/v1/pods?resourceVersion=0", accept=PROTO)
        lists["protobuf_rv0"] = len(pb)
        total, cont, pages = 0, "", 0
        while True:
            body, _ = raw.get("/api/v1/pods?limit=500" + (f"&continue={cont}" if cont else ""))
            total += len(body)
            pages += 1
            cont = json.loads(body)["metadata"].get("continue", "")
            if not cont:
                break
        lists["json_paged_500"] = total
        node_body, _ = raw.get("/api/v1/pods?resourceVersion=0&fieldSelector=spec.nodeName%3Dnode-7")
        res["list"] = {"items": n, "pages_of_500": pages,
                       "bytes_per_pod": {k: round(v / n) for k, v in lists.items() if not isinstance(v, bool)},
                       "gzip_served_by_server": lists["gzip_served"],
                       "node_field_selector_items": len(json.loads(node_body)["items"])}

        # watch fan-out inputs: one JSON and one protobuf watcher
        stop = threading.Event()
        wj, wp = {}, {}
        threads = [watch_reader(raw, rv, "application/json", wj, stop), watch_reader(raw, rv, PROTO, wp, stop)]
        time.sleep(1.0)
        for k in range(a.lifecycles):
            i = 100000 + k
            ns = nss[k % len(nss)]
            name = f"web-{i:05d}"
            core.create_namespaced_pod(ns, pod_body(tmpl, i))
            core.patch_namespaced_pod_status(name, ns, status_body(tmpl, i))
            core.patch_namespaced_pod(name, ns, {"metadata": {"labels": {"version": "v2"}}})
            core.delete_namespaced_pod(name, ns, grace_period_seconds=30)
            core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
        time.sleep(2.0)
        stop.set()
        by_type: dict[str, list[int]] = {}
        for typ, size in wj.get("events", []):
            by_type.setdefault(typ, []).append(size)
        frames = wp.get("frames", [])
        res["watch"] = {
            "lifecycles": a.lifecycles,
            "json_events": {t: {"count": len(v), "mean_bytes": round(sum(v) / len(v))} for t, v in by_type.items()},
            "json_bytes_per_lifecycle": round(sum(s for _, s in wj.get("events", [])) / a.lifecycles),
            "json_events_per_lifecycle": round(len(wj.get("events", [])) / a.lifecycles, 2),
            "protobuf_frames": len(frames),
            "protobuf_bytes_per_lifecycle": round(sum(frames) / a.lifecycles) if frames else None,
        }
        for t in threads:
            t.join(0.1)
        api.close()
    finally:
        cl.local.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
