"""Reference statistics: an ADM reference batch, or the training data read once and cached
(locally and in storage.uri), keyed by data, resolution, protocol and feature weights."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from polyinr import data
from polyinr.core.distributed import rank_world
from polyinr.core.storage import Folder, write_atomic
from polyinr.evaluation.featurenets import file_sha256
from polyinr.evaluation.featurestats import (
    PartialPass,
    accumulate,
    all_reduce,
    distributed,
    rank_share,
)

# Real images for precision/recall: ADM compares 10k reference images against all samples;
# StyleGAN-XL (stylegan2-ada's pr50k3_full) uses up to 200k training images.
PR_REFERENCE = {"adm": 10_000, "stylegan-xl": 200_000}
PARTIAL_SECONDS = 60.0  # how often an unfinished reference pass saves its running state
CACHE_VERSION = 2  # bump when what a cached reference holds changes
# What a prepared file's images are: the manifest's content fields. Not its timings, worker
# count, source path or kind (a folder and its tar give the same images), nor the FFCV file's
# size (its page layout depends on the worker count).
CONTENT = ("resolution", "written", "classes", "per_class", "encoding", "jpeg_quality")
VOLATILE = ("seconds", "images_per_second", "scan_seconds", "workers", "source", "skipped")


def data_fingerprint(out_dir, resolution: int) -> str:
    """Identity of a prepared FFCV file's content, from its manifest (the source's
    fingerprint and how it was converted): equal for equal data wherever and however made."""
    manifest = data.read_manifest(out_dir, resolution)
    if "source_fingerprint" in manifest:
        stable = {k: manifest[k] for k in (*CONTENT, "source_fingerprint")}
    else:  # a manifest of an older polyinr
        stable = {k: v for k, v in manifest.items() if k not in VOLATILE}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def _key(fingerprint: str, resolution: int, protocol: str, part: str, weights_id: str) -> str:
    fields = [CACHE_VERSION, fingerprint, resolution, protocol, part, weights_id]
    return f"{part}-{hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:20]}"


class ReferenceCache:
    """Reference arrays as npz files in a local folder and in storage.uri/reference-stats/."""

    def __init__(self, cache_dir, storage_cfg=None):
        self.dir = Path(cache_dir)
        self.shared = Folder(storage_cfg, "reference-stats") if storage_cfg else None

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.dir / f"{key}.npz"
        raw = path.read_bytes() if path.is_file() else None
        if raw is None and self.shared is not None:
            raw = self.shared.get(f"{key}.npz")
            if raw is not None:
                self._write_local(path, raw)
        if raw is None:
            return None
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self._write_local(self.dir / f"{key}.npz", buffer.getvalue())
        if self.shared is not None:
            self.shared.put(f"{key}.npz", buffer.getvalue())

    @staticmethod
    def _write_local(path: Path, raw: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with write_atomic(path) as tmp:
            tmp.write_bytes(raw)


def _npz_length(path: Path) -> int:
    """Number of images in an ADM batch's arr_0, read from its header without loading it."""
    with np.load(path, allow_pickle=False) as npz, npz.zip.open("arr_0.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        return read(f)[0][0]


def _real_batches(source, batch: int):
    """(uint8 (B, 3, R, R), labels) batches of an ADM batch's arr_0 or of an FFCV file."""
    if isinstance(source, Path):  # an ADM batch: arr_0 is (N, H, W, 3) uint8
        with np.load(source, allow_pickle=False) as npz:
            source = npz["arr_0"]
    if isinstance(source, np.ndarray):  # arr_0 of an ADM batch, NHWC uint8
        images = torch.from_numpy(source).permute(0, 3, 1, 2)  # (N, 3, H, W)
        return iter((images[i : i + batch], None) for i in range(0, len(images), batch))
    out_dir, resolution = source
    return data.read_all(data.beton_path(out_dir, resolution), batch_size=batch)


def load_reference(
    cfg, parts, resolution: int, nets, data_dir, storage_cfg, progress=True
) -> dict[str, np.ndarray]:
    """Reference arrays for `parts`: mu, sigma, mu_s, sigma_s, n (fid); pr (N, D); mu_r, sigma_r.

    An ADM reference batch (eval.reference_npz) gives mu, sigma, mu_s, sigma_s as is and its
    arr_0 images for the rest; otherwise the training FFCV file at `resolution` is read once
    for every missing part and the result cached (eval.cache_dir and storage.uri).
    """
    ddof = 1 if cfg.protocol == "adm" else 0  # ADM: np.cov's 1/(N-1); StyleGAN-XL: 1/N
    reference = {}
    if cfg.reference_npz:
        path = Path(cfg.reference_npz)
        if not path.is_file():
            raise FileNotFoundError(f"eval.reference_npz: no ADM reference batch at {path}")
        with np.load(path, allow_pickle=False) as npz:
            missing = {"mu", "sigma", "mu_s", "sigma_s", "arr_0"} - set(npz.files)
            if missing:
                raise ValueError(f"{path} is not an ADM reference batch: no {sorted(missing)}")
            stats = ("mu", "sigma", "mu_s", "sigma_s")
            reference |= {k: npz[k].astype(np.float64) for k in stats}
        num_images = _npz_length(path)
        reference["n"] = np.array(num_images)
        parts = [p for p in parts if p != "fid"]  # the file's statistics are used as they are
        fingerprint, source = f"npz-{_file_digest(path)}", path
    else:
        fingerprint = data_fingerprint(data_dir, resolution)
        num_images = data.read_manifest(data_dir, resolution)["written"]
        source = (data_dir, resolution)
    cache = ReferenceCache(cfg.cache_dir, storage_cfg)
    pr_name, pr_key = nets.pr_network()
    weights = {"fid": "inception", "pr": pr_name, "rfid": "rinception"}
    todo = {}
    for part in parts:
        key = _key(fingerprint, resolution, cfg.protocol, part, nets.get(weights[part]).weights_id)
        found = cache.get(key)
        missing = np.array([found is None], np.float64)
        # Every rank must take part in the same passes, even if only one lacks the cache file.
        if (all_reduce(missing, "max") if distributed() else missing)[0]:
            todo[part] = key
        else:
            reference |= found
    if not todo:
        return reference

    # One pass over the real images for every missing part; P/R keeps an evenly spaced subset.
    stride = math.ceil(num_images / PR_REFERENCE[cfg.protocol])
    stats_keys = (["pool", "spatial"] if "fid" in todo else []) + (
        ["rpool"] if "rfid" in todo else []
    )
    rank, world = rank_world()

    def mine():
        start = 0
        for b, (images, _) in enumerate(_real_batches(source, cfg.batch)):
            if b % world == rank:
                yield start, images
            start += len(images)

    keep = (lambda i: i % stride == 0) if "pr" in todo else (lambda i: np.zeros(len(i), bool))
    row_keys = [pr_key] if "pr" in todo else []
    names = nets.names(todo)
    # Features computed so far are kept on disk: a pass cut short (hours on a CPU for
    # ImageNet) continues where it stopped when the command is run again.
    stem = hashlib.sha256(json.dumps(sorted(todo.values())).encode()).hexdigest()[:20]
    partial = PartialPass(cache.dir / f"pass-{stem}", PARTIAL_SECONDS)
    total = rank_share(num_images, cfg.batch)
    out, rows = accumulate(
        mine(), nets, names, stats_keys, row_keys, keep, "reference", progress, total, partial
    )
    computed = {}
    if "fid" in todo:
        mu, sigma = out["pool"].mean_cov(ddof)
        mu_s, sigma_s = out["spatial"].mean_cov(ddof)
        computed["fid"] = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, n=out["pool"].n)
    if "pr" in todo:
        computed["pr"] = {"pr": rows[pr_key]}
    if "rfid" in todo:
        mu_r, sigma_r = out["rpool"].mean_cov(ddof)
        computed["rfid"] = {"mu_r": mu_r, "sigma_r": sigma_r}
    for part, arrays in computed.items():
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if rank == 0:
            cache.put(todo[part], arrays)
        reference |= arrays
    partial.remove()
    return reference


def _file_digest(path) -> str:
    return file_sha256(path)[:16]
