"""Training iterations (one G and one D step): polyinr's generator vs the plain one, the step
vs the matmul limit of its own products, and the loop's bookkeeping vs a host read per step.

polyinr.training.loop.training_step with polyinr's generator or the plain version
(synthesis.fast=False: the levels as polyinr/model/generator.py defines them), at the demo's
width and the paper's. Each measurement runs in a fresh process so that its peak memory (RSS;
CUDA memory on a GPU) is its own. D is the demo's projected discriminator (params.yaml,
random frozen features) in every case: the width under test is the generator's.
"""

from __future__ import annotations

import collections
import multiprocessing
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import device, interleaved, peak_rss_mb, row, sync

DEMO_PARAMS, PAPER_PARAMS = "params.yaml", "configs/imagenet-256.yaml"
# (name, params file of the generator, resolution, batch); small batches at C = 1024.
CASES = {
    True: [("demo", DEMO_PARAMS, 32, 8), ("paper", PAPER_PARAMS, 32, 2)],
    False: [("demo", DEMO_PARAMS, 32, 32), ("paper", PAPER_PARAMS, 32, 4)],
}
GPU_CASES = [("demo", DEMO_PARAMS, 64, 64), ("paper", PAPER_PARAMS, 64, 16)]
TS = "train step"
aten = torch.ops.aten


def _setup(params: str, resolution: int, batch: int, plain: bool = False):
    """(step, G's width, D's head count): `step()` runs training_step once on fixed data with
    G at params' width, the demo's D and their Adam optimisers, and returns its numbers."""
    from polyinr.core.config import load
    from polyinr.model.discriminator import ProjectedDiscriminator
    from polyinr.model.generator import Generator
    from polyinr.training.loop import configure_backends, training_step

    configure_backends()
    dev = device()
    torch.manual_seed(0)
    cfg = load(params).generator
    g = Generator(cfg, resolution)
    g.synthesis.fast = not plain
    g = g.to(dev).train()
    num_classes = cfg.class_count
    d = ProjectedDiscriminator(load(DEMO_PARAMS).discriminator, resolution, num_classes).to(dev)
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-4, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=2e-4)
    images = torch.rand(batch, 3, resolution, resolution, device=dev) * 2 - 1
    labels = torch.arange(batch, device=dev) % max(num_classes, 1)
    reals = [(images, labels)]
    z = [torch.randn(batch, cfg.z_dim, device=dev)]

    def step() -> dict:
        return training_step(g, d, opt_g, opt_d, reals, z, z, sigma=1.0)

    return step, cfg.hidden, len(d.branches) * 4


def measure(params: str, resolution: int, batch: int, plain: bool, iters: int) -> dict:
    """Images/s (best of `iters` after one warm-up) and peak memory of training_step."""
    step, hidden, _ = _setup(params, resolution, batch, plain)
    dev = device()
    best = float("inf")
    for i in range(iters + 1):
        sync(dev)
        start = time.perf_counter()
        step()
        sync(dev)
        if i > 0:
            best = min(best, time.perf_counter() - start)
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    return {"img_s": batch / best, "rss_mb": peak_rss_mb(), "cuda_mb": cuda_mb, "hidden": hidden}


def _conv_product(x, w, out, transposed: bool, groups: int) -> tuple[int, int, int, int]:
    """(groups, M, K, N) of a convolution as im2col products [M, K] x [K, N] per group."""
    spatial = (x if transposed else out).shape[2:]
    m = x.shape[0] * int(np.prod(spatial))
    kernel = int(np.prod(w.shape[2:]))
    if transposed:  # w: (Cin, Cout/g, kh, kw); a matmul per input pixel, then col2im
        return groups, m, w.shape[0] // groups, w.shape[1] * kernel
    return groups, m, w.shape[1] * kernel, w.shape[0] // groups


class Products(TorchDispatchMode):
    """Records every matrix product that runs under it as (groups, M, K, N): mm, addmm, bmm,
    baddbmm, and convolutions forward and backward as their im2col products."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in (aten.mm, aten.addmm):
            a, b = args[-2:]
            self.shapes.append((1, a.shape[0], a.shape[1], b.shape[1]))
        elif packet in (aten.bmm, aten.baddbmm):
            a, b = args[-2:]
            self.shapes.append((a.shape[0], a.shape[1], a.shape[2], b.shape[2]))
        elif packet == aten.convolution:
            x, w, _, _, _, _, transposed, _, groups = args
            self.shapes.append(_conv_product(x, w, out, transposed, groups))
        elif packet == aten.convolution_backward:
            grad_out, x, w = args[:3]
            transposed, groups, mask = args[7], args[9], args[10]
            g, m, k, n = _conv_product(x, w, grad_out, transposed, groups)
            if mask[0]:  # grad of the input: [M, N] x [N, K]
                self.shapes.append((g, m, n, k))
            if mask[1]:  # grad of the weight: [K, M] x [M, N]
                self.shapes.append((g, k, m, n))
        return out


def _matmul_limit(shapes, dev):
    """torch.matmul on random fp32 operands of the recorded shapes alone, as often as the step
    runs each, into preallocated outputs."""
    args = []
    for (g, m, k, n), count in collections.Counter(shapes).items():
        lead = (g,) if g > 1 else ()
        a = torch.randn(*lead, m, k, device=dev)
        b = torch.randn(*lead, k, n, device=dev) / k**0.5
        args.append((a, b, torch.empty(*lead, m, n, device=dev), count))

    def run():
        for a, b, out, count in args:
            for _ in range(count):
                torch.matmul(a, b, out=out)

    return run


def _stop_check(dev) -> bool:
    """The host read that StopFlag.any_rank costs when world > 1 (a flag on the device, read
    back after its all-reduce); the all-reduce itself needs ranks, so not here."""
    return bool(torch.tensor([0], device=dev).item())


def _host_reads(step, steps: int, dev):
    """The loop before issue 26: every step reads each loss (.item()) and each D head's
    accuracy (float()) to the host and checks the stop flag."""

    def run():
        sums = 0.0
        for _ in range(steps):
            stats = step()
            numbers = [stats["loss_g"].item(), stats["loss_d"].item()]
            numbers += [float(a) for a in (*stats["acc_real"], *stats["acc_fake"])]
            sums = sums + np.asarray(numbers, dtype=np.float64)
            _stop_check(dev)
        return sums / steps

    return run


def _device_sums(step, steps: int, heads: int, dev):
    """polyinr.training.loop's way: sum the step's numbers on the device, check the stop flag
    every STOP_EVERY steps, read the means once (as at a snapshot)."""
    from polyinr.training.loop import STOP_EVERY

    def run():
        sums = torch.zeros(2 + 2 * heads, dtype=torch.float64, device=dev)
        for i in range(1, steps + 1):
            stats = step()
            sums += torch.cat(
                [
                    torch.stack([stats["loss_g"], stats["loss_d"]]).double(),
                    stats["acc_real"].double(),
                    stats["acc_fake"].double(),
                ]
            )
            if i % STOP_EVERY == 0:
                _stop_check(dev)
        return (sums / steps).cpu().numpy()

    return run


def limit_and_syncs(params: str, resolution: int, batch: int, reps: int, steps: int) -> dict:
    """FLOPs of one step (FlopCounterMode, counted once), the step's and its products' times
    interleaved, and, when `steps`, `steps` consecutive steps each way of bookkeeping."""
    from torch.utils.flop_counter import FlopCounterMode

    step, hidden, heads = _setup(params, resolution, batch)
    dev = device()
    step()  # counted after a warm-up, as the timed steps run
    # On one thread: fast_synthesis spreads no-grad chunks over worker threads, where a
    # dispatch mode (thread-local) would not see their products.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with FlopCounterMode(display=False) as counter, Products() as products:
            step()
    finally:
        torch.set_num_threads(threads)
    shapes = products.shapes
    t = interleaved({"step": step, "limit": _matmul_limit(shapes, dev)}, reps, dev)
    out = {
        "hidden": hidden,
        "flops": counter.get_total_flops(),
        "product_flops": sum(2 * g * m * k * n for g, m, k, n in shapes),
        "products": len(shapes),
        "step_s": t["step"][0],
        "limit_s": t["limit"][0],
    }
    if steps:
        ways = {
            "device": _device_sums(step, steps, heads, dev),
            "host": _host_reads(step, steps, dev),
        }
        t = interleaved(ways, reps, dev)
        out |= {"device_s": t["device"][0], "host_s": t["host"][0], "steps": steps}
    return out


def run(quick: bool) -> list[dict]:
    iters = 1 if quick else 5  # best of: one iteration swings by 10-30 % on shared cores
    reps = 1 if quick else 2
    dev = device()
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for name, params, resolution, batch in CASES[quick] if dev.type == "cpu" else GPU_CASES:
        result = {}
        for plain in (False, True):
            with ctx.Pool(1) as pool:
                args = (params, resolution, batch, plain, iters)
                result[plain] = pool.apply(measure, args)
        # Per-step host reads cost a few ms a step: shown where steps are short (not C = 1024
        # on a CPU, where a step takes seconds and the comparison would cost minutes).
        steps = 0 if dev.type == "cpu" and name == "paper" else 8
        with ctx.Pool(1) as pool:
            lim = pool.apply(limit_and_syncs, (params, resolution, batch, reps, steps))
        ours, base = result[False], result[True]
        case = f"{name} width C={ours['hidden']}, {resolution}px B={batch}"
        note = f"one G + one D step; peak RSS {ours['rss_mb']:.0f} vs {base['rss_mb']:.0f} MiB"
        rows.append(row(TS, f"{case}: vs plain", ours["img_s"], base["img_s"], "img/s", note))
        rows.append(
            row(
                TS,
                f"{case}: peak RSS",
                ours["rss_mb"],
                base["rss_mb"],
                "MiB",
                "process peak, torch and D included",
                lower_is_better=True,
            )
        )
        if ours["cuda_mb"] is not None:
            rows.append(
                row(
                    TS,
                    f"{case}: peak CUDA memory",
                    ours["cuda_mb"],
                    base["cuda_mb"],
                    "MiB",
                    "torch.cuda.max_memory_allocated",
                    lower_is_better=True,
                )
            )
        rows += _limit_rows(case, batch, lim)
    return rows


def _limit_rows(case: str, batch: int, lim: dict) -> list[dict]:
    """The rows of limit_and_syncs: the step vs the matmul limit, device sums vs host reads."""
    share = lim["product_flops"] / lim["flops"]
    note = (
        f"{lim['flops'] / 1e9:.3g} GFLOP/step (FlopCounterMode: G fwd+bwd, D fwd+bwd on reals "
        f"and fakes), {batch / lim['step_s']:.3g} img/s; limit: torch.matmul on the step's "
        f"{lim['products']} products' shapes alone ({share:.0%} of its FLOPs)"
    )
    ours, limit = lim["flops"] / lim["step_s"] / 1e9, lim["product_flops"] / lim["limit_s"] / 1e9
    rows = [row(TS, f"{case}: vs matmul limit", ours, limit, "GFLOP/s", note)]
    if "steps" in lim:
        n = lim["steps"]
        note = (
            f"{n} consecutive steps: losses and head accuracies summed on the device, read "
            "once, vs .item()/float() of each and a stop-flag read every step"
        )
        if device().type == "cpu":
            note += " (~1 on a CPU: nothing runs asynchronously, a read waits for nothing)"
        ours, base = n * batch / lim["device_s"], n * batch / lim["host_s"]
        rows.append(row(TS, f"{case}: device sums vs host reads", ours, base, "img/s", note))
    return rows
