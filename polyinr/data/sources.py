"""Training-image sources, listed without extracting: an ImageNet folder
(<root>/train/<wnid>/*.JPEG) or ILSVRC2012_img_train.tar read in place."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from polyinr.core.errors import DataError
from polyinr.core.storage import write_atomic

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
