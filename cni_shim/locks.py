"""A lock per key (container id, pod) whose table holds only keys someone uses.

ipamd serialises requests per container and per pod. A plain dict of locks grew
by one entry for every container the node ever saw; here an entry lives only
while a thread holds or waits for it, so the table is as large as the number of
requests in flight.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[str, list] = {}  # key -> [lock, holders and waiters]

    @contextmanager
    def hold(self, key: str, blocking: bool = True) -> Iterator[bool]:
        """Hold the lock for key; yields False (without holding it) if not blocking and busy."""
        with self._guard:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [threading.Lock(), 0]
            entry[1] += 1
        got = False
        try:
            got = entry[0].acquire(blocking)
            yield got
        finally:
            if got:
                entry[0].release()
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        with self._guard:
            return len(self._entries)
