"""Feature statistics over one pass of images, split over torchrun ranks.

Sums are accumulated in float64 and all-reduced; kept rows are gathered in global index
order, so a result does not depend on the number of ranks.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from polyinr.core.distributed import rank_world
from polyinr.core.storage import write_atomic


class FeatureStats:
    """Running float64 sum and sum of outer products of feature vectors."""

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.sum = None if dim is None else np.zeros(dim)
        self.outer = None if dim is None else np.zeros((dim, dim))

    def add(self, feats: np.ndarray) -> None:
        """Accumulate a batch of features (N, D)."""
        x = np.asarray(feats, dtype=np.float64)
        if self.sum is None:
            self.sum = np.zeros(x.shape[1])
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def all_reduce(self) -> FeatureStats:
        """Sum n, sum and outer over torchrun ranks (a no-op in a single process)."""
        if not distributed():
            return self
        dim = int(all_reduce(np.array([0 if self.sum is None else len(self.sum)]), "max")[0])
        if self.sum is None:
            self.sum, self.outer = np.zeros(dim), np.zeros((dim, dim))
        self.n = int(all_reduce(np.array([self.n], np.float64))[0])
        self.sum = all_reduce(self.sum)
        self.outer = all_reduce(self.outer)
        return self

    def mean_cov(self, ddof: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and covariance (D, D) normalised by 1/(N - ddof)."""
        if self.n <= ddof:
            raise ValueError(f"need more than {ddof} samples, have {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - ddof)
        return mu, sigma


# Distributed helpers: sums are all-reduced, rows gathered in global index order.


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_share(num_images: int, batch: int) -> int:
    """Images in this rank's batches: every world-th batch of `batch`, from batch `rank`."""
    rank, world = rank_world()
    starts = range(rank * batch, num_images, world * batch)
    return sum(min(batch, num_images - start) for start in starts)


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(x: np.ndarray, op: str = "sum") -> np.ndarray:
    t = torch.as_tensor(np.asarray(x, np.float64), device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().numpy()


def _gather_rows(index: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows (n, dim) of every rank with their global indices (n,) -> all rows in index order."""
    if not distributed():
        return rows[np.argsort(index, kind="stable")]
    device, world = _comm_device(), dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(index)], device=device))
    most = max(int(c) for c in counts)
    # all_gather needs equal shapes: pad every rank's indices and rows to the largest count.
    mine_index = torch.zeros(most, dtype=torch.int64, device=device)
    mine_index[: len(index)] = torch.as_tensor(index, dtype=torch.int64)
    mine_rows = torch.zeros(most, dim, dtype=torch.float32, device=device)
    mine_rows[: len(index)] = torch.as_tensor(rows, dtype=torch.float32)
    all_index = [torch.empty_like(mine_index) for _ in range(world)]
    all_rows = [torch.empty_like(mine_rows) for _ in range(world)]
    dist.all_gather(all_index, mine_index)
    dist.all_gather(all_rows, mine_rows)
    index = torch.cat([t[: int(c)] for t, c in zip(all_index, counts, strict=True)])
    rows = torch.cat([t[: int(c)] for t, c in zip(all_rows, counts, strict=True)])
    return rows[torch.argsort(index, stable=True)].cpu().numpy()


class PartialPass:
    """A pass's running sums and rows on disk, so that an interrupted pass resumes.

    One file per rank (`<stem>.partial-<rank>of<world>.npz`), saved at most every `every`
    seconds of computing; a different world size starts over.
    """

    def __init__(self, stem: Path, every: float = 60.0):
        rank, world = rank_world()
        self.path = Path(f"{stem}.partial-{rank}of{world}.npz")
        self.every = every

    def load(self, stats_keys, row_keys):
        """(batches done, stats, [index], rows) as saved, or None."""
        if not self.path.is_file():
            return None
        with np.load(self.path, allow_pickle=False) as z:
            stats = {}
            for k in stats_keys:
                s = stats[k] = FeatureStats()
                s.n, s.sum, s.outer = int(z[f"n_{k}"]), z[f"sum_{k}"], z[f"outer_{k}"]
            rows = {k: [z[f"rows_{k}"]] for k in row_keys}
            return int(z["done"]), stats, [z["index"]], rows

    def save(self, done: int, stats, index, rows) -> None:
        arrays = {"done": np.array(done), "index": np.concatenate(index)}
        for k, s in stats.items():
            arrays |= {f"n_{k}": np.array(s.n), f"sum_{k}": s.sum, f"outer_{k}": s.outer}
        arrays |= {f"rows_{k}": np.concatenate(r) for k, r in rows.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with write_atomic(self.path) as tmp, tmp.open("wb") as f:
            np.savez(f, **arrays)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def accumulate(
    batches, nets, names, stats_keys, row_keys, keep, desc, progress, total=None, partial=None
):
    """One pass over this rank's (start index, uint8 images) batches through networks `names`.

    Returns ({key: FeatureStats} all-reduced for `stats_keys`, {key: rows (M, D)} for
    `row_keys`: the rows whose global index passes `keep`, from every rank in index order).
    `total`: this rank's image count, for the progress bar's ETA. `partial` (a PartialPass):
    resume from its saved state, skipping the batches it holds, and save as the pass goes.
    """
    rank, _ = rank_world()
    stats = {k: FeatureStats() for k in stats_keys}
    index, rows = [], {k: [] for k in row_keys}
    done, skipped, bar = 0, 0, None
    saved = partial.load(stats_keys, row_keys) if partial is not None else None
    if saved is not None:
        done, stats, index, rows = saved
    last_save = time.monotonic()
    for b, (start, images) in enumerate(batches):
        if b < done:  # computed before the interruption: read (cheap), not recomputed
            skipped += len(images)
            continue
        if bar is None:
            disable = not progress or rank > 0
            bar = tqdm(total=total, initial=skipped, desc=desc, unit="img", disable=disable)
        feats = nets.features(images, names)
        for key, s in stats.items():
            s.add(feats[key])
        selected = np.flatnonzero(keep(np.arange(start, start + len(images))))
        index.append(start + selected)
        for key in row_keys:
            rows[key].append(feats[key][selected].astype(np.float32))
        done = b + 1
        bar.update(len(images))
        if partial is not None and time.monotonic() - last_save >= partial.every:
            partial.save(done, stats, index, rows)
            last_save = time.monotonic()
    if bar is not None:
        bar.close()
    stats = {key: s.all_reduce() for key, s in stats.items()}
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    for key in row_keys:
        dim = rows[key][0].shape[1] if rows[key] else 0
        if distributed():
            dim = int(all_reduce(np.array([dim]), "max")[0])
        mine = np.concatenate(rows[key]) if rows[key] else np.zeros((0, dim), np.float32)
        rows[key] = _gather_rows(index, mine, dim)
    return stats, rows
