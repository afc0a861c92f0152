"""Data throughput: the polyinr FFCV loader and converter against what users would otherwise
pick, on the same ImageNet-like JPEGs at 64x64 with the same number of workers.

    python -m benchmarks.loader [--quick] [--workers W] [--images N] [--root DIR]

Rows (images/s, higher is better; ratio = ours / baseline):
  loader vs ImageFolder   (a) make_loader -> float [-1, 1] batches, flips, vs (b) torchvision
                          ImageFolder + DataLoader decoding and resizing the source JPEGs.
  loader vs decode limit  (a) vs (c) decoding the stored 64x64 JPEGs alone with
                          libjpeg-turbo (Pillow) in W processes: the ceiling of any JPEG loader.
  conversion              polyinr prepare vs ffcv's ImageNet example writer (ImageFolder,
                          full-size decode, max_resolution) on the same JPEGs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, features

from polyinr import data
from polyinr.core.config import DataConfig

RESOLUTION = 64
BATCH = 256
# (width, height) of common ImageNet training images, by rough frequency.
SIZES = [(500, 375)] * 5 + [(500, 333)] * 2 + [(375, 500)] * 2 + [(500, 400), (400, 300)]


def _photo(seed: int) -> bytes:
    """One ImageNet-like JPEG: ~500x375, smooth colour regions, fine texture and grain, saved
    at quality 90: ~100 kB and ~5 ms to decode here, like an average ImageNet photo."""
    rng = np.random.default_rng(seed)
    w, h = SIZES[rng.integers(len(SIZES))]

    def field(cell: int) -> np.ndarray:  # random colours every `cell` pixels, bicubic between
        small = rng.integers(0, 256, (h // cell + 2, w // cell + 2, 3), dtype=np.uint8)
        up = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        return np.asarray(up, np.int16)

    grain = rng.integers(-24, 25, (h, w, 3), dtype=np.int16)
    pixels = (field(60) * 2 + field(3)) // 3 + grain
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _write_photo(args) -> int:
    path, seed = args
    raw = _photo(seed)
    path.write_bytes(raw)
    return len(raw)


def make_source(root: Path, n: int, classes: int, workers: int) -> Path:
    """ImageNet layout root/train/<wnid>/*.JPEG with n images; reused when already there."""
    marker = root / f".complete-{n}-{classes}"
    if marker.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    for i in range(n):
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"img_{i:06d}.JPEG", i))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_write_photo, jobs, chunksize=16))
    print(f"made {n} source JPEGs in {root}, mean {np.mean(sizes) / 1e3:.0f} kB")
    marker.touch()
    return root


def _config(source: Path, out: Path, workers: int) -> DataConfig:
    return DataConfig(
        source=str(source),
        out_dir=str(out),
        encoding="jpg",
        jpeg_quality=90,
        strict=False,
        workers=workers,
        scan_cache=None,
        demo_kind="shapes",
        demo_classes=1,
        demo_per_class=1,
        demo_size=RESOLUTION,
        demo_seed=0,
    )


def convert_baseline(source: Path, out: Path, workers: int) -> float:
    """ffcv's ImageNet example writer: ImageFolder (full decode) -> max_resolution JPEG."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(source / "train"))
    fields = {
        "image": RGBImageField(write_mode="jpg", max_resolution=RESOLUTION, jpeg_quality=90),
        "label": IntField(),
    }
    start = time.perf_counter()
    writer = DatasetWriter(str(out / "baseline.beton"), fields, num_workers=workers)
    writer.from_indexed_dataset(dataset, chunksize=16)
    return len(dataset) / (time.perf_counter() - start)


def loader_rate(beton: Path, workers: int, epochs: int) -> float:
    """(a) images/s of make_loader to float [-1, 1] batches, after one warm-up epoch."""
    loader = data.make_loader(beton, BATCH, seed=0, device="cpu", workers=workers)
    for _ in loader:  # numba compiles the pipeline during the first epoch
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _y in loader:
            count += len(x)
    return count / (time.perf_counter() - start)


def imagefolder_rate(source: Path, workers: int, epochs: int) -> float:
    """(b) images/s of torchvision ImageFolder + DataLoader to the same batches, after one
    warm-up epoch (persistent workers: start-up is not counted)."""
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Resize(RESOLUTION),
            transforms.CenterCrop(RESOLUTION),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    dataset = datasets.ImageFolder(str(source / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=True,
    )
    for _ in loader:
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _y in loader:
            count += len(x)
    return count / (time.perf_counter() - start)


def stored_jpegs(beton: Path) -> list[bytes]:
    """The encoded images inside an FFCV file, as stored."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    sizes = dict(zip(reader.alloc_table["ptr"], reader.alloc_table["size"], strict=True))
    raw = np.fromfile(str(beton), np.uint8)
    field = reader.metadata.dtype.names[reader.field_names.index("image")]  # fields are unnamed
    ptrs = reader.metadata[field]["data_ptr"]
    return [raw[p : p + sizes[p]].tobytes() for p in ptrs]


def _decode_all(jpegs: list[bytes]) -> int:
    for b in jpegs:
        np.asarray(Image.open(io.BytesIO(b)))
    return len(jpegs)


def decode_limit_rate(beton: Path, workers: int, repeats: int) -> float:
    """(c) images/s of decoding the stored JPEGs alone (libjpeg-turbo via Pillow), W processes."""
    jpegs = stored_jpegs(beton) * repeats
    parts = [jpegs[i::workers] for i in range(workers)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_all, [p[:50] for p in parts]))  # start the processes
        start = time.perf_counter()
        count = sum(pool.map(_decode_all, parts))
    return count / (time.perf_counter() - start)


def _row(benchmark: str, case: str, ours: float, baseline: float) -> dict:
    return {
        "benchmark": benchmark,
        "case": case,
        "ours": round(ours, 1),
        "baseline": round(baseline, 1),
        "unit": "img/s",
        "ratio": round(ours / baseline, 2),
    }


def run(quick: bool, workers: int = 0, images: int = 0, root: Path | None = None) -> list[dict]:
    """Measure every row; quick uses fewer images and epochs (minutes -> well under one)."""
    workers = workers or len(os.sched_getaffinity(0))
    images = images or (768 if quick else 3072)
    root = Path(root or Path("data/bench") / f"imagenet-like-{images}")
    source = make_source(root, images, classes=8, workers=workers)
    warm = make_source(root.with_name(root.name + "-warmup"), 32, classes=2, workers=workers)
    with tempfile.TemporaryDirectory(prefix="polyinr-bench-") as tmp:
        out = Path(tmp)
        # Both writers pay one-off start-up costs (numba compilation) on a tiny set first.
        data.prepare(_config(warm, out, workers), [RESOLUTION], progress=False)
        convert_baseline(warm, out, workers)
        start = time.perf_counter()  # ffcv is imported by now (warm-up): not counted
        [manifest] = data.prepare(_config(source, out, workers), [RESOLUTION], progress=False)
        convert_ours = manifest["written"] / (time.perf_counter() - start)
        convert_theirs = convert_baseline(source, out, workers)
        beton = data.beton_path(out, RESOLUTION)
        epochs = 2 if quick else 5
        ours = loader_rate(beton, workers, epochs)
        baseline = imagefolder_rate(source, workers, 1 if quick else 2)
        limit = decode_limit_rate(beton, workers, repeats=epochs)
    case = f"{RESOLUTION}px, batch {BATCH}, {workers} workers, {images} JPEGs"
    turbo = "libjpeg-turbo" if features.check_feature("libjpeg_turbo") else "libjpeg"
    return [
        _row("loader", f"FFCV loader vs ImageFolder+DataLoader ({case})", ours, baseline),
        _row("loader", f"FFCV loader vs {turbo} decode-only limit ({case})", ours, limit),
        _row(
            "conversion", f"prepare vs ffcv example writer ({case})", convert_ours, convert_theirs
        ),
    ]


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows."""
    keys = ["benchmark", "case", "ours", "baseline", "unit", "ratio"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loader",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs")
    parser.add_argument("--workers", type=int, default=0, help="0: every available core")
    parser.add_argument("--images", type=int, default=0, help="source JPEGs (0: 768 quick, 3072)")
    parser.add_argument(
        "--root", type=Path, default=None, help="source folder (data/bench/imagenet-like-N)"
    )
    args = parser.parse_args(argv)
    print(format_table(run(args.quick, args.workers, args.images, args.root)))


if __name__ == "__main__":
    main()
