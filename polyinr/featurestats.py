"""Feature statistics over one pass of images, split over torchrun ranks.

Sums are accumulated in float64 and all-reduced; kept rows are gathered in global index
order, so a result does not depend on the number of ranks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


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


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


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


def accumulate(batches, nets, names, stats_keys, row_keys, keep, desc, progress):
    """One pass over this rank's (start index, uint8 images) batches through networks `names`.

    Returns ({key: FeatureStats} all-reduced for `stats_keys`, {key: rows (M, D)} for
    `row_keys`: the rows whose global index passes `keep`, from every rank in index order).
    """
    rank, _ = rank_world()
    stats = {k: FeatureStats() for k in stats_keys}
    index, rows = [], {k: [] for k in row_keys}
    for start, images in tqdm(batches, desc=desc, disable=not progress or rank > 0):
        feats = nets.features(images, names)
        for key, s in stats.items():
            s.add(feats[key])
        selected = np.flatnonzero(keep(np.arange(start, start + len(images))))
        index.append(start + selected)
        for key in row_keys:
            rows[key].append(feats[key][selected].astype(np.float32))
    stats = {key: s.all_reduce() for key, s in stats.items()}
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    for key in row_keys:
        dim = rows[key][0].shape[1] if rows[key] else 0
        if distributed():
            dim = int(all_reduce(np.array([dim]), "max")[0])
        mine = np.concatenate(rows[key]) if rows[key] else np.zeros((0, dim), np.float32)
        rows[key] = _gather_rows(index, mine, dim)
    return stats, rows
