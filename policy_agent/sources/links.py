"""Link monitor: pod interfaces (our prefix) appearing and disappearing, via netlink.

Subscribes to RTNLGRP_LINK first, then dumps the links (so nothing falls in
between), emits Replace("Link") + InSync, then Upsert/Delete per change of an
interface whose name starts with the prefix. Runs in its own thread with its own
asyncio loop (pyroute2's AsyncIPRoute); with ``netns`` the netlink socket lives
in that named namespace. If the socket fails, it reconnects with backoff and
re-dumps (Replace), so a missed event cannot leave a stale link.

Link objects are plain dicts: {"ifname", "index", "up"}.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import structlog

from policy_agent.sources.events import Delete, InSync, Replace, Sink, SourceError, Upsert

log = structlog.get_logger(__name__)

IFF_UP = 0x1


def _link(msg: Any) -> dict[str, Any] | None:
    name = msg.get("ifname") or msg.get_attr("IFLA_IFNAME")
    if not name:
        return None
    return {"ifname": name, "index": int(msg.get("index")), "up": bool(msg.get("flags", 0) & IFF_UP)}


class LinkSource:
    def __init__(self, prefix: str, netns: str = "", name: str = "links") -> None:
        self.prefix = prefix
        self.netns = netns
        self.name = name
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
            loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(10)

    def _thread_main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._task = loop.create_task(self._run())
            self._started.set()
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self._started.set()
            loop.close()

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
                await ipr.bind()
                links = {}
                async for msg in await ipr.link("dump"):
                    link = _link(msg)
                    if link and link["ifname"].startswith(self.prefix):
                        links[link["ifname"]] = link
                self._links = links
                self._emit(Replace(self.name, "Link", dict(links)))
                self._emit(InSync(self.name))
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
