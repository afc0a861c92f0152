"""The metrics' costs: feature extraction vs torch-fidelity, the feature networks vs the
machine's own convolution and matmul throughput on the same shapes, and the Frechet distance
at the samples' cost vs the eigenvalues of the D x D product (issue 26).

The networks carry seeded random Kaiming weights: speed does not depend on the values.
`python -m benchmarks.metrics [--full]` prints the rows as JSON lines.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import device, fast_bf16, interleaved, row
from polyinr.core.config import EvalConfig
from polyinr.evaluation import featurenets, featurestats, metrics

NOTE = "same network: inception-v3-compat with seeded random Kaiming weights (speed only)"


class _Images(torch.utils.data.Dataset):
    """uint8 (3, R, R) images, the input torch-fidelity expects."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _ours(images: torch.Tensor, net, batch: int) -> int:
    """polyinr's evaluation path: pool + spatial statistics and logits rows; -> images."""
    cfg = EvalConfig(
        protocol="adm", num_samples=len(images), batch=batch, psi=1.0, seed=0,
        inception_weights="", vgg16_weights="", allow_random_weights=True, random_seed=0,
        reference_npz=None, cache_dir="", every_kimg=0.0, train_samples=2, grid_classes=1,
        grid_seeds=1, grid_psi=1.0,
    )  # fmt: skip
    nets = featurenets.Networks(cfg, net.net.fc.weight.device, {"inception": net})
    batches = ((s, images[s : s + batch]) for s in range(0, len(images), batch))
    stats, _ = featurestats.accumulate(
        batches, nets, ["inception"], ["pool", "spatial"], ["logits"],
        lambda i: np.ones(len(i), bool), "ours", False,
    )  # fmt: skip
    return stats["pool"].n


def _theirs(images: torch.Tensor, weights: Path, batch: int, cuda: bool) -> dict:
    """torch_fidelity.calculate_metrics(isc=True) over the same images."""
    import torch_fidelity

    return torch_fidelity.calculate_metrics(
        input1=_Images(images), isc=True, cache=False, cuda=cuda, batch_size=batch,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        verbose=False, isc_splits=1,
    )  # fmt: skip


def _vs_torch_fidelity(quick: bool) -> list[dict]:
    """polyinr's feature extraction vs torch-fidelity's calculate_metrics, img/s."""
    dev = device()
    cuda = dev.type == "cuda"
    n, resolution = (16, 32) if quick else ((5000, 256) if cuda else (256, 64))
    batch = 64 if cuda else 8
    images = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / featurenets.WEIGHTS_FILE
        torch.save(featurenets._random_state_dict(0), weights)
        net, _ = featurenets.load_inception(str(weights), False, 0, dev)
        ours_in = images.to(dev)
        # Interleaved repeats, best of each: shared machines make single timings noisy.
        timed = interleaved(
            {
                "ours": lambda: _ours(ours_in, net, batch),
                "theirs": lambda: _theirs(images, weights, batch, cuda),
            },
            reps=2 if quick else 3,
            dev=dev,
        )
    ours, theirs = n / timed["ours"][0], n / timed["theirs"][0]
    case = f"{n} images {resolution}px, batch {batch}: vs torch-fidelity calculate_metrics"
    note = f"{NOTE}; baseline torch_fidelity.calculate_metrics(isc=True, cache=False)"
    return [row("metrics feature extraction", case, ours, theirs, "img/s", note)]


# ---------------------------------------------------------------------------------------------
# The feature networks against the machine's own convolution and matmul throughput


def _conv_calls(net: nn.Module, images: torch.Tensor) -> list:
    """(conv module, input shape, output shape) of every convolution of one forward pass."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: calls.append((m, i[0].shape, o.shape)))
        for m in net.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        featurenets.extract(net, images)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _flops(calls) -> int:
    """FLOPs of the convolutions (2 per multiply-add; BN, ReLU and pooling not counted)."""
    return sum(2 * m.weight[0].numel() * o.numel() for m, _, o in calls)


def _conv_limit(calls, dev, dtype):
    """The same convolutions alone (channels-last, F.conv2d, no bias, BN or ReLU)."""
    cl = torch.channels_last
    args = [
        (torch.randn(s, device=dev, dtype=dtype).contiguous(memory_format=cl),
         m.weight.detach().to(dtype).contiguous(memory_format=cl), m)
        for m, s, _ in calls
    ]  # fmt: skip

    def run():
        with featurenets.no_tf32(), torch.inference_mode():
            for x, w, m in args:
                F.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups)

    return run


def _matmul_limit(calls, dev, dtype):
    """The convolutions' im2col products (B*Ho*Wo, Cin*kh*kw) x (Cin*kh*kw, Cout) alone."""
    shapes = [(o[0] * o[2] * o[3], m.weight[0].numel(), m.out_channels) for m, _, o in calls]
    args = [
        (torch.randn(r, k, device=dev, dtype=dtype), torch.randn(k, c, device=dev, dtype=dtype))
        for r, k, c in shapes
    ]

    def run():
        with featurenets.no_tf32():
            for a, b in args:
                torch.mm(a, b)

    return run


def _relative(a: dict, b: dict) -> float:
    """Largest relative L2 difference over the feature keys."""
    return max(float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])) for k in b)


def _feature_network(name: str, net: nn.Module, images: torch.Tensor, reps: int, dev) -> list:
    """Rows of one network: vs conv limit, vs matmul limit, vs NCHW, bf16 vs fp32 if native."""
    calls = _conv_calls(net, images)
    flops = _flops(calls)
    nchw = _contiguous_copy(net)
    bf16 = fast_bf16(dev)

    def autocast():
        with torch.inference_mode(), torch.autocast(dev.type, torch.bfloat16):
            feats = net(images.to(dev))
        return {k: v.float().cpu().numpy().astype(np.float64) for k, v in feats.items()}

    fns = {
        "ours": lambda: featurenets.extract(net, images),
        "nchw": lambda: featurenets.extract(nchw, images),
        "conv": _conv_limit(calls, dev, torch.float32),
        "matmul": _matmul_limit(calls, dev, torch.float32),
    } | ({"bf16": autocast} if bf16 else {})
    t = interleaved(fns, reps, dev)
    gflops = {k: flops / t[k][0] / 1e9 for k in t}
    n, res = len(images), images.shape[-1]
    case = f"{n} images {res}px, {flops / n / 1e9:.1f} GFLOP/img"
    what = f"{name} forward (extract: resize, channels-last, inference_mode)"
    diff = _relative(t["ours"][1], t["nchw"][1])
    rows = [
        row(f"{name} fp32", f"{case}: vs conv limit", gflops["ours"], gflops["conv"], "GFLOP/s",
            f"{what}; limit: its {len(calls)} convolutions alone, same shapes, channels-last"),
        row(f"{name} fp32", f"{case}: vs matmul limit", gflops["ours"], gflops["matmul"],
            "GFLOP/s", "limit: the convolutions' im2col matmuls alone, same shapes"),
        row(f"{name} fp32", f"{case}: channels-last vs NCHW", n / t["ours"][0],
            n / t["nchw"][0], "img/s", f"same weights; rel. feature diff {diff:.1e}"),
    ]  # fmt: skip
    if bf16:
        diff = _relative(t["bf16"][1], t["ours"][1])
        note = f"{bf16}; rel. feature diff vs fp32 {diff:.1e} (not the default: FID accuracy)"
        rows.append(
            row(f"{name} bf16", f"{case}: autocast vs fp32", n / t["bf16"][0],
                n / t["ours"][0], "img/s", note)
        )  # fmt: skip
    return rows


def _contiguous_copy(net: nn.Module) -> nn.Module:
    """The same network with NCHW (contiguous) weights: the layout before issue 26."""
    return copy.deepcopy(net).to(memory_format=torch.contiguous_format)


def _feature_networks(quick: bool) -> list[dict]:
    """Inception (adm, every protocol) and VGG16 (stylegan-xl P/R) at the batch they run."""
    dev = device()
    cuda = dev.type == "cuda"
    rows = []
    inception = featurenets.random_inception(0, dev)
    n = 64 if cuda else (4 if quick else 16)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    rows += _feature_network("inception", inception, images, 1 if quick else 2, dev)
    vgg, _ = featurenets.load_vgg16("", True, 0, dev)
    n = 64 if cuda else (2 if quick else 8)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    rows += _feature_network("vgg16", vgg, images, 1 if quick else 2, dev)
    return rows


# ---------------------------------------------------------------------------------------------
# The Frechet distance


def _today_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance before issue 26: eigenvalues of the D x D product, always."""
    eigenvalues = scipy.linalg.eigvals(sigma1 @ sigma2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _frechet(quick: bool) -> list[dict]:
    """N samples against a D-dimensional reference (N < D): low-rank trace term vs today's."""
    n, d = (128, 1024) if quick else (256, 2048)
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, d)) / 8
    real = np.maximum(rng.normal(size=(4 * n, 64)) @ mix + 0.3, 0)
    fake = np.maximum(rng.normal(size=(n, 64)) @ mix + 0.32, 0) + 0.05 * rng.random((n, d))
    mu2, sigma2 = real.mean(0), np.cov(real, rowvar=False)
    mu1, sigma1 = fake.mean(0), np.cov(fake, rowvar=False)
    t = interleaved(
        {
            "ours": lambda: metrics.frechet_distance(
                mu1, sigma1, mu2, sigma2, metrics.covariance_factor(fake, 1)
            ),
            "today": lambda: _today_frechet(mu1, sigma1, mu2, sigma2),
        },
        reps=1 if quick else 2,
        dev=torch.device("cpu"),
    )
    ours, today = t["ours"], t["today"]
    diff = abs(ours[1] - today[1]) / abs(today[1])
    case = f"{n} samples vs reference, D = {d}: vs eigenvalues of the D x D product"
    note = f"exact (FD {ours[1]:.4g}, rel. diff {diff:.1e}); includes building the factor"
    return [row("frechet distance", case, ours[0], today[0], "s", note, lower_is_better=True)]


def run(quick: bool) -> list[dict]:
    """Rows {benchmark, case, ours, baseline, unit, ratio, note}."""
    return _frechet(quick) + _feature_networks(quick) + _vs_torch_fidelity(quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more and larger images")
    for line in run(quick=not parser.parse_args().full):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
