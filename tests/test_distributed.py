"""Tests for polyinr.core.distributed in a real 2-process gloo group."""

import torch.distributed as dist
import torch.multiprocessing as mp

from polyinr.core import distributed
from polyinr.core.storage import StorageError


class TwoArgumentError(Exception):
    """An error that unpickling cannot rebuild: its constructor needs two arguments."""

    def __init__(self, what: str, code: int):
        super().__init__(f"{what} (code {code})")


def _missing_bucket():
    raise StorageError("bucket 'b' of storage.uri does not exist")


def _two_arguments():
    raise TwoArgumentError("disk full", 28)


def _on_rank0_worker(rank: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    seen = []
    for fn in (_missing_bucket, _two_arguments, lambda: f"made by rank {rank}"):
        try:
            seen.append(("returned", distributed.on_rank0(fn, rank, 2)))
        except Exception as e:
            seen.append((type(e).__name__, str(e)))
    queue.put((rank, seen))
    dist.destroy_process_group()


def test_other_ranks_raise_rank0s_error_class_saying_it_came_from_rank0(tmp_path):
    """A rank-0 failure is raised on rank 1 as the same class with "rank 0 failed: ...", or as
    a RuntimeError naming the class when it cannot be rebuilt; a result reaches every rank."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    init = str(tmp_path / "init")
    procs = [ctx.Process(target=_on_rank0_worker, args=(r, init, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        seen = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert seen[0] == [
        ("StorageError", "bucket 'b' of storage.uri does not exist"),
        ("TwoArgumentError", "disk full (code 28)"),
        ("returned", "made by rank 0"),
    ]
    assert seen[1] == [
        ("StorageError", "rank 0 failed: bucket 'b' of storage.uri does not exist"),
        ("RuntimeError", "rank 0 failed: TwoArgumentError: disk full (code 28)"),
        ("returned", "made by rank 0"),
    ]
