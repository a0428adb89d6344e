"""CNI endpoint-record source: the shim's records of wired pods, scanned and watched.

The shim writes ``<endpoint_dir>/<namespace>.<pod>.json`` with an atomic rename
the moment CNI ADD has wired a pod, and removes it on DEL. We scan the directory
at start (Replace + InSync) and then follow changes with watchdog, re-reading
only files whose (inode, size, mtime) changed, and emit Upsert/Delete keyed by
(namespace, pod). The store merges a record into the pod: its IPs stand in until
the API server reports ``status.podIPs``.

A record that cannot be read, or whose content does not match its file name, is
reported as SourceError and ignored (its last good version is kept).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import structlog

from policy_agent.shared import endpoint as ep
from policy_agent.sources.events import Delete, InSync, Replace, Sink, SourceError, Upsert
from policy_agent.sources.manifests import WatchedDir

log = structlog.get_logger(__name__)


class CniSource:
    def __init__(self, endpoint_dir: str = ep.DEFAULT_ENDPOINT_DIR, name: str = "cni",
                 poll_interval: float = 10.0) -> None:
        self.directory = os.path.abspath(endpoint_dir)
        self.name = name
        self._watch = WatchedDir(self.directory, ep.is_record_file, self._rescan, recursive=False,
                                 debounce=0.0, poll_interval=poll_interval, name="cni-source")
        self._by_path: dict[str, tuple[tuple[str, str], ep.EndpointRecord]] = {}
        self._errors: dict[str, str] = {}
        self._sink: Sink | None = None
        self._lock = threading.Lock()

    def start(self, sink: Sink) -> None:
        self._sink = sink
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        self._watch.start()
        with self._lock:
            self._scan_changes(initial=True)
        sink(InSync(self.name))
        log.info("cni_source_in_sync", directory=self.directory, records=len(self._by_path))

    def stop(self) -> None:
        self._watch.stop()

    def _rescan(self) -> None:
        with self._lock:
            self._scan_changes(initial=False)

    def _read(self, path: str) -> tuple[tuple[str, str], ep.EndpointRecord] | str:
        name = os.path.basename(path)
        try:
            rec = ep.read_record(path)
        except FileNotFoundError:
            return "vanished"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"endpoint record {name}: {exc}"
        try:
            expected = ep.record_key(rec.namespace, rec.pod) + ".json"
        except ValueError as exc:
            return f"endpoint record {name}: {exc}"
        if expected != name:
            return f"endpoint record {name}: names pod {rec.namespace}/{rec.pod}, expected file {expected}"
        return (rec.namespace, rec.pod), rec

    def _scan_changes(self, initial: bool) -> None:
        try:
            changed, removed = self._watch.scan()
        except OSError as exc:
            self._report(self.directory, f"endpoint directory {self.directory}: cannot read: {exc}")
            return
        events: list[Any] = []
        for path in removed:
            old = self._by_path.pop(path, None)
            self._errors.pop(path, None)
            if old is not None:
                events.append(Delete(self.name, "Endpoint", old[0]))
        for path in changed:
            got = self._read(path)
            if got == "vanished":
                self._watch.forget(path)
                continue
            if isinstance(got, str):
                self._report(path, got)
                continue
            self._errors.pop(path, None)
            old = self._by_path.get(path)
            self._by_path[path] = got
            if old is None or old[1] != got[1]:
                events.append(Upsert(self.name, "Endpoint", got[0], got[1]))
        if self._sink is None:
            return
        if initial:
            self._sink(Replace(self.name, "Endpoint", {k: r for k, r in self._by_path.values()}))
        else:
            for e in events:
                self._sink(e)

    def _report(self, path: str, message: str) -> None:
        if self._errors.get(path) == message:
            return
        self._errors[path] = message
        log.warning("endpoint_record_error", message=message)
        if self._sink:
            self._sink(SourceError(self.name, message, "Endpoint", os.path.basename(path)))
