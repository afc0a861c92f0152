"""A lease per run: one trainer of `<storage.uri>/<run name>` at a time; a crashed one's expires.

The lease is the object `lease.json` beside the checkpoints: its holder (host, pid), since
when, the last heartbeat and when it expires. It is taken and renewed by compare-and-swap
(`Folder.swap`: an flock locally, If-None-Match / If-Match on S3), so two trainers that
start together cannot both win. A server that ignores conditional requests is caught by
reading the lease back after each write (the documented fallback, docs/faults.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator

from polyinr.core import distributed
from polyinr.core.errors import LeaseHeld
from polyinr.core.storage import Folder

LEASE = "lease.json"
TTL_S = 180.0  # a lease not renewed for this long is expired: its holder died
WAIT_POLL_S = 10.0  # `--wait`: how often a waiting trainer looks again


def _now() -> float:
    return time.time()


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class Lease:
    """This process's claim on one run's folder: acquire, renew in the background, release."""

    def __init__(self, folder: Folder, ttl: float | None = None):
        self.folder, self.ttl = folder, ttl or TTL_S
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.body: bytes | None = None  # what the lease object holds while we hold it
        self.since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _make(self) -> bytes:
        now = _now()
        record = {"host": self.host, "pid": self.pid, "token": self.token, "since": self.since}
        return json.dumps(record | {"heartbeat": now, "expires": now + self.ttl}).encode()

    def _current(self) -> tuple[bytes | None, dict | None]:
        raw = self.folder.get(LEASE)
        try:
            return raw, json.loads(raw) if raw else None
        except ValueError:  # a torn or foreign file: treat as expired
            return raw, {"expires": 0.0}

    def _dead(self, holder: dict) -> bool:
        """Expired, or held by a process of this host that no longer exists."""
        if holder.get("expires", 0.0) < _now():
            return True
        if holder.get("host") != self.host or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def try_acquire(self) -> dict | None:
        """Take the lease if it is free or dead; None when taken, else the live holder."""
        raw, holder = self._current()
        if holder is not None and not self._dead(holder):
            return holder
        self.since = _now()
        body = self._make()
        if not self.folder.swap(LEASE, body, raw):
            return self._current()[1] or {}  # someone else won the swap
        if self.folder.get(LEASE) != body:  # a server that ignored the condition
            return self._current()[1] or {}
        self.body = body
        return None

    def acquire(self, run: str, wait: bool = False) -> None:
        """Hold the lease, or raise LeaseHeld naming the holder (with `wait`: poll until free)."""
        told = False
        while (holder := self.try_acquire()) is not None:
            line = (
                f"run {run} is being trained by {holder.get('host', '?')} pid "
                f"{holder.get('pid', '?')} since {_stamp(holder.get('since', 0.0))} (lease "
                f"{self.folder.uri}/{LEASE}, expires {_stamp(holder.get('expires', 0.0))} "
                "unless renewed)"
            )
            if not wait:
                raise LeaseHeld(f"{line}; rerun later, or with --wait to wait for it")
            if not told:
                print(f"{line}; waiting (--wait)", file=sys.stderr)
                told = True
            time.sleep(min(WAIT_POLL_S, max(holder.get("expires", 0.0) - _now(), 0.1)))
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        """Renew the lease every ttl/4 until released; say so once if it was taken over."""
        while not self._stop.wait(self.ttl / 4):
            body = self._make()
            try:
                renewed = self.folder.swap(LEASE, body, self.body)
            except Exception as e:  # storage trouble: the next beat tries again
                print(f"warning: lease renewal failed ({e})", file=sys.stderr)
                continue
            if not renewed:
                holder = self._current()[1] or {}
                print(
                    f"warning: the lease {self.folder.uri}/{LEASE} was taken over by "
                    f"{holder.get('host', '?')} pid {holder.get('pid', '?')}",
                    file=sys.stderr,
                )
                self.body = None
                return
            self.body = body

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.body is not None:
            with contextlib.suppress(Exception):  # an expired lease is as good as released
                self.folder.swap(LEASE, None, self.body)
            self.body = None


@contextlib.contextmanager
def held(cfg, wait: bool = False) -> Iterator[Lease | None]:
    """The run's lease for the block, held by rank 0 (the one that writes); every rank raises
    LeaseHeld when rank 0 cannot have it."""
    rank, world = distributed.rank_world()
    lease = None
    if rank == 0:
        folder = Folder(cfg.storage, cfg.tracking.run_name)
        lease = Lease(folder)

    def take():
        lease.folder.check()  # storage errors in their own words, before the lease's
        lease.acquire(cfg.tracking.run_name, wait)

    distributed.on_rank0(take, rank, world)
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()
