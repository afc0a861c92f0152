"""The torchrun process group: joining it, what each rank draws, all-reducing gradients,
rank-0 work, pre-emption.

Gradients are all-reduced by hand after each phase instead of wrapping G and D in DDP: the
G step backpropagates through a D whose parameters are frozen for that phase, the D step
runs G without gradients, and D holds frozen feature networks; DDP would need
find_unused_parameters, two wrappers and no_sync for accumulation rounds to cope. One flat
all-reduce per phase does the same work with one collective.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import threading

import numpy as np
import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def positions(round_: int, rank: int, world: int, batch_gpu: int) -> torch.Tensor:
    """Positions in the global batch of this rank's samples in accumulation round `round_`.

    The distributed loader deals the epoch's order to ranks in turn (sample i to rank i % W,
    data.EpochOrder), so rank r's j-th sample of a round is global sample
    round * W * b + j * W + r: the union over ranks and rounds is one single-process batch.
    """
    return round_ * world * batch_gpu + torch.arange(batch_gpu) * world + rank


def all_reduce_grads(params, world: int) -> None:
    """Average gradients over ranks in one flat all-reduce; then, as the reference, NaN
    entries become 0 and +-inf +-1e5 (docs/model.md section 4)."""
    params = list(params)
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if world > 1:
        dist.all_reduce(flat)
        flat /= world
    torch.nan_to_num_(flat, nan=0.0, posinf=1e5, neginf=-1e5)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


def broadcast(module: torch.nn.Module, world: int) -> None:
    """Rank 0's parameters and buffers everywhere, so all ranks start from identical weights."""
    if world > 1:
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def gather_labels(labels: list[torch.Tensor], world: int) -> torch.Tensor:
    """Every rank's labels of all rounds, in global-batch order (see positions): (N,)."""
    if world == 1:
        return torch.cat(labels)
    out = []
    for c in labels:
        parts = [torch.empty_like(c) for _ in range(world)]
        dist.all_gather(parts, c)
        out.append(torch.stack(parts, dim=1).reshape(-1))  # (b, W) -> j * W + r
    return torch.cat(out)


def from_rank0(value):
    """Rank 0's `value` on every rank (any picklable object); `value` itself outside torchrun.

    Multi-node: only the first node reads params; the others follow (`polyinr train --follow`).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn, rank: int, world: int):
    """Run fn on rank 0 and hand its result to all ranks; if it fails, every rank raises.

    The other ranks raise rank 0's error rebuilt (its class, "rank 0 failed: ..."), so a
    caller's `except` sees the same error on every rank.
    """
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks are told
            error = e
    if world > 1:
        box = [None if error is None else _as_told(error), result]
        dist.broadcast_object_list(box, src=0)
        if rank > 0 and box[0] is not None:
            raise box[0]
        result = box[1]
    if error is not None:
        raise error
    return result


def _as_told(error: Exception) -> Exception:
    """Rank 0's `error` for the other ranks: the same class and attributes with the message
    "rank 0 failed: ...", or a RuntimeError with that message when it does not survive a
    pickle round trip (broadcast_object_list pickles it; a receiver must be able to unpickle)."""
    message = f"rank 0 failed: {error}"
    try:
        told = type(error).__new__(type(error))
        told.__dict__.update(vars(error))
        told.args = (message,)
        pickle.loads(pickle.dumps(told))
    except Exception:  # an unpicklable attribute, a constructor that needs other arguments
        return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
    return told


class StopFlag:
    """Set by SIGTERM (pre-emption): the loop checkpoints at the next iteration and stops."""

    def __init__(self):
        self.set, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def any_rank(self, world: int, device) -> bool:
        """Whether any rank was asked to stop (all ranks must stop at the same iteration)."""
        if world == 1:
            return self.set
        flag = torch.tensor([int(self.set)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def mean_over_ranks(values: np.ndarray, world: int, device) -> np.ndarray:
    """Average per-rank numbers (losses) over ranks: only for logging."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).cpu().numpy()


def setup() -> torch.device:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs); returns this rank's device.

    Any torchrun launch joins a group, even with one process.
    """
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def mix(*numbers: int) -> int:
    """One 63-bit seed from several integers (seed, rank, cur_nimg, ...)."""
    h = 0
    for n in numbers:
        h = (h * 1_000_003 + int(n) + 7_919) % (2**63 - 1)
    return h


def reseed(seed: int, rank: int, cur_nimg: int) -> None:
    # The global RNG (DiffAugment's draws) is a function of (seed, rank, cur_nimg), so a
    # resumed run draws what an uninterrupted one would have at the same cur_nimg.
    torch.manual_seed(mix(seed, rank, cur_nimg))


def draws(seed: int, cur_nimg: int, batch: int, z_dim: int):
    """Per global sample: G-step latents (N, z_dim) and D-step latents (N, z_dim).

    Drawn from (seed, cur_nimg) alone, so every rank and every world size agrees on them.
    """
    gen = torch.Generator().manual_seed(mix(seed, cur_nimg))
    return torch.randn(batch, z_dim, generator=gen), torch.randn(batch, z_dim, generator=gen)


def rng_states() -> dict:
    """This process's torch, CUDA, numpy and Python RNG states, as weights_only-safe types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])


def all_rng_states(world: int) -> list[dict]:
    """Every rank's RNG states, by rank (a collective: all ranks call it)."""
    if world == 1:
        return [rng_states()]
    states = [None] * world
    dist.all_gather_object(states, rng_states())
    return states
