"""A source -> one FFCV file per training resolution, with a JSON manifest (written,
skipped, classes); corrupt images are reported and skipped."""

from __future__ import annotations

import collections
import functools
import io
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from polyinr.core.config import DataConfig
from polyinr.core.errors import DataError
from polyinr.core.storage import write_atomic
from polyinr.data.sources import Source, scan_source

# ----------------------------------------------------------------------------- conversion


def beton_path(out_dir, resolution: int) -> Path:
    """Path of the FFCV file for one resolution."""
    return Path(out_dir) / f"train_{resolution}.beton"


def manifest_path(out_dir, resolution: int) -> Path:
    """Path of the JSON manifest written beside the FFCV file."""
    return Path(out_dir) / f"train_{resolution}.json"


def check_file(path) -> None:
    """Raise DataError unless the FFCV file at `path` exists."""
    if not Path(path).is_file():
        raise DataError(f"no FFCV file at {path}; run `polyinr prepare` first")


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
    check_file(path)
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
    """Indexed dataset for ffcv's writer: (R x R x 3 uint8, label) of source[indices[i]].

    ffcv's writer processes each claim the next free pages of the file, so with several of
    them the bytes depend on which finishes first. So one writer process asks for the images
    in index order, and `workers` processes forked from it decode ahead of it (Pool.imap
    keeps the order): the same file whatever the worker count.
    """

    def __init__(self, source: Source, indices, resolution: int, failures: Path, workers: int):
        self.source, self.indices, self.resolution = source, indices, resolution
        self.failures, self.workers = failures, workers
        self._ahead = None  # (pool, iterator of (i, item)), opened in the writer process

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if self.workers <= 1:
            return self.decode(i)
        if self._ahead is None:
            global _DECODING
            _DECODING = self  # what the forked decoders work on: tasks are only indices
            pool = multiprocessing.get_context("fork").Pool(self.workers)
            chunk = int(np.clip(len(self) // (8 * self.workers), 1, 100))
            self._ahead = pool, enumerate(pool.imap(_decode, range(len(self)), chunk))
        pool, ahead = self._ahead
        k, item = next(ahead)
        if k != i:
            raise RuntimeError(f"ffcv's writer asked for image {i} out of order (expected {k})")
        if i == len(self) - 1:
            pool.close()
            pool.join()
        return item

    def decode(self, i):
        """Image i, or a black placeholder when it does not decode (see below)."""
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


_DECODING: _SquareImages | None = None  # set in the writer process before it forks decoders


def _decode(i: int):
    return _DECODING.decode(i)


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
            # One writer process: pages in index order (_SquareImages decodes in parallel).
            writer = ffcv.writer.DatasetWriter(str(tmp), fields, page_size=1 << 21, num_workers=1)
            images = _SquareImages(source, indices, resolution, Path(failures), _workers(cfg))
            writer.from_indexed_dataset(images, chunksize=100)
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
