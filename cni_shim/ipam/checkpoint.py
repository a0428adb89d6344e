"""The pool's checkpoint: one JSON file, written atomically, guarded by a lock file.

The daemon holds an exclusive flock on ``ipam.lock`` for its whole life, so two
daemons can never write the same state dir; within the daemon, callers hold the
pool lock while they change the pool and save.
"""

from __future__ import annotations

import fcntl
import json
import os

from policy_agent.shared.endpoint import atomic_write

CHECKPOINT_FILE = "ipam.json"
LOCK_FILE = "ipam.lock"


class CheckpointLocked(RuntimeError):
    pass


class Checkpoint:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, CHECKPOINT_FILE)
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.state_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointLocked(f"state dir {self.state_dir} is locked by another vpcip-ipamd") from None
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def save(self, data: dict) -> None:
        if self._lock_fd is None:
            raise RuntimeError("checkpoint written without holding the state-dir lock")
        atomic_write(self.path, json.dumps(data, sort_keys=True, indent=1), mode=0o600)
