"""Generator inference at the paper's width: polyinr vs the matmul limit and a plain version.

Per resolution, three rows in fp32 and, where bf16 matmuls are native, three in bf16:
- achieved GFLOP/s of polyinr's generator vs `torch.matmul` on the same ten
  [B*P, C] x [C, C] products (same device, dtype and threads): the speed limit;
- images/s of polyinr vs the plain version (the same generator with synthesis.fast=False:
  the levels as polyinr/model/generator.py defines them), whose outputs must agree;
- bf16 autocast vs fp32 images/s, with the output difference stated.
"""

from __future__ import annotations

import functools
import os

import torch

from benchmarks import device, fast_bf16, interleaved, row
from polyinr.core.config import load
from polyinr.model.generator import Generator, macs_per_image

PAPER_PARAMS = "configs/imagenet-256.yaml"
# (resolution, batch): 4096+ pixel rows ([4096, 1024] x [1024, 1024] is issue 9's reference
# size), 90-360 GFLOP per call on the CPU; whole batches on a GPU. Fewer rows measure the
# per-image heads instead: at 32 px, B = 2 they read ~170 MB of head weights for two images,
# 6 % of the call (0.78 of the limit against 0.90 at B = 4, benchmarks/README.md).
CPU_CASES = {True: [(32, 4), (64, 1)], False: [(32, 4), (64, 1), (128, 1)]}
GPU_CASES = [(32, 64), (64, 16), (128, 4), (256, 1)]
FP32, BF16, GF, IPS = "generator fp32", "generator bf16", "GFLOP/s", "img/s"


def _limit(rows: int, C: int, levels: int, dev, dtype):
    """torch.matmul on the generator's ten [B*P, C] x [C, C] products, into one buffer."""
    a = torch.randn(rows, C, device=dev, dtype=dtype)
    w = torch.randn(C, C, device=dev, dtype=dtype) / C**0.5
    out = torch.empty(rows, C, device=dev, dtype=dtype)

    def run():
        for _ in range(levels):
            torch.matmul(a, w, out=out)

    return run


def _plain_forward(g, z, c):
    """g(z, c) through the levels' plain forward (the definition) instead of fast_synthesis."""
    g.synthesis.fast = False
    try:
        return g(z, c)
    finally:
        g.synthesis.fast = True


def _bf16(g, z, c):
    with torch.autocast(z.device.type, dtype=torch.bfloat16):
        return g(z, c)


def _relative_difference(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over the whole batch."""
    return ((x.float() - ref).norm() / ref.norm()).item()


def run(quick: bool) -> list[dict]:
    dev = device()
    cfg = load(PAPER_PARAMS).generator
    C, L = cfg.hidden, cfg.levels
    torch.manual_seed(0)
    g = Generator(cfg, 32).to(dev).eval().requires_grad_(False)
    bf16 = fast_bf16(dev)
    reps = 1 if quick else 2
    rows = []
    for resolution, batch in CPU_CASES[quick] if dev.type == "cpu" else GPU_CASES:
        g.synthesis.set_resolution(resolution)
        z = torch.randn(batch, cfg.z_dim, device=dev)
        c = torch.arange(batch, device=dev) % cfg.num_classes
        flops = 2 * macs_per_image(cfg, resolution) * batch
        limit_flops = 2 * L * batch * resolution**2 * C * C
        case = f"{resolution}px B={batch}"

        fns = {
            "limit": _limit(batch * resolution**2, C, L, dev, torch.float32),
            "ours": functools.partial(g, z, c),
            "plain": functools.partial(_plain_forward, g, z, c),
        }
        if bf16:
            fns["limit_bf16"] = _limit(batch * resolution**2, C, L, dev, torch.bfloat16)
            fns["ours_bf16"] = functools.partial(_bf16, g, z, c)
        with torch.no_grad():
            t = interleaved(fns, reps, dev)
        ref = t["plain"][1]
        diff = _relative_difference(t["ours"][1], ref)
        if not diff < 1e-4:
            raise AssertionError(f"{case}: polyinr and the plain version differ by {diff:.1e}")
        fp32_limit = limit_flops / t["limit"][0] / 1e9
        ours_flops = flops / t["ours"][0] / 1e9
        note = f"{batch / t['ours'][0]:.3g} img/s"
        rows.append(row(FP32, f"{case}: vs matmul limit", ours_flops, fp32_limit, GF, note))
        note = f"same weights; rel. output diff {diff:.1e}"
        ours_ips, plain_ips = batch / t["ours"][0], batch / t["plain"][0]
        rows.append(row(FP32, f"{case}: vs plain version", ours_ips, plain_ips, IPS, note))
        if not bf16:
            continue
        bf16_limit = limit_flops / t["limit_bf16"][0] / 1e9
        bf16_flops = flops / t["ours_bf16"][0] / 1e9
        note = f"{bf16}; the bf16 limit is {bf16_limit / fp32_limit:.2f}x the fp32 limit"
        rows.append(row(BF16, f"{case}: vs bf16 matmul limit", bf16_flops, bf16_limit, GF, note))
        diff16 = _relative_difference(t["ours_bf16"][1], t["ours"][1])
        note = f"rel. output diff vs fp32 {diff16:.1e}"
        bf16_ips = batch / t["ours_bf16"][0]
        rows.append(row(BF16, f"{case}: autocast vs fp32 (ours)", bf16_ips, ours_ips, IPS, note))
        if dev.type == "cuda":
            peak = gpu_peak_bf16_tflops(torch.cuda.get_device_name(dev))
            if peak:
                note = f"MFU: bf16 model FLOP/s over the {peak:g} TFLOP/s dense peak"
                rows.append(row(BF16, f"{case}: MFU", bf16_flops / 1e3, peak, "TFLOP/s", note))
    return rows


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
GPU_PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "B200": 2250.0,
}


def gpu_peak_bf16_tflops(name: str) -> float | None:
    """The device's dense bf16 peak: $PEAK_TFLOPS, else the first GPU_PEAK_BF16_TFLOPS key
    found in its name, else None."""
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"])
    for key, peak in GPU_PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None
