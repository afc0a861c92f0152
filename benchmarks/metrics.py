"""Feature extraction of the metrics: polyinr's path vs torch-fidelity's calculate_metrics.

Both run the same network (torch-fidelity's inception-v3-compat, seeded random Kaiming
weights: speed does not depend on the values) over the same uint8 images in the same run.
`python -m benchmarks.metrics [--full]` prints the rows as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from polyinr import featurenets, featurestats, metrics

NOTE = "same network: inception-v3-compat with seeded random Kaiming weights (speed only)"


class _Images(torch.utils.data.Dataset):
    """uint8 (3, R, R) images, the input torch-fidelity expects."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _ours(images: torch.Tensor, net, batch: int) -> float:
    """Seconds for polyinr's evaluation path: pool + spatial statistics and logits rows."""
    cfg = metrics.EvalConfig(
        protocol="adm", num_samples=len(images), batch=batch, psi=1.0, seed=0,
        inception_weights="", vgg16_weights="", allow_random_weights=True, random_seed=0,
        reference_npz=None, cache_dir="", every_kimg=0.0, train_samples=2, grid_classes=1,
        grid_seeds=1, grid_psi=1.0,
    )  # fmt: skip
    nets = featurenets.Networks(cfg, net.net.fc.weight.device, {"inception": net})
    batches = ((s, images[s : s + batch]) for s in range(0, len(images), batch))
    start = time.perf_counter()
    stats, _ = featurestats.accumulate(
        batches, nets, ["inception"], ["pool", "spatial"], ["logits"],
        lambda i: np.ones(len(i), bool), "ours", False,
    )  # fmt: skip
    _sync()
    assert stats["pool"].n == len(images)
    return time.perf_counter() - start


def _theirs(images: torch.Tensor, weights: Path, batch: int, cuda: bool) -> float:
    """Seconds for torch_fidelity.calculate_metrics(isc=True) over the same images."""
    import torch_fidelity

    start = time.perf_counter()
    torch_fidelity.calculate_metrics(
        input1=_Images(images), isc=True, cache=False, cuda=cuda, batch_size=batch,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        verbose=False, isc_splits=1,
    )  # fmt: skip
    _sync()
    return time.perf_counter() - start


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(quick: bool) -> list[dict]:
    """Rows {benchmark, case, ours, baseline, unit, ratio, note}; images/s, higher is better."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    n, resolution = (16, 32) if quick else ((5000, 256) if cuda else (256, 64))
    batch = 64 if cuda else 8
    repeats = 3
    images = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / featurenets.WEIGHTS_FILE
        torch.save(featurenets._random_state_dict(0), weights)
        net, _ = featurenets.load_inception(str(weights), False, 0, device)
        warm = images[: min(batch, n)]
        _ours(warm, net, batch)  # warm-up: kernels, allocator
        _theirs(warm, weights, batch, cuda)
        # Interleaved repeats, best of each: shared machines make single timings noisy.
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(n / _ours(images.to(device) if cuda else images, net, batch))
            theirs.append(n / _theirs(images, weights, batch, cuda))
        ours, theirs = max(ours), max(theirs)
    case = f"{n} images {resolution}px, batch {batch}, {device.type}, best of {repeats}"
    return [
        {
            "benchmark": "metrics feature extraction",
            "case": case,
            "ours": round(ours, 2),
            "baseline": round(theirs, 2),
            "unit": "images/s",
            "ratio": round(ours / theirs, 3),
            "note": f"{NOTE}; baseline torch_fidelity.calculate_metrics(isc=True, cache=False)",
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more and larger images")
    for row in run(quick=not parser.parse_args().full):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
