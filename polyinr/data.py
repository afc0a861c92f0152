"""ImageNet-layout folder -> FFCV files with manifests; the FFCV training loader; demo data."""

from __future__ import annotations

import colorsys
import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the source images are, how they are stored, and the demo dataset's shape."""

    source: str
    out_dir: str
    encoding: str
    jpeg_quality: int
    strict: bool
    workers: int
    demo_classes: int
    demo_per_class: int
    demo_size: int
    demo_seed: int

    def __post_init__(self):
        if self.encoding not in ("jpg", "raw"):
            raise ValueError(f"encoding must be 'jpg' or 'raw', got {self.encoding!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


class DataError(ValueError):
    """A problem with the source images or the prepared FFCV files."""


# ----------------------------------------------------------------------------- demo dataset

# (shape, hue) per class; hues are spread so colour alone already separates the classes.
_DEMO_CLASSES = [
    ("disc", 0.00),  # red
    ("square", 0.33),  # green
    ("triangle", 0.62),  # blue
    ("hstripes", 0.15),  # yellow
    ("ring", 0.83),  # magenta
    ("cross", 0.50),  # cyan
    ("vstripes", 0.08),  # orange
    ("diamond", 0.75),  # purple
    ("checker", 0.25),  # lime
    ("two_discs", 0.56),  # sky blue
]
_DEMO_JPEG_QUALITY = 95


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    """Draw one class's shape centred at (cx, cy) with half-size r."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disc":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape in ("hstripes", "vstripes"):
        band = 2 * r / 5
        for k in range(0, 5, 2):
            lo = -r + k * band
            if shape == "hstripes":
                draw.rectangle((cx - r, cy + lo, cx + r, cy + lo + band), fill=fill)
            else:
                draw.rectangle((cx + lo, cy - r, cx + lo + band, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(r * 0.4)))
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "checker":
        cell = r
        for i in range(2):
            for j in range(2):
                if (i + j) % 2 == 0:
                    x0, y0 = cx - r + i * cell, cy - r + j * cell
                    draw.rectangle((x0, y0, x0 + cell, y0 + cell), fill=fill)
    elif shape == "two_discs":
        s = r / 2
        draw.ellipse((cx - r, cy - r, cx - r + 2 * s, cy - r + 2 * s), fill=fill)
        draw.ellipse((cx + r - 2 * s, cy + r - 2 * s, cx + r, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown demo shape {shape!r}")


def _demo_image(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    """Render one demo image of class `label` with random jitter drawn from `rng`."""
    shape, hue = _DEMO_CLASSES[label % len(_DEMO_CLASSES)]
    # Beyond the base classes, reuse the shapes with a shifted hue so classes stay distinct.
    hue = (hue + 0.37 * (label // len(_DEMO_CLASSES)) + rng.uniform(-0.03, 0.03)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    bg = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.4), rng.uniform(0.05, 0.25))
    canvas = 2 * size  # draw at 2x, then downsample: cheap antialiasing
    image = Image.new("RGB", (canvas, canvas), tuple(round(255 * v) for v in bg))
    r = canvas * rng.uniform(0.22, 0.34)
    cx, cy = canvas / 2 + rng.uniform(-0.12, 0.12, size=2) * canvas
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, tuple(round(255 * v) for v in rgb))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def make_demo_dataset(root, classes: int, per_class: int, size: int, seed: int) -> int:
    """Write a procedural ImageNet-layout dataset under `root/train` and return its size."""
    train = Path(root) / "train"
    if train.exists():
        shutil.rmtree(train)
    for label in range(classes):
        wnid = f"n{label:08d}"  # zero-padded so sorted names give label order
        folder = train / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, label, i])
            image = _demo_image(label, rng, size)
            image.save(folder / f"{wnid}_{i}.JPEG", quality=_DEMO_JPEG_QUALITY)
    return classes * per_class


# ----------------------------------------------------------------------------- conversion


def scan_source(source) -> tuple[list[tuple[Path, int]], list[str]]:
    """List (path, label) for every file under `source/train/<wnid>/` and the sorted wnids."""
    train = Path(source) / "train"
    expected = f"expected ImageNet layout {train}/<wnid>/<image files>"
    if not train.is_dir():
        raise DataError(f"{train} does not exist; {expected}")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train} holds no class folders; {expected}")
    items = [
        (path, label)
        for label, wnid in enumerate(classes)
        for path in sorted(p for p in (train / wnid).iterdir() if p.is_file())
    ]
    return items, classes


def beton_path(out_dir, resolution: int) -> Path:
    """Path of the FFCV file for one resolution."""
    return Path(out_dir) / f"train_{resolution}.beton"


def manifest_path(out_dir, resolution: int) -> Path:
    """Path of the JSON manifest written beside the FFCV file."""
    return Path(out_dir) / f"train_{resolution}.json"


def read_manifest(out_dir, resolution: int) -> dict:
    """Load the manifest of a prepared resolution."""
    path = manifest_path(out_dir, resolution)
    if not path.is_file():
        raise DataError(f"no prepared data at {path}; run `polyinr prepare` first")
    return json.loads(path.read_text())


def _load_rgb(path: Path) -> Image.Image:
    """Decode an image fully (so truncation surfaces here) as RGB, whatever its mode."""
    with Image.open(path) as image:
        return image.convert("RGB")  # grayscale, CMYK, palette, RGBA -> RGB; forces a load


def _square(image: Image.Image, resolution: int) -> np.ndarray:
    """Centre-crop to a square and resize to resolution x resolution: (R, R, 3) uint8."""
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    # reducing_gap lets PIL box-reduce by an integer factor first: fast and still Lanczos-exact.
    out = image.resize((resolution, resolution), Image.Resampling.LANCZOS, box, reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)


def _check(path: Path) -> str | None:
    """Return why `path` cannot be used as an image, or None when it decodes."""
    try:
        _load_rgb(path)
    except Exception as e:  # any decoder error means "skip this file", never crash
        return f"{type(e).__name__}: {e}"
    return None


def _validate(paths: list[Path], workers: int, progress: bool) -> list[str | None]:
    """Decode every source once, in parallel, returning a failure reason or None per path."""
    bar = dict(total=len(paths), unit="img", desc="validate", disable=not progress)
    if workers <= 1:
        return list(tqdm(map(_check, paths), **bar))
    chunk = max(1, min(64, len(paths) // (4 * workers)))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(_check, paths, chunksize=chunk), **bar))


class _SquareImages:
    """Indexed dataset for ffcv's writer: (R x R x 3 uint8, label), never raising."""

    def __init__(self, items: list[tuple[Path, int]], resolution: int, failures: Path):
        self.items, self.resolution, self.failures = items, resolution, failures

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        try:
            return _square(_load_rgb(path), self.resolution), label
        except Exception as e:
            # An exception in an ffcv writer process hangs the parent forever, so record
            # the failure on disk, write a black placeholder and let prepare() discard the file.
            (self.failures / f"{index}.txt").write_text(f"{path}\t{type(e).__name__}: {e}")
            return np.zeros((self.resolution, self.resolution, 3), np.uint8), label


def _write_beton(path: Path, items, resolution: int, cfg: DataConfig) -> None:
    """Write one FFCV file atomically: a temp file in the same folder, then os.replace."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(
            write_mode="jpg" if cfg.encoding == "jpg" else "raw",
            jpeg_quality=cfg.jpeg_quality,
            max_resolution=resolution,
        ),
        "label": IntField(),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as failures:
            # 2 MiB is ffcv's smallest page: the default 8 MiB makes tiny files ~20 MB.
            writer = DatasetWriter(tmp, fields, page_size=1 << 21, num_workers=max(1, cfg.workers))
            writer.from_indexed_dataset(_SquareImages(items, resolution, Path(failures)))
            failed = sorted(Path(failures).iterdir())
            if failed:
                lines = "\n  ".join(f.read_text() for f in failed)
                raise DataError(f"{len(failed)} images failed while writing {path}:\n  {lines}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, content: dict) -> None:
    """Write JSON atomically so a reader never sees half a manifest."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)


def prepare(cfg: DataConfig, resolutions: Sequence[int], progress: bool = True) -> list[dict]:
    """Convert `cfg.source` into one FFCV file plus manifest per resolution; return manifests."""
    start = time.perf_counter()
    items, classes = scan_source(cfg.source)
    reasons = _validate([p for p, _ in items], cfg.workers, progress)
    skipped = [{"path": str(p), "reason": r} for (p, _), r in zip(items, reasons, strict=True) if r]
    good = [item for item, r in zip(items, reasons, strict=True) if r is None]
    if skipped and cfg.strict:
        lines = "\n  ".join(f"{s['path']}: {s['reason']}" for s in skipped)
        raise DataError(f"{len(skipped)} unreadable images (strict=True):\n  {lines}")
    if not good:
        raise DataError(f"no readable images under {Path(cfg.source) / 'train'}")
    if skipped:
        print(
            f"warning: skipped {len(skipped)} unreadable images of {len(items)} "
            f"(listed in the manifest), e.g. {skipped[0]['path']}: {skipped[0]['reason']}",
            file=sys.stderr,
        )
    validate_seconds = time.perf_counter() - start
    per_class = np.bincount([label for _, label in good], minlength=len(classes)).tolist()

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifests = []
    for resolution in resolutions:
        t0 = time.perf_counter()
        _write_beton(beton_path(out_dir, resolution), good, resolution, cfg)
        # Validation is shared by all resolutions; each manifest counts it once.
        seconds = time.perf_counter() - t0 + validate_seconds
        manifest = {
            "resolution": resolution,
            "written": len(good),
            "skipped": skipped,
            "classes": classes,
            "per_class": per_class,
            "encoding": cfg.encoding,
            "jpeg_quality": cfg.jpeg_quality,
            "source": str(cfg.source),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(items) / max(seconds, 1e-9), 1),
        }
        _write_json(manifest_path(out_dir, resolution), manifest)
        manifests.append(manifest)
    return manifests


# ----------------------------------------------------------------------------- loading


class Batches:
    """Iterable over (images in [-1, 1], int64 labels) batches of an FFCV file, every epoch."""

    def __init__(self, loader, scale: bool):
        self.ffcv = loader  # the underlying ffcv.loader.Loader
        self.scale = scale

    def __len__(self) -> int:
        return len(self.ffcv)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.ffcv:
            # ffcv reuses its output buffers, so both tensors are copied before yielding.
            if self.scale:
                images = images.float().div_(127.5).sub_(1.0)  # (B, 3, R, R) in [-1, 1]
            else:
                images = images.clone()  # (B, 3, R, R) uint8
            yield images, labels.reshape(-1).to(torch.int64, copy=True)  # (B,)


def _pipelines(device: torch.device, mirror: bool) -> dict:
    """FFCV pipelines producing uint8 NCHW images and labels on `device`."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    image = [SimpleRGBImageDecoder()] + ([RandomHorizontalFlip()] if mirror else [])
    # No NormalizeImage: on the CPU, ToTensor -> ToTorchImage -> NormalizeImage hangs inside
    # ffcv's Loader, so scaling to [-1, 1] happens in torch (Batches.__iter__).
    image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=False)]
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
    """Shuffled training batches from an FFCV file (each rank its own share when distributed)."""
    from ffcv.loader import Loader, OrderOption

    if not Path(path).is_file():
        raise DataError(f"no FFCV file at {path}; run `polyinr prepare` first")
    device = torch.device(device)  # ToDevice rejects strings
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=workers,
        order=OrderOption.RANDOM,  # QUASI_RANDOM is not implemented with distributed=True
        distributed=distributed,
        seed=seed,
        drop_last=drop_last,
        pipelines=_pipelines(device, mirror),
    )
    return Batches(loader, scale=True)


def read_all(
    path, batch_size: int = 256, workers: int = 2
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of an FFCV file in file order as uint8 (B, 3, R, R) with int64 labels."""
    from ffcv.loader import Loader, OrderOption

    if not Path(path).is_file():
        raise DataError(f"no FFCV file at {path}; run `polyinr prepare` first")
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=workers,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines=_pipelines(torch.device("cpu"), mirror=False),
    )
    yield from Batches(loader, scale=False)
