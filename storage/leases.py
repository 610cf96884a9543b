"""Batch leases: two runs filling the same signal at once never pay for the same example.

A process that is about to compute a batch writes a *lease* (the batch's uids, its host and pid,
an expiry) into ``signals/<signal_id>/.leases/`` while holding an exclusive ``flock`` on the
folder's lock file, and removes it once the batch's part is on disk. Another process claiming a
batch under the same lock skips the uids leased by a live holder and drops the uids that parts
written since it looked already hold. A lease stops counting when its holder is gone: a process
on this host that no longer runs (kill -9: no waiting), or, for any host, when it expires.

On an object store (an fsspec filesystem, ``fs``) there is no ``flock``: the folder's lock is an
object created only if absent (S3's conditional PUT, ``If-None-Match: *``), removed on release, and
taken over when a holder left it for longer than ``LOCK_STALE_S`` (it is held for milliseconds).
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
from typing import Any

from .fs import no_space

HOST = socket.gethostname()
LOCK_STALE_S = 30.0


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
    pid cannot be checked) keeps its batch after it stopped answering. ``fs``: the fsspec filesystem
    of a remote folder (None: a local folder)."""

    def __init__(self, folder: Path | str, ttl_s: float = 3600.0, fs: Any = None):
        self.fs = fs
        self.folder = folder / ".leases" if fs is None else f"{folder}/.leases"
        self.ttl_s = ttl_s

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The folder's exclusive lock (held for milliseconds: reading and writing lease files)."""
        if self.fs is not None:
            with self._remote_lock():
                yield
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "lock").open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @contextmanager
    def _remote_lock(self) -> Iterator[None]:
        lock = f"{self.folder}/lock"
        while True:
            try:
                with self.fs.open(lock, "xb") as f:
                    f.write(json.dumps({"host": HOST, "pid": os.getpid(), "at": time.time()}).encode())
                break
            except FileExistsError:
                try:
                    held = json.loads(self.fs.cat_file(lock))
                except (FileNotFoundError, ValueError):
                    continue
                if time.time() - held["at"] > LOCK_STALE_S:
                    self.fs.rm_file(lock)
                time.sleep(0.05)
        try:
            yield
        finally:
            self.fs.rm_file(lock)

    def _files(self) -> list[Path | str]:
        if self.fs is None:
            return list(self.folder.glob("lease-*.json"))
        return self.fs.glob(f"{self.folder}/lease-*.json")

    def _remove(self, path: Path | str) -> None:
        if self.fs is None:
            path.unlink(missing_ok=True)
        elif self.fs.exists(path):
            self.fs.rm_file(path)

    def held_by_others(self) -> set[str]:
        """The uids leased by live holders other than this process (call under :meth:`locked`);
        leases of dead or expired holders are removed."""
        leased: set[str] = set()
        now = time.time()
        for path in self._files():
            try:
                lease = json.loads(path.read_text() if self.fs is None else self.fs.cat_file(path))
            except (OSError, ValueError):  # being written or removed by its holder right now
                continue
            mine = lease["host"] == HOST and lease["pid"] == os.getpid()
            dead = lease["host"] == HOST and not _alive(lease["pid"])
            if dead or lease["expires"] < now:
                self._remove(path)
            elif not mine:
                leased.update(lease["uids"])
        return leased

    def take(self, uids: Sequence[str]) -> Path | str:
        """Write a lease on ``uids`` for this process (call under :meth:`locked`)."""
        name = f"lease-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        text = json.dumps({"host": HOST, "pid": os.getpid(), "expires": time.time() + self.ttl_s, "uids": list(uids)})
        if self.fs is not None:  # one PUT: never seen half written
            path = f"{self.folder}/{name}"
            self.fs.pipe_file(path, text.encode())
            return path
        path = self.folder / name
        tmp = path.with_name("." + path.name)
        try:
            tmp.write_text(text)
            tmp.rename(path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if (full := no_space(e, self.folder, "a batch lease")) is not None:
                raise full from e
            raise
        return path

    def release(self, lease: Path | str) -> None:
        self._remove(lease)
