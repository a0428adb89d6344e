"""Link monitor: pod interfaces (our prefix) appearing and disappearing, via netlink.

Subscribes to RTNLGRP_LINK first, then dumps the links (so nothing falls in
between), emits Replace("Link") + InSync, then Upsert/Delete per change of an
interface whose name starts with the prefix. Runs in its own thread with its own
asyncio loop (pyroute2's AsyncIPRoute); with ``netns`` the netlink socket lives
in that named namespace. If the socket fails, it reconnects with backoff and
re-dumps (Replace), so a missed event cannot leave a stale link.

Link objects are plain dicts: {"ifname", "index", "up"}.

It never holds the agent back: links change no rule, so the agent does not wait
for its InSync (``gates_sync = False``); it only calls ``sink`` (a queue put);
the connect-and-dump step has a deadline (``sync_timeout``), after which it
reconnects. What cannot be bounded from inside (a netlink call that blocks the
monitor's event loop, or the thread dying) is reported by ``health()``: a
heartbeat task on the same event loop stops beating when the loop is blocked.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import structlog

from policy_agent.sources.events import Delete, InSync, Replace, Sink, SourceError, Upsert

log = structlog.get_logger(__name__)

IFF_UP = 0x1
STALL_AFTER = 10.0  # seconds without a heartbeat of the monitor's event loop: "stalled"
SYNC_TIMEOUT = 30.0  # seconds for connect + dump before giving up and reconnecting


def _link(msg: Any) -> dict[str, Any] | None:
    name = msg.get("ifname") or msg.get_attr("IFLA_IFNAME")
    if not name:
        return None
    return {"ifname": name, "index": int(msg.get("index")), "up": bool(msg.get("flags", 0) & IFF_UP)}


class LinkSource:
    gates_sync = False  # the agent applies without waiting for us (links change no rule)

    def __init__(self, prefix: str, netns: str = "", name: str = "links", *, stall_after: float = STALL_AFTER,
                 sync_timeout: float = SYNC_TIMEOUT) -> None:
        self.prefix = prefix
        self.netns = netns
        self.name = name
        self.stall_after = stall_after
        self.sync_timeout = sync_timeout
        # Written by the monitor thread, read by health() from any thread (plain attribute writes).
        self._beat = time.monotonic()
        self._state = "starting"  # starting | in_sync | reconnecting
        self._detail = "waiting for the first netlink dump"
        self._died: str | None = None
        self._sink: Sink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopping = False
        self._links: dict[str, dict[str, Any]] = {}

    def start(self, sink: Sink) -> None:
        self._sink = sink
        self._thread = threading.Thread(target=self._thread_main, name="link-monitor", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def stop(self) -> None:
        self._stopping = True
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop is closed already: the thread is gone
        if self._thread is not None:
            self._thread.join(5)  # a monitor blocked in a netlink call is a daemon thread: left behind

    def health(self) -> dict[str, Any]:
        """healthy / state / detail, for /status. Never blocks (reads attributes only)."""
        thread = self._thread
        if thread is None:
            return {"healthy": False, "state": "not_started", "detail": ""}
        if self._stopping:
            return {"healthy": True, "state": "stopped", "detail": ""}
        if not thread.is_alive():
            return {"healthy": False, "state": "dead", "detail": self._died or "monitor thread exited"}
        silent = time.monotonic() - self._beat
        if silent > self.stall_after:
            return {"healthy": False, "state": "stalled",
                    "detail": f"monitor event loop blocked for {silent:.0f}s (in {self._state}: {self._detail})"}
        if self._state == "in_sync":
            return {"healthy": True, "state": "in_sync", "detail": f"{len(self._links)} links"}
        return {"healthy": False, "state": self._state, "detail": self._detail}

    def _thread_main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        beat = None
        try:
            beat = loop.create_task(self._heartbeat())
            self._task = loop.create_task(self._run())
            self._started.set()
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self._died = f"monitor thread died: {type(exc).__name__}: {exc}"
            log.error("link_monitor_died", error=str(exc), error_type=type(exc).__name__)
            self._emit(SourceError(self.name, f"link monitor: {self._died}", "watch"))
        finally:
            if beat is not None:
                beat.cancel()
                try:
                    loop.run_until_complete(beat)
                except BaseException:
                    pass
            self._started.set()
            loop.close()

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(min(1.0, self.stall_after / 4))

    async def _connect_and_dump(self, ipr: Any) -> dict[str, dict[str, Any]]:
        await ipr.bind()
        links = {}
        async for msg in await ipr.link("dump"):
            link = _link(msg)
            if link and link["ifname"].startswith(self.prefix):
                links[link["ifname"]] = link
        return links

    def _emit(self, event: Any) -> None:
        if self._sink is not None and not self._stopping:
            self._sink(event)

    async def _run(self) -> None:
        from pyroute2 import AsyncIPRoute  # heavy import, only where used

        backoff = 0.5
        first = True
        while not self._stopping:
            ipr = None
            try:
                # flags=0: attach to an existing netns, never create one (pyroute2 defaults to O_CREAT).
                ipr = AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
                try:
                    links = await asyncio.wait_for(self._connect_and_dump(ipr), self.sync_timeout)
                except TimeoutError:
                    raise TimeoutError(f"no netlink dump within {self.sync_timeout:g}s") from None
                self._links = links
                self._emit(Replace(self.name, "Link", dict(links)))
                self._emit(InSync(self.name))
                self._state = "in_sync"
                log.info("link_monitor_in_sync", netns=self.netns or None, links=len(links), resync=not first)
                first = False
                backoff = 0.5
                while not self._stopping:
                    async for msg in ipr.get():
                        self._handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    break
                log.warning("link_monitor_failed", error=str(exc), retry_in=backoff)
                self._state, self._detail = "reconnecting", f"link monitor: {exc}"
                self._emit(SourceError(self.name, f"link monitor: {exc}", "watch"))
                await asyncio.sleep(backoff * (1 + random.random() * 0.2))
                backoff = min(backoff * 2, 30.0)
            finally:
                if ipr is not None:
                    try:
                        ipr.close()
                    except Exception:
                        pass

    def _handle(self, msg: Any) -> None:
        event = msg.get("event")
        if event not in ("RTM_NEWLINK", "RTM_DELLINK"):
            return
        link = _link(msg)
        if link is None:
            return
        # A rename keeps the index: the old name is gone.
        for old, known in list(self._links.items()):
            if known["index"] == link["index"] and old != link["ifname"]:
                del self._links[old]
                self._emit(Delete(self.name, "Link", old))
        if not link["ifname"].startswith(self.prefix):
            return
        name = link["ifname"]
        if event == "RTM_DELLINK":
            if self._links.pop(name, None) is not None:
                log.debug("link_gone", ifname=name)
                self._emit(Delete(self.name, "Link", name))
            return
        if self._links.get(name) != link:
            self._links[name] = link
            log.debug("link_seen", ifname=name, up=link["up"])
            self._emit(Upsert(self.name, "Link", name, link))
