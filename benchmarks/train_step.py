"""Training iterations (one G and one D step): polyinr's generator vs the plain one.

polyinr.training.loop.training_step with polyinr's generator or the plain version
(synthesis.fast=False:
the levels as polyinr/model/generator.py defines them), at the demo's width and the paper's.

Each case runs in a fresh process so that its peak memory (RSS; CUDA memory on a GPU) is
its own. D is the demo's projected discriminator (params.yaml, random frozen features)
in both cases: the width under test is the generator's.
"""

from __future__ import annotations

import multiprocessing
import time

import torch

from benchmarks import device, peak_rss_mb, row

DEMO_PARAMS, PAPER_PARAMS = "params.yaml", "configs/imagenet-256.yaml"
# (name, params file of the generator, resolution, batch); small batches at C = 1024.
CASES = {
    True: [("demo", DEMO_PARAMS, 32, 8), ("paper", PAPER_PARAMS, 32, 2)],
    False: [("demo", DEMO_PARAMS, 32, 32), ("paper", PAPER_PARAMS, 32, 4)],
}
GPU_CASES = [("demo", DEMO_PARAMS, 64, 64), ("paper", PAPER_PARAMS, 64, 16)]


def measure(params: str, resolution: int, batch: int, plain: bool, iters: int) -> dict:
    """Images/s (best of `iters` after one warm-up) and peak memory of training_step."""
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
    best = float("inf")
    for i in range(iters + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        training_step(g, d, opt_g, opt_d, reals, z, z, sigma=1.0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            best = min(best, time.perf_counter() - start)
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    return {
        "img_s": batch / best,
        "rss_mb": peak_rss_mb(),
        "cuda_mb": cuda_mb,
        "hidden": cfg.hidden,
    }


def run(quick: bool) -> list[dict]:
    iters = 1 if quick else 5  # best of: one iteration swings by 10-30 % on shared cores
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for name, params, resolution, batch in CASES[quick] if device().type == "cpu" else GPU_CASES:
        result = {}
        for plain in (False, True):
            with ctx.Pool(1) as pool:
                args = (params, resolution, batch, plain, iters)
                result[plain] = pool.apply(measure, args)
        ours, base = result[False], result[True]
        case = f"{name} width C={ours['hidden']}, {resolution}px B={batch}"
        note = f"one G + one D step; peak RSS {ours['rss_mb']:.0f} vs {base['rss_mb']:.0f} MiB"
        rows.append(
            row("train step", f"{case}: vs plain", ours["img_s"], base["img_s"], "img/s", note)
        )
        rows.append(
            row(
                "train step",
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
                    "train step",
                    f"{case}: peak CUDA memory",
                    ours["cuda_mb"],
                    base["cuda_mb"],
                    "MiB",
                    "torch.cuda.max_memory_allocated",
                    lower_is_better=True,
                )
            )
    return rows
