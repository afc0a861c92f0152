"""The run's lease: one trainer at a time, named when refused; a crashed holder's expires;
taken by compare-and-swap on a local folder and on a real S3 server (moto)."""

import json
import os
import socket
import threading
import time

import pytest
from test_storage import storage_config

from polyinr.core.errors import TRANSIENT, LeaseHeld, exit_code
from polyinr.core.storage import Folder
from polyinr.training import lease
from polyinr.training.lease import LEASE, Lease


def local_folder(tmp_path) -> Folder:
    return Folder(storage_config(str(tmp_path / "ckpt")), "run")


def test_a_second_trainer_is_refused_naming_the_holder_and_since_when(tmp_path):
    """While one Lease holds the run, another raises LeaseHeld (exit 75) naming host, pid and
    the time it was taken; once released, the other takes it."""
    first, second = Lease(local_folder(tmp_path)), Lease(local_folder(tmp_path))
    first.acquire("run")
    try:
        with pytest.raises(LeaseHeld) as error:
            second.acquire("run")
        message = str(error.value)
        assert f"{socket.gethostname()} pid {os.getpid()} since " in message
        assert lease._stamp(first.since) in message and "\n" not in message
        assert exit_code(error.value) == TRANSIENT
    finally:
        first.release()
    assert not (tmp_path / "ckpt/run" / LEASE).exists()
    second.acquire("run")
    second.release()


@pytest.mark.parametrize("how", ["expired", "dead pid"])
def test_a_crashed_holders_lease_is_taken_without_a_hand_edit(tmp_path, how):
    """A lease whose holder died (another host: once it expires; this host: its pid is gone)
    is taken over by the next trainer."""
    folder = local_folder(tmp_path)
    now = time.time()
    if how == "expired":
        holder = {"host": "elsewhere", "pid": 1, "since": now - 900, "expires": now - 1}
    else:
        holder = {"host": socket.gethostname(), "pid": 2**22 + 1, "since": now, "expires": now + 99}
    folder.put(LEASE, json.dumps(holder | {"token": "old", "heartbeat": now}).encode())
    taker = Lease(folder)
    taker.acquire("run")
    assert json.loads(folder.get(LEASE))["token"] == taker.token
    taker.release()


def test_a_live_holder_on_another_host_is_not_taken_over(tmp_path):
    """A lease of another host that has not expired is respected (its pid means nothing here)."""
    folder = local_folder(tmp_path)
    now = time.time()
    holder = {
        "host": "elsewhere",
        "pid": 2**22 + 1,
        "token": "x",
        "since": now,
        "expires": now + 60,
    }
    folder.put(LEASE, json.dumps(holder | {"heartbeat": now}).encode())
    with pytest.raises(LeaseHeld, match="elsewhere pid"):
        Lease(folder).acquire("run")


def test_the_holder_renews_and_a_waiter_takes_over_when_it_is_released(tmp_path, monkeypatch):
    """With a 0.6 s lease, the holder's heartbeat keeps it past its first expiry; a trainer
    started with --wait takes it once the holder releases."""
    monkeypatch.setattr(lease, "WAIT_POLL_S", 0.1)
    holder, waiter = Lease(local_folder(tmp_path), ttl=0.6), Lease(local_folder(tmp_path))
    holder.acquire("run")
    first_beat = json.loads(local_folder(tmp_path).get(LEASE))["heartbeat"]
    got = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire("run", wait=True)))
    thread.start()
    time.sleep(1.5)  # more than two lease lengths: only renewals keep it
    assert not got and json.loads(local_folder(tmp_path).get(LEASE))["heartbeat"] > first_beat
    holder.release()
    thread.join(timeout=30)
    assert got == [None] and json.loads(local_folder(tmp_path).get(LEASE))["token"] == waiter.token
    waiter.release()


def racers(make_folder, n: int = 6) -> list[bool]:
    """n Leases that try to take one free lease at the same moment: who got it."""
    leases = [Lease(make_folder()) for _ in range(n)]
    barrier, won = threading.Barrier(n), [False] * n

    def race(i):
        barrier.wait()
        won[i] = leases[i].try_acquire() is None

    threads = [threading.Thread(target=race, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_trainers_starting_together_on_a_local_folder_elect_one(tmp_path):
    """Six trainers that take a free local lease at once: exactly one holds it."""
    assert sum(racers(lambda: local_folder(tmp_path))) == 1


@pytest.mark.slow
def test_s3_conditional_puts_are_honoured_and_elect_one(s3_env, s3_bucket):
    """moto's server honours If-None-Match: * and If-Match (a stale swap is refused), so six
    trainers racing for a lease on S3 elect one, and a second trainer is refused."""
    cfg = storage_config(f"s3://{s3_bucket}/prefix", s3_env)
    folder = Folder(cfg, "run")
    assert folder.swap("x", b"1", None) and not folder.swap("x", b"2", None)
    assert not folder.swap("x", b"2", b"0") and folder.swap("x", b"2", b"1")
    assert folder.get("x") == b"2" and folder.swap("x", None, b"2") and folder.get("x") is None
    assert sum(racers(lambda: Folder(cfg, "run"))) == 1
    folder.delete(LEASE)
    first = Lease(Folder(cfg, "run"))
    first.acquire("run")
    with pytest.raises(LeaseHeld, match=f"s3://{s3_bucket}/prefix/run/{LEASE}"):
        Lease(Folder(cfg, "run")).acquire("run")
    first.release()
    assert folder.get(LEASE) is None
