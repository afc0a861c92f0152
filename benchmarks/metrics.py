"""Feature extraction of the metrics: polyinr's path vs torch-fidelity's calculate_metrics.

Both run the same network (torch-fidelity's inception-v3-compat, seeded random Kaiming
weights: speed does not depend on the values) over the same uint8 images in the same run.
`python -m benchmarks.metrics [--full]` prints the rows as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks import device, interleaved, row
from polyinr.core.config import EvalConfig
from polyinr.evaluation import featurenets, featurestats

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


def run(quick: bool) -> list[dict]:
    """Rows {benchmark, case, ours, baseline, unit, ratio, note}; images/s, higher is better."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more and larger images")
    for line in run(quick=not parser.parse_args().full):
        print(json.dumps(line))


if __name__ == "__main__":
    main()
