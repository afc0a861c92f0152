"""ImageNet (a folder or ILSVRC2012_img_train.tar) -> FFCV files with manifests; the FFCV
training loader (seeded, resumable mid-epoch, per-rank shares); the demo dataset."""

from __future__ import annotations

import collections
import colorsys
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm import tqdm

from polyinr.config import DataConfig
from polyinr.distributed import rank_world
from polyinr.storage import write_atomic


class DataError(ValueError):
    """A problem with the source images or the prepared FFCV files."""


# ----------------------------------------------------------------------------- demo dataset

# One shape per class, ordered so that the first few differ most in structure (filled vs
# hollow, lines vs areas). Colours are drawn at random per image, so only shape and
# structure tell the classes apart: what a class-conditional GAN finds hard.
_DEMO_SHAPES = [
    "disc",
    "ring",
    "cross",
    "hstripes",
    "triangle",
    "checker",
    "vstripes",
    "square",
    "diamond",
    "two_discs",
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
    """Render one demo image of class `label`: its shape in a random colour, random jitter.

    Classes beyond the ten shapes repeat them as a 2x2, 3x3, ... tiling (structure again).
    """
    shape = _DEMO_SHAPES[label % len(_DEMO_SHAPES)]
    tiles = 1 + label // len(_DEMO_SHAPES)
    hue = rng.uniform(0, 1)
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    bg_hue = (hue + rng.uniform(0.25, 0.75)) % 1.0
    bg = colorsys.hsv_to_rgb(bg_hue, rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.3))
    canvas = 2 * size  # draw at 2x, then downsample: cheap antialiasing
    image = Image.new("RGB", (canvas, canvas), tuple(round(255 * v) for v in bg))
    draw, cell = ImageDraw.Draw(image), canvas / tiles
    fill = tuple(round(255 * v) for v in rgb)
    r = cell * rng.uniform(0.22, 0.34)
    jitter = rng.uniform(-0.12, 0.12, size=2) * cell
    for i in range(tiles):
        for j in range(tiles):
            cx, cy = (i + 0.5) * cell + jitter[0], (j + 0.5) * cell + jitter[1]
            _draw_shape(draw, shape, cx, cy, r, fill)
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


# ----------------------------------------------------------------------------- sources


class _Window(io.RawIOBase):
    """Read-only view of bytes [start, start + size) of an open file: one class tar inside
    ILSVRC2012_img_train.tar, so tarfile can list it without extracting or overrunning it."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


@dataclasses.dataclass
class Source:
    """The training images of an ImageNet folder or of ILSVRC2012_img_train.tar, as listed.

    Image i is file `names[i]` of class `labels[i]` (classes sorted by wnid), `sizes[i]` bytes,
    at byte `offsets[i]` of the archive (tar) or in `<prefixes[label]>/<name>` (folder).
    """

    location: Path
    kind: str  # "folder" or "tar"
    classes: list[str]
    prefixes: list[str]  # per class: its folder, or "<archive>/<class tar>" for display
    names: list[str]
    labels: np.ndarray  # (N,) int64
    sizes: np.ndarray  # (N,) int64
    offsets: np.ndarray | None  # (N,) int64 for a tar, None for a folder
    unlisted: list[dict]  # {"path", "reason"} for class folders or tars that could not be read
    _fd: int | None = None

    def __len__(self) -> int:
        return len(self.names)

    def path(self, i: int) -> str:
        """Where image i lives, for messages and the manifest."""
        return f"{self.prefixes[self.labels[i]]}/{self.names[i]}"

    def read(self, i: int) -> bytes:
        """The encoded bytes of image i (pread: safe to share across forked workers)."""
        if self.offsets is None:
            return Path(self.path(i)).read_bytes()
        if self._fd is None:
            self._fd = os.open(self.location, os.O_RDONLY)
        return os.pread(self._fd, int(self.sizes[i]), int(self.offsets[i]))

    def fingerprint(self) -> str:
        """sha256 of every class/name and byte size: equal for a folder and its tar."""
        digest = hashlib.sha256()
        for name, label, size in zip(self.names, self.labels, self.sizes, strict=True):
            digest.update(f"{self.classes[label]}/{name}\t{size}\n".encode())
        return f"sha256:{digest.hexdigest()}"


def _collect(classes: list[str], prefixes: list[str], listings, location: Path, kind: str):
    """Build a Source from per-class [(name, size, offset)] listings."""
    names, labels, sizes, offsets = [], [], [], []
    for label, listing in enumerate(listings):
        for name, size, offset in sorted(listing):
            names.append(name)
            labels.append(label)
            sizes.append(size)
            offsets.append(offset)
    return dict(
        location=location,
        kind=kind,
        classes=classes,
        prefixes=prefixes,
        names=names,
        labels=np.asarray(labels, np.int64),
        sizes=np.asarray(sizes, np.int64),
        offsets=np.asarray(offsets, np.int64) if kind == "tar" else None,
    )


def _shown(path) -> str:
    """A path for messages and manifests: bytes that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _bad_name(name: str) -> str | None:
    """Why a file or class name cannot be used, or None: it must be valid UTF-8 (the
    manifest, the fingerprint and FFCV's consumers all need text)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os and tarfile keep undecodable bytes as surrogates
        return "unreadable: the name is not valid UTF-8; rename it"
    return None


def _scan_folder(root: Path, progress: bool) -> Source:
    train = root / "train"
    expected = f"expected ImageNet layout {train}/<wnid>/<image files> or ILSVRC2012_img_train.tar"
    if not train.is_dir():
        raise DataError(f"{train} does not exist; {expected}")
    folders = sorted(p.name for p in train.iterdir() if p.is_dir())
    unlisted = [
        {"path": _shown(train / n), "reason": _bad_name(n)} for n in folders if _bad_name(n)
    ]
    classes = [n for n in folders if not _bad_name(n)]
    if not classes:
        raise DataError(f"{train} holds no class folders; {expected}")
    listings = []
    for wnid in tqdm(classes, unit="class", desc="scan", disable=not progress):
        try:
            with os.scandir(train / wnid) as entries:
                entries = sorted(entries, key=lambda e: e.name)
            files = []
            for e in entries:
                reason = _bad_name(e.name)
                if reason is None and e.is_symlink() and not os.path.exists(e.path):
                    reason = f"unreadable: dangling symlink to {_shown(os.readlink(e.path))}"
                if reason is not None:
                    unlisted.append({"path": _shown(e.path), "reason": reason})
                elif e.is_file():
                    files.append(e)
            listings.append([(e.name, e.stat().st_size, -1) for e in files])
        except OSError as e:
            listings.append([])
            reason = f"unreadable: {type(e).__name__}: {e}"
            unlisted.append({"path": str(train / wnid), "reason": reason})
    prefixes = [str(train / wnid) for wnid in classes]
    return Source(**_collect(classes, prefixes, listings, train, "folder"), unlisted=unlisted)


def _scan_tar(archive: Path, progress: bool) -> Source:
    """List a tar of per-class tars (ILSVRC2012_img_train.tar) by reading headers only."""
    unlisted, found, outer = [], [], []
    with archive.open("rb") as f:
        try:
            for m in tarfile.open(fileobj=f, mode="r:"):
                if m.isfile():
                    outer.append(m)
        except tarfile.TarError as e:
            if not outer:
                raise DataError(f"{archive} is not a readable tar of per-class tars: {e}") from e
            reason = f"truncated: nothing after {_shown(outer[-1].name)} can be listed ({e})"
            unlisted.append({"path": str(archive), "reason": reason})
        for m in sorted(outer, key=lambda m: m.name):
            reason = _bad_name(m.name)
            if reason is None and not m.name.endswith(".tar"):
                reason = "not an image: not a per-class .tar inside the archive"
            if reason is not None:
                unlisted.append({"path": f"{archive}/{_shown(m.name)}", "reason": reason})
            else:
                found.append(m)
        classes = [Path(m.name).name.removesuffix(".tar") for m in found]
        if not found or len(set(classes)) != len(classes):
            raise DataError(f"{archive} holds no per-class <wnid>.tar files (or repeats one)")
        order = np.argsort(classes, kind="stable")
        found, classes = [found[i] for i in order], [classes[i] for i in order]
        listings = []
        for m in tqdm(found, unit="class", desc="scan", disable=not progress):
            listing = []
            try:
                for x in tarfile.open(fileobj=_Window(f, m.offset_data, m.size), mode="r:"):
                    if x.isfile() and _bad_name(x.name):
                        path = f"{archive}/{m.name}/{_shown(x.name)}"
                        unlisted.append({"path": path, "reason": _bad_name(x.name)})
                    elif x.isfile():
                        # A member cut off by the end of its class tar keeps what is there.
                        size = max(0, min(x.size, m.size - x.offset_data))
                        listing.append((x.name, size, m.offset_data + x.offset_data))
            except (tarfile.TarError, OSError) as e:
                reason = f"unreadable: {type(e).__name__}: {e}"
                if listing:  # the images listed before the cut are converted (or listed)
                    last = listing[-1][0]
                    reason = (
                        f"truncated: {len(listing)} images listed, up to {last}; the rest of "
                        f"the class tar cannot be read ({type(e).__name__}: {e})"
                    )
                unlisted.append({"path": f"{archive}/{m.name}", "reason": reason})
            listings.append(listing)
    prefixes = [f"{archive}/{m.name}" for m in found]
    return Source(**_collect(classes, prefixes, listings, archive, "tar"), unlisted=unlisted)


def scan_source(source, progress: bool = False, cache_dir=None) -> Source:
    """List every image of `source`: a folder `<source>/train/<wnid>/*` or a tar of per-class
    tars (`ILSVRC2012_img_train.tar`, read in place); classes sorted by wnid -> labels 0..K-1.

    A tar's listing (1.28 M header reads for ImageNet, scattered over the archive) is kept in
    `cache_dir`, keyed by the archive's path, size and mtime, so that each resolution's
    `prepare` after the first reads it back instead of scanning again.
    """
    path = Path(source)
    if not path.is_file():
        return _scan_folder(path, progress)
    if cache_dir is None:
        return _scan_tar(path, progress)
    stat = path.stat()
    key = f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}"
    cached = Path(cache_dir) / f"tar-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
    if cached.is_file():
        try:
            return _read_listing(cached, path)
        except (OSError, ValueError, KeyError) as e:
            print(f"warning: rescanning {path}: unreadable listing {cached} ({e})", file=sys.stderr)
    source = _scan_tar(path, progress)
    _write_listing(source, cached)
    return source


def _write_listing(source: Source, path: Path) -> None:
    """A tar Source's listing as an npz (plain arrays, no pickles), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_atomic(path) as tmp, tmp.open("wb") as f:
        np.savez(
            f,
            classes=np.asarray(source.classes, dtype=str),
            prefixes=np.asarray(source.prefixes, dtype=str),
            names=np.asarray(source.names, dtype=str),
            labels=source.labels,
            sizes=source.sizes,
            offsets=source.offsets,
            unlisted=np.asarray(json.dumps(source.unlisted)),
        )


def _read_listing(cached: Path, archive: Path) -> Source:
    with np.load(cached, allow_pickle=False) as z:
        return Source(
            location=archive,
            kind="tar",
            classes=z["classes"].tolist(),
            prefixes=z["prefixes"].tolist(),
            names=z["names"].tolist(),
            labels=z["labels"],
            sizes=z["sizes"],
            offsets=z["offsets"],
            unlisted=json.loads(str(z["unlisted"])),
        )


# ----------------------------------------------------------------------------- conversion


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


def check_prepared(
    out_dir, resolution: int, num_classes: int | None = None, owner: str = "generator.num_classes"
) -> dict:
    """The manifest of the FFCV file at `resolution`, once it agrees with the file and with
    `num_classes` (None: unconditional), which `owner` names in the message; else one
    DataError line naming both values."""
    from ffcv.reader import Reader

    path, listed = beton_path(out_dir, resolution), manifest_path(out_dir, resolution)
    _check_file(path)
    manifest = read_manifest(out_dir, resolution)
    if manifest["resolution"] != resolution:
        raise DataError(f"{listed} is for {manifest['resolution']} px, not {resolution} px")
    classes = len(manifest["classes"])
    if num_classes is not None and classes != num_classes:
        fix = f"set {owner}={classes}, or " if owner.startswith("generator.") else ""
        raise DataError(
            f"{owner}={num_classes} but {listed} lists {classes} classes: "
            f"{fix}prepare data with {num_classes} classes"
        )
    reader = Reader(str(path))
    image = reader.metadata[f"f{reader.field_names.index('image')}"]
    sizes = set(zip(image["height"].tolist(), image["width"].tolist(), strict=True))
    if reader.num_samples != manifest["written"] or sizes - {(resolution, resolution)}:
        found = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise DataError(
            f"{path} holds {reader.num_samples} images of {found} px but its manifest {listed} "
            f"says {manifest['written']} of {resolution} px: they come from different "
            "`polyinr prepare` runs; prepare again"
        )
    return manifest


def decode_square(raw: bytes, resolution: int) -> np.ndarray:
    """Decode an image file of any mode (grayscale, CMYK, palette, PNG named .JPEG...) and
    return its centre square resized to resolution x resolution: (R, R, 3) uint8 RGB.

    Raises on anything that does not decode completely (empty, truncated, not an image).
    """
    if not raw:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about odd EXIF blocks, common in ImageNet
        with Image.open(io.BytesIO(raw)) as image:
            w, h = image.size
            k = 2 * resolution / min(w, h)
            # JPEG only: libjpeg scales by 1/2, 1/4 or 1/8 while decoding, never below 2x the
            # target, and Lanczos does the rest. The whole stream is still decoded (truncation
            # still raises); decoding a 500x375 photo for 64 px gets ~3x faster.
            image.draft("RGB", (math.ceil(w * k), math.ceil(h * k)))
            rgb = image.convert("RGB")  # CMYK, L, P, RGBA -> RGB; forces the full decode
    return _square(rgb, resolution)


def _square(image: Image.Image, resolution: int) -> np.ndarray:
    """Centre-crop to a square and resize to resolution x resolution: (R, R, 3) uint8."""
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    # reducing_gap lets PIL box-reduce by an integer factor first: fast and still Lanczos-exact.
    out = image.resize((resolution, resolution), Image.Resampling.LANCZOS, box, reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)


class _SquareImages:
    """Indexed dataset for ffcv's writer: (R x R x 3 uint8, label) of source[indices[i]]."""

    def __init__(self, source: Source, indices: np.ndarray, resolution: int, failures: Path):
        self.source, self.indices, self.resolution = source, indices, resolution
        self.failures = failures

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        label = int(self.source.labels[j])
        raw = b""
        try:
            raw = self.source.read(j)
            return decode_square(raw, self.resolution), label
        except Exception as e:  # any read or decode error means "skip this file", never crash
            # An exception in an ffcv writer process hangs the parent forever, so record the
            # failure on disk and write a black placeholder; the caller discards the file.
            (self.failures / str(j)).write_text(_reason(raw, e))
            return np.zeros((self.resolution, self.resolution, 3), np.uint8), label


def _reason(raw: bytes, error: Exception) -> str:
    """Why an image was skipped, as '<kind>: <detail>' (kinds: unreadable, empty, not an
    image, corrupt), without addresses of in-memory objects."""
    if isinstance(error, OSError) and not raw:
        return f"unreadable: {type(error).__name__}: {error}"
    if not raw:
        return "empty: 0 bytes"
    if isinstance(error, UnidentifiedImageError):
        return "not an image: no image format recognised"
    return f"corrupt: {type(error).__name__}: {error}"


def _workers(cfg: DataConfig) -> int:
    return cfg.workers if cfg.workers > 0 else len(os.sched_getaffinity(0))


def _write_beton(
    path: Path, source: Source, indices, resolution: int, cfg, progress: bool, publish: bool
) -> tuple[dict[int, str], float]:
    """Write source[indices] to one FFCV file; return ({index: reason} of images that failed,
    seconds spent converting).

    The file is written under a temporary name and renamed to `path` only when every image
    decoded and `publish`, so `path` never holds a partial or placeholder-carrying file.
    """
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField

    fields = {
        "image": RGBImageField(
            write_mode="jpg" if cfg.encoding == "jpg" else "raw",
            jpeg_quality=cfg.jpeg_quality,
            max_resolution=resolution,
        ),
        "label": IntField(),
    }
    start = time.perf_counter()  # after the imports: ffcv's costs seconds, once per process
    # ffcv's own bar says neither what nor img/s and cannot be silenced: swap in ours.
    bar = functools.partial(
        tqdm, unit="img", desc=f"{path.name}", smoothing=0.05, disable=not progress
    )
    plain_bar, ffcv.writer.tqdm = ffcv.writer.tqdm, bar
    try:
        with (
            write_atomic(path) as tmp,
            tempfile.TemporaryDirectory(dir=path.parent) as failures,
        ):
            # 2 MiB is ffcv's smallest page: the default 8 MiB makes tiny files ~20 MB.
            writer = ffcv.writer.DatasetWriter(
                str(tmp), fields, page_size=1 << 21, num_workers=_workers(cfg)
            )
            chunk = int(np.clip(len(indices) // (8 * _workers(cfg)), 1, 100))
            writer.from_indexed_dataset(
                _SquareImages(source, indices, resolution, Path(failures)), chunksize=chunk
            )
            failed = {int(f.name): f.read_text() for f in Path(failures).iterdir()}
            if failed or not publish:
                tmp.unlink()  # publishes nothing
        return failed, time.perf_counter() - start
    finally:
        ffcv.writer.tqdm = plain_bar


def _write_json(path: Path, content: dict) -> None:
    """Write JSON atomically so a reader never sees half a manifest."""
    with write_atomic(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")


def _listing(skipped: list[dict]) -> str:
    return "\n  ".join(f"{s['path']}: {s['reason']}" for s in skipped)


def _check_usable(source: Source, skipped: list[dict], keep, strict: bool) -> None:
    """Raise DataError when strict and anything was skipped, or when nothing is left."""
    if skipped and strict:
        raise DataError(
            f"{len(skipped)} unreadable images (data.strict=true):\n  {_listing(skipped)}"
        )
    if not len(keep):
        example = f"; e.g. {_listing(skipped[:1])}" if skipped else ""
        raise DataError(f"no readable images in {source.location}{example}")


def prepare(cfg: DataConfig, resolutions: Sequence[int], progress: bool = True) -> list[dict]:
    """Convert `cfg.source` into one FFCV file plus manifest per resolution; return manifests.

    Images that do not decode are skipped and listed in the manifests (DataError instead when
    cfg.strict). The smallest resolution is written first and finds them; a file that held
    any is rewritten without them, so bad files cost one extra pass, good ones none.
    """
    start = time.perf_counter()
    source = scan_source(cfg.source, progress, cfg.scan_cache)
    fingerprint = source.fingerprint()  # before any file is written: a manifest must follow
    scan_seconds = time.perf_counter() - start
    empty = source.sizes == 0
    skipped = list(source.unlisted)
    skipped += [{"path": source.path(j), "reason": "empty: 0 bytes"} for j in np.flatnonzero(empty)]
    keep = np.flatnonzero(~empty)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    manifests = []
    for resolution in sorted(resolutions):
        if not len(keep):
            _check_usable(source, skipped, keep, strict=False)
        path = beton_path(out_dir, resolution)
        # Strict with files already known bad: one pass only to name every bad file.
        publish = not (cfg.strict and skipped)
        failed, seconds = _write_beton(path, source, keep, resolution, cfg, progress, publish)
        if failed and manifests:
            # Decoding is deterministic: a new failure now is an I/O problem, not a bad file.
            raise DataError(
                f"images that decoded before failed at {resolution} px:\n  "
                + "\n  ".join(f"{source.path(j)}: {r}" for j, r in failed.items())
            )
        skipped += [{"path": source.path(j), "reason": failed[j]} for j in sorted(failed)]
        keep = np.setdiff1d(keep, list(failed))
        _check_usable(source, skipped, keep, cfg.strict)  # raises before anything is written
        if failed:
            failed, again = _write_beton(path, source, keep, resolution, cfg, progress, True)
            if failed:
                raise DataError(f"images failed on the second pass over {path}: {failed}")
            seconds += again
        # Content only: identical data gives an identical manifest (DVC hashes it, and the
        # reference statistics are keyed by it). Timings go to the log line below.
        manifest = {
            "resolution": resolution,
            "written": len(keep),
            "skipped": skipped,
            "classes": source.classes,
            "per_class": np.bincount(source.labels[keep], minlength=len(source.classes)).tolist(),
            "encoding": cfg.encoding,
            "jpeg_quality": cfg.jpeg_quality,
            "source": str(cfg.source),
            "source_kind": source.kind,
            "source_images": len(source),
            "source_fingerprint": fingerprint,
        }
        _write_json(manifest_path(out_dir, resolution), manifest)
        manifests.append(manifest)
        if progress:
            print(
                f"{path.name}: {len(keep)} images in {seconds:.1f} s "
                f"({len(keep) / max(seconds, 1e-9):.1f} img/s, {_workers(cfg)} workers; "
                f"source listed in {scan_seconds:.1f} s)",
                file=sys.stderr,
            )
    if skipped:
        reasons = collections.Counter(s["reason"].split(":")[0] for s in skipped)
        print(
            f"warning: skipped {len(skipped)} of {len(source) + len(source.unlisted)} source "
            f"images ({', '.join(f'{n} {r}' for r, n in reasons.most_common())}), listed in "
            f"{manifest_path(out_dir, manifests[0]['resolution'])}",
            file=sys.stderr,
        )
    return manifests


# ----------------------------------------------------------------------------- loading


class EpochOrder:
    """This rank's share of a permutation drawn from (seed, epoch), and the flips to apply.

    Ranks take interleaved, equal-length slices of one permutation (disjoint; together the
    whole file when its size divides by the world size). `skip` batches at the start of
    the next epoch served are left out, which is how a resumed run continues mid-epoch.
    Also a ffcv TraversalOrder: ffcv builds orders by calling them with the Loader.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, drop_last: bool):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.skip = 0

    def __call__(self, loader):
        return self

    def share(self, epoch: int) -> np.ndarray:
        """Indices this rank reads in `epoch`, in order: (n // world [rounded to batches],)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        share = perm[self.rank :: self.world][: self.n // self.world]
        if self.drop_last:
            share = share[: len(share) // self.batch_size * self.batch_size]
        return share

    def flips(self, epoch: int) -> np.ndarray:
        """Whether each image of the file is mirrored in `epoch`: (n,) bool."""
        return np.random.default_rng([self.seed, epoch, 1]).random(self.n) < 0.5

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.share(epoch)[self.skip * self.batch_size :].astype(np.uint64)


class Batches:
    """Iterable over (images in [-1, 1], int64 labels) batches of an FFCV file, one epoch per
    `for` loop, that knows its position (epoch, batch) and can start from any position."""

    def __init__(self, loader, order: EpochOrder, device: torch.device, mirror: bool):
        self.ffcv = loader  # the underlying ffcv.loader.Loader
        self.order, self.device, self.mirror = order, device, mirror
        self.epoch, self.batch = 0, 0
        self.per_epoch = -(-len(order.share(0)) // order.batch_size)

    def __len__(self) -> int:
        """Batches per epoch (of this rank)."""
        return self.per_epoch

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batches of it already served): where the next `for` loop starts."""
        if self.batch >= len(self):
            return self.epoch + 1, 0
        return self.epoch, self.batch

    def seek(self, epoch: int, batch: int) -> None:
        """Start the next `for` loop at batch `batch` of epoch `epoch`."""
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"no position (epoch {epoch}, batch {batch}): {len(self)} per epoch")
        self.epoch, self.batch = epoch, batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.position
        self.epoch, self.batch = epoch, start
        share, bs = self.order.share(epoch), self.order.batch_size
        flips = torch.from_numpy(self.order.flips(epoch)) if self.mirror else None
        self.order.skip, self.ffcv.next_epoch = start, epoch
        for k, (images, labels) in enumerate(self.ffcv, start):
            if flips is not None:  # mirror on uint8: a quarter of the memory traffic of float
                flip = flips[torch.from_numpy(share[k * bs : (k + 1) * bs])]
                flip = flip.to(self.device, non_blocking=True)[:, None, None, None]
                images = torch.where(flip, images.flip(3), images)  # (B, 3, R, R) uint8
            # A new tensor (ffcv reuses its buffers), scaled from uint8 to [-1, 1].
            x = images.to(torch.float32).div_(127.5).sub_(1.0)  # (B, 3, R, R)
            self.batch = k + 1
            yield x, labels.reshape(-1).to(torch.int64, copy=True)  # (B,)
        self.epoch, self.batch = epoch + 1, 0


def _pipelines(device: torch.device) -> dict:
    """FFCV pipelines producing uint8 NCHW images and labels on `device`."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    # No NormalizeImage: on the CPU, ToTensor -> ToTorchImage -> NormalizeImage hangs inside
    # ffcv's Loader, so scaling to [-1, 1] happens in torch (Batches.__iter__). Flips happen
    # there too: ffcv's RandomHorizontalFlip draws from an unseeded generator.
    image = [SimpleRGBImageDecoder(), ToTensor(), ToDevice(device, non_blocking=True)]
    image += [ToTorchImage(channels_last=False)]
    label = [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True)]
    return {"image": image, "label": label}


def _check_file(path) -> None:
    if not Path(path).is_file():
        raise DataError(f"no FFCV file at {path}; run `polyinr prepare` first")


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
    """Shuffled training batches from an FFCV file, epoch e in an order drawn from (seed, e);
    each rank its own disjoint share when `distributed` (torch.distributed initialised)."""
    from ffcv.loader import Loader
    from ffcv.reader import Reader
    from ffcv.traversal_order.base import TraversalOrder

    TraversalOrder.register(EpochOrder)  # ffcv accepts only (virtual) TraversalOrder instances

    _check_file(path)
    device = torch.device(device)  # ToDevice rejects strings
    if distributed and not torch.distributed.is_initialized():
        raise DataError("distributed=True needs an initialised torch.distributed process group")
    rank, world = rank_world() if distributed else (0, 1)
    n = int(Reader(str(path)).num_samples)
    if n // world < (batch_size if drop_last else 1):
        raise DataError(
            f"{path} holds {n} images: too few for {world} rank(s) x batch {batch_size}"
        )
    order = EpochOrder(n, batch_size, seed, rank, world, drop_last)
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=workers,
        order=order,
        seed=seed,
        drop_last=drop_last,
        pipelines=_pipelines(device),
    )
    return Batches(loader, order, device, mirror)


def read_all(
    path, batch_size: int = 256, workers: int = 2
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of an FFCV file in file order as uint8 (B, 3, R, R) with int64 labels."""
    from ffcv.loader import Loader, OrderOption

    _check_file(path)
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=workers,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines=_pipelines(torch.device("cpu")),
    )
    for images, labels in loader:
        # ffcv reuses its output buffers, so both tensors are copied before yielding.
        yield images.clone(), labels.reshape(-1).to(torch.int64, copy=True)
