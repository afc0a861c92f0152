"""The FFCV training loader: seeded per (seed, epoch), resumable mid-epoch, one disjoint
share per rank."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from polyinr.core.distributed import rank_world
from polyinr.core.errors import DataError
from polyinr.data.convert import check_file

# ----------------------------------------------------------------------------- loading


class EpochOrder:
    """This rank's share of a permutation drawn from (seed, epoch), and the flips to apply.

    Ranks take interleaved, equal-length slices of one permutation (disjoint; together the
    whole file when its size divides by the world size). `skip` batches at the start of
    the next epoch served are left out, which is how a resumed run continues mid-epoch.
    Also a ffcv TraversalOrder: ffcv builds orders by calling them with the Loader.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, drop_last: bool):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.skip = 0

    def __call__(self, loader):
        return self

    def share(self, epoch: int) -> np.ndarray:
        """Indices this rank reads in `epoch`, in order: (n // world [rounded to batches],)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        share = perm[self.rank :: self.world][: self.n // self.world]
        if self.drop_last:
            share = share[: len(share) // self.batch_size * self.batch_size]
        return share

    def flips(self, epoch: int) -> np.ndarray:
        """Whether each image of the file is mirrored in `epoch`: (n,) bool."""
        return np.random.default_rng([self.seed, epoch, 1]).random(self.n) < 0.5

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.share(epoch)[self.skip * self.batch_size :].astype(np.uint64)


class Batches:
    """Iterable over (images in [-1, 1], int64 labels) batches of an FFCV file, one epoch per
    `for` loop, that knows its position (epoch, batch) and can start from any position."""

    def __init__(self, loader, order: EpochOrder, device: torch.device, mirror: bool):
        self.ffcv = loader  # the underlying ffcv.loader.Loader
        self.order, self.device, self.mirror = order, device, mirror
        self.epoch, self.batch = 0, 0
        self.per_epoch = -(-len(order.share(0)) // order.batch_size)

    def __len__(self) -> int:
        """Batches per epoch (of this rank)."""
        return self.per_epoch

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batches of it already served): where the next `for` loop starts."""
        if self.batch >= len(self):
            return self.epoch + 1, 0
        return self.epoch, self.batch

    def seek(self, epoch: int, batch: int) -> None:
        """Start the next `for` loop at batch `batch` of epoch `epoch`."""
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"no position (epoch {epoch}, batch {batch}): {len(self)} per epoch")
        self.epoch, self.batch = epoch, batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.position
        self.epoch, self.batch = epoch, start
        share, bs = self.order.share(epoch), self.order.batch_size
        flips = torch.from_numpy(self.order.flips(epoch)) if self.mirror else None
        self.order.skip, self.ffcv.next_epoch = start, epoch
        for k, (images, labels) in enumerate(self.ffcv, start):
            if flips is not None:  # mirror on uint8: a quarter of the memory traffic of float
                flip = flips[torch.from_numpy(share[k * bs : (k + 1) * bs])]
                flip = flip.to(self.device, non_blocking=True)[:, None, None, None]
                images = torch.where(flip, images.flip(3), images)  # (B, 3, R, R) uint8
            # A new tensor (ffcv reuses its buffers), scaled from uint8 to [-1, 1].
            x = images.to(torch.float32).div_(127.5).sub_(1.0)  # (B, 3, R, R)
            self.batch = k + 1
            yield x, labels.reshape(-1).to(torch.int64, copy=True)  # (B,)
        self.epoch, self.batch = epoch + 1, 0


def _pipelines(device: torch.device) -> dict:
    """FFCV pipelines producing uint8 NCHW images and labels on `device`."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    # No NormalizeImage: on the CPU, ToTensor -> ToTorchImage -> NormalizeImage hangs inside
    # ffcv's Loader, so scaling to [-1, 1] happens in torch (Batches.__iter__). Flips happen
    # there too: ffcv's RandomHorizontalFlip draws from an unseeded generator.
    image = [SimpleRGBImageDecoder(), ToTensor(), ToDevice(device, non_blocking=True)]
    image += [ToTorchImage(channels_last=False)]
    label = [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True)]
    return {"image": image, "label": label}


def make_loader(
    path,
    batch_size: int,
    seed: int,
    device,
    *,
    mirror: bool = True,
    distributed: bool = False,
    workers: int = 2,
    drop_last: bool = True,
) -> Batches:
    """Shuffled training batches from an FFCV file, epoch e in an order drawn from (seed, e);
    each rank its own disjoint share when `distributed` (torch.distributed initialised)."""
    from ffcv.loader import Loader
    from ffcv.reader import Reader
    from ffcv.traversal_order.base import TraversalOrder

    TraversalOrder.register(EpochOrder)  # ffcv accepts only (virtual) TraversalOrder instances

    check_file(path)
    device = torch.device(device)  # ToDevice rejects strings
    if distributed and not torch.distributed.is_initialized():
        raise DataError("distributed=True needs an initialised torch.distributed process group")
    rank, world = rank_world() if distributed else (0, 1)
    n = int(Reader(str(path)).num_samples)
    if n // world < (batch_size if drop_last else 1):
        raise DataError(
            f"{path} holds {n} images: too few for {world} rank(s) x batch {batch_size}"
        )
    order = EpochOrder(n, batch_size, seed, rank, world, drop_last)
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=workers,
        order=order,
        seed=seed,
        drop_last=drop_last,
        pipelines=_pipelines(device),
    )
    return Batches(loader, order, device, mirror)


def read_all(
    path, batch_size: int = 256, workers: int = 2
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of an FFCV file in file order as uint8 (B, 3, R, R) with int64 labels."""
    from ffcv.loader import Loader, OrderOption

    check_file(path)
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=workers,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines=_pipelines(torch.device("cpu")),
    )
    for images, labels in loader:
        # ffcv reuses its output buffers, so both tensors are copied before yielding.
        yield images.clone(), labels.reshape(-1).to(torch.int64, copy=True)
