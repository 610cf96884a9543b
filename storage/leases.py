"""Batch leases: two runs filling the same signal at once never pay for the same example.

A process that is about to compute a batch writes a *lease* (the batch's uids, its host and pid,
an expiry) into ``signals/<signal_id>/.leases/`` while holding an exclusive ``flock`` on the
folder's lock file, and removes it once the batch's part is on disk. Another process claiming a
batch under the same lock skips the uids leased by a live holder and drops the uids that parts
written since it looked already hold. A lease stops counting when its holder is gone: a process
on this host that no longer runs (kill -9: no waiting), or, for any host, when it expires.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HOST = socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


class Leases:
    """The leases of one signal folder. ``ttl_s`` bounds how long a holder on another host (whose
    pid cannot be checked) keeps its batch after it stopped answering."""

    def __init__(self, folder: Path, ttl_s: float = 3600.0):
        self.folder = folder / ".leases"
        self.ttl_s = ttl_s

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The folder's exclusive lock (held for milliseconds: reading and writing lease files)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "lock").open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def held_by_others(self) -> set[str]:
        """The uids leased by live holders other than this process (call under :meth:`locked`);
        leases of dead or expired holders are removed."""
        leased: set[str] = set()
        now = time.time()
        for path in self.folder.glob("lease-*.json"):
            try:
                lease = json.loads(path.read_text())
            except (OSError, ValueError):  # being written or removed by its holder right now
                continue
            mine = lease["host"] == HOST and lease["pid"] == os.getpid()
            dead = lease["host"] == HOST and not _alive(lease["pid"])
            if dead or lease["expires"] < now:
                path.unlink(missing_ok=True)
            elif not mine:
                leased.update(lease["uids"])
        return leased

    def take(self, uids: Sequence[str]) -> Path:
        """Write a lease on ``uids`` for this process (call under :meth:`locked`)."""
        path = self.folder / f"lease-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        tmp = path.with_name("." + path.name)
        tmp.write_text(json.dumps({"host": HOST, "pid": os.getpid(), "expires": time.time() + self.ttl_s,
                                   "uids": list(uids)}))
        tmp.rename(path)
        return path

    @staticmethod
    def release(lease: Path) -> None:
        lease.unlink(missing_ok=True)
