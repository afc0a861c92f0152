"""Sampling from a trained generator: w codes from (class, seed), chunked rendering at any
resolution and field of view, and the sample grids, walks and mixes built from them."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from polyinr.model import video
from polyinr.model.generator import Generator, coordinate_grid, seed_latents, to_uint8

# Pixel evaluations per synthesis call. Peak memory is about chunk x hidden x 4 bytes x a
# few live activations (~1 GB at the paper's hidden=1024), whatever the output resolution.
DEFAULT_CHUNK = 65536
# Smaller calls are slow, and PyTorch's CPU bmm switches to another kernel below ~100 rows,
# which would break "chunked == full, bit for bit".
MIN_CHUNK = 1024
# The paper's figures: shape mixing copies levels 0-4 of A, style mixing levels 5-9
# (None: up to the last level).
MIX_PRESETS = {"shape": (0, 5), "style": (5, None)}
FULL_VIEW = (0.0, 0.0, 1.0, 1.0)
# `generate`'s format from the output's suffix; any other is a folder of PNGs.
FORMATS = {".npz": "npz", ".png": "grid", ".jpg": "grid"}
WALK_SUFFIXES = (".gif", ".mp4", ".png")  # animations, or a strip of frames


def view_grid(height: int, width: int | None = None, box=FULL_VIEW, device=None) -> torch.Tensor:
    """Coordinates of an H x W image of the region box = (top, left, bottom, right): (H, W, 2).

    The training frame is (0, 0, 1, 1) and gives `coordinate_grid` exactly. Values outside
    [0, 1] extrapolate beyond the frame; a smaller box zooms in. The trained R x R grid is
    every s-th pixel of the grid of size s(R - 1) + 1 (exact super-resolution).
    """
    width = height if width is None else width
    top, left, bottom, right = (float(v) for v in box)

    def axis(n, lo, hi):
        a = torch.arange(n, dtype=torch.float32, device=device) / max(n - 1, 1)
        return lo + (hi - lo) * a

    rows, cols = axis(height, top, bottom), axis(width, left, right)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)  # (H, W, 2)


def pairs(classes: Sequence[int], seeds: Sequence[int]) -> list[tuple[int, int]]:
    """Key samples (class, seed): equal-length lists, or one side of length 1 broadcast."""
    cs, ss = list(classes), list(seeds)
    if len(cs) == 1:
        cs = cs * len(ss)
    elif len(ss) == 1:
        ss = ss * len(cs)
    if len(cs) != len(ss):
        raise ValueError(
            f"{len(cs)} classes and {len(ss)} seeds: give equal counts, or one of either"
        )
    return list(zip(cs, ss, strict=True))


def random_classes(seeds: Iterable[int], num_classes: int) -> list[int]:
    """One uniformly drawn class per seed, a function of the seed alone (ADM-style sampling)."""
    return [int(np.random.default_rng([s, 1]).integers(num_classes)) for s in seeds]


@torch.no_grad()
def mapping(g: Generator, classes: Sequence[int], seeds: Sequence[int], psi: float) -> torch.Tensor:
    """w codes of paired (class, seed) lists: (N, L, w_dim).

    One sample per call, so a sample's w never depends on what else was asked for (small
    matrix products take batch-size-dependent kernels).
    """
    if len(classes) != len(seeds):
        raise ValueError(f"{len(classes)} classes but {len(seeds)} seeds: pass one per sample")
    device = next(g.parameters()).device
    # The generator's own config decides what it can draw (never params.yaml).
    if g.cfg.conditional:
        bad = sorted({c for c in classes if not 0 <= c < g.cfg.num_classes})
        if bad:
            raise ValueError(
                f"class {', '.join(map(str, bad))} requested, but the generator has "
                f"{g.cfg.num_classes} classes (0 to {g.cfg.num_classes - 1})"
            )
    elif any(c != 0 for c in classes):
        bad = sorted({c for c in classes if c != 0})
        raise ValueError(
            f"class {', '.join(map(str, bad))} requested, but the generator is unconditional "
            "(no classes: leave --classes at 0)"
        )
    z = seed_latents(seeds, g.cfg.z_dim, device)  # (N, z_dim)
    ws = []
    for i, c in enumerate(classes):
        label = torch.tensor([c], device=device) if g.cfg.conditional else None
        ws.append(g.mapping(z[i : i + 1], label, psi=psi))  # (1, L, w_dim)
    return torch.cat(ws)  # (N, L, w_dim)


def mix(ws_a: torch.Tensor, ws_b: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Targets B with levels [start, stop) copied from sources A: (NA, L, D), (NB, L, D) ->
    (NA, NB, L, D); entry [i, j] is B_j with A_i's w at those levels."""
    levels = ws_a.shape[1]
    if not 0 <= start <= stop <= levels:
        raise ValueError(f"levels [{start}, {stop}) outside the generator's [0, {levels})")
    out = ws_b.unsqueeze(0).repeat(len(ws_a), 1, 1, 1)  # (NA, NB, L, D)
    out[:, :, start:stop] = ws_a[:, None, start:stop]
    return out


def mix_levels(spec: str, levels: int) -> tuple[int, int]:
    """'shape', 'style' or 'a:b' -> the half-open level range [a, b) of a generator."""
    if spec in MIX_PRESETS:
        start, stop = MIX_PRESETS[spec]
        stop = levels if stop is None else stop
    else:
        try:
            start, stop = (int(v) for v in spec.split(":"))
        except ValueError:
            raise ValueError(f"levels {spec!r}: use shape, style or START:STOP") from None
    if not 0 <= start <= stop <= levels:
        raise ValueError(f"levels {spec!r} = [{start}, {stop}) outside [0, {levels})")
    return start, stop


def interpolate(ws_keys: torch.Tensor, steps: int) -> torch.Tensor:
    """A path through K key codes, linear in w: (K, L, D) -> ((K - 1) * steps + 1, L, D).

    Each segment has `steps` frames; the keys themselves are frames 0, steps, 2 steps, ...
    (torch.lerp returns the end points exactly).
    """
    if len(ws_keys) < 2 or steps < 1:
        raise ValueError("interpolation needs at least 2 keys and steps >= 1")
    t = torch.arange(steps, dtype=ws_keys.dtype, device=ws_keys.device) / steps  # (S,)
    t = t.view(1, steps, 1, 1)
    frames = torch.lerp(ws_keys[:-1, None], ws_keys[1:, None], t)  # (K-1, S, L, D)
    return torch.cat([frames.flatten(0, 1), ws_keys[-1:]])  # (F, L, D)


@torch.no_grad()
def render(
    g: Generator,
    ws: torch.Tensor,
    coords: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: bool = False,
) -> torch.Tensor:
    """ws (N, L, w_dim), coords (..., 2) -> images (N, 3, ...) in about [-1, 1], on ws's device.

    Images are rendered one at a time in calls of exactly `chunk` pixels (the last call is
    padded), so peak memory is set by `chunk`, not by the resolution, and the result is the
    same bit for bit whatever the chunk (pixels are independent).
    """
    if chunk < MIN_CHUNK:
        raise ValueError(f"chunk must be >= {MIN_CHUNK} pixels, got {chunk}")
    coords = view_grid(g.resolution) if coords is None else coords
    shape = coords.shape[:-1]
    flat = coords.reshape(-1, 2).to(ws.device)  # (P, 2)
    P = len(flat)
    n = min(chunk, P)
    calls = -(-P // n)
    flat = torch.cat([flat, flat[-1:].expand(calls * n - P, 2)])  # (calls * n, 2)
    out = torch.empty(len(ws), 3, P, device=ws.device)
    bar = tqdm(total=len(ws) * calls, desc="render", unit="chunk", disable=not progress)
    for i in range(len(ws)):
        for k in range(calls):
            rgb = g.synthesis(ws[i : i + 1], flat[k * n : (k + 1) * n])  # (1, 3, n)
            stop = min((k + 1) * n, P)
            out[i, :, k * n : stop] = rgb[0, :, : stop - k * n]
            bar.update()
    bar.close()
    return out.reshape(len(ws), 3, *shape)


def tile(images: np.ndarray, rows: int, pad: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one (rows x cols) grid image, `pad` white pixels between tiles."""
    n, h, w, _ = images.shape
    cols = -(-n // rows)
    canvas = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        canvas[r * (h + pad) : r * (h + pad) + h, k * (w + pad) : k * (w + pad) + w] = image
    return canvas


def grid(g: Generator, classes, seeds, psi: float, rows: int, resolution=None) -> np.ndarray:
    """Samples for paired (class, seed) lists as one uint8 (H, W, 3) grid of `rows` rows."""
    device = next(g.parameters()).device
    c = torch.as_tensor(classes, dtype=torch.long, device=device) if g.cfg.conditional else None
    z = seed_latents(seeds, g.cfg.z_dim, device)
    coords = None if resolution is None else coordinate_grid(resolution, device)
    with torch.no_grad():
        return tile(to_hwc(g(z, c, psi=psi, coords=coords)), rows)


def to_hwc(images: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), exported as samples are."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def upscale(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour enlargement of uint8 (N, h, w, 3) to (N, H, W, 3), H, W multiples."""
    n, h, w, _ = images.shape
    if (size[0] % h) or (size[1] % w):
        raise ValueError(f"cannot enlarge {h}x{w} to {size[0]}x{size[1]} by whole pixels")
    return images.repeat(size[0] // h, axis=1).repeat(size[1] // w, axis=2)


class NpzWriter:
    """An ADM-format sample file written as it is rendered (bounded memory, any N):
    `arr_0` uint8 (N, H, W, 3) and `arr_1` int64 labels (N,), readable by np.load."""

    def __init__(self, path: str | Path, n: int, height: int, width: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shape = (n, height, width, 3)
        self.labels: list[int] = []
        self.written = 0
        self.zip = zipfile.ZipFile(self.path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.arr = self.zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": "|u1", "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.arr, header)

    def write(self, images: np.ndarray, labels: Sequence[int]) -> None:
        """Append uint8 (n, H, W, 3) images and their labels."""
        if images.shape[1:] != self.shape[1:] or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 (n, {self.shape[1:]}), got {images.shape}")
        self.arr.write(np.ascontiguousarray(images).tobytes())
        self.labels += [int(c) for c in labels]
        self.written += len(images)

    def close(self) -> None:
        """Finish arr_0 (checking the count) and write arr_1."""
        self.arr.close()
        if self.written != self.shape[0]:
            self.zip.close()
            raise ValueError(f"{self.path}: wrote {self.written} of {self.shape[0]} images")
        with self.zip.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(self.labels, dtype=np.int64))
        self.zip.close()


def save_image(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) image (PNG, JPEG, ... by the suffix), making its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def render_images(
    g: Generator,
    ws: torch.Tensor,
    size: tuple[int, int] | None = None,
    view=FULL_VIEW,
    chunk: int = DEFAULT_CHUNK,
    progress: bool = False,
) -> np.ndarray:
    """ws (N, L, w_dim) rendered at size (H, W) (default: the trained one) over the region
    `view`: uint8 (N, H, W, 3)."""
    size = size or (g.resolution, g.resolution)
    return to_hwc(render(g, ws, view_grid(*size, box=view), chunk, progress))


def grid_samples(
    g: Generator, classes: Sequence[int] | None, seeds: Sequence[int]
) -> tuple[list[int], list[int], int]:
    """Paired (classes, seeds) of a grid and its row count: every class with every seed, a row
    per class; or, with classes None, one random class per seed in rows of 8."""
    if classes is None:
        # An unconditional generator has no classes: label 0 throughout.
        cond = g.cfg.conditional
        drawn = random_classes(seeds, g.cfg.num_classes) if cond else [0] * len(seeds)
        return drawn, list(seeds), -(-len(seeds) // 8)
    return [c for c in classes for _ in seeds], list(seeds) * len(classes), len(classes)


def generate(
    g: Generator,
    out: str | Path,
    classes: Sequence[int] | None,
    seeds: Sequence[int],
    psi: float,
    sizes: Sequence[tuple[int, int]] = (),
    fmt: str | None = None,
    view=FULL_VIEW,
    chunk: int = DEFAULT_CHUNK,
    progress: bool = False,
) -> tuple[str, int]:
    """Every class with every seed (or, with classes None, one random class per seed) written
    to `out` as fmt (default: from the suffix, FORMATS): 'grid', one image with a row per
    class (rows of 8 for random classes), each sample at every size side by side; 'pngs', a
    folder of PNGs; 'npz', ADM's format. Returns (fmt, number of samples)."""
    out = Path(out)
    fmt = fmt or FORMATS.get(out.suffix, "pngs")
    sizes = list(sizes) or [(g.resolution, g.resolution)]
    if fmt != "grid" and len(sizes) > 1:
        raise ValueError("several resolutions are for --format grid only")
    classes, seeds, rows = grid_samples(g, classes, seeds)
    ws = mapping(g, classes, seeds, psi)  # (N, L, w_dim)
    if fmt == "grid":
        # Each sample at every resolution, enlarged (nearest) to the largest for comparison.
        big = max(sizes)
        per_size = [upscale(render_images(g, ws, hw, view, chunk, progress), big) for hw in sizes]
        grid = np.stack(per_size, axis=1).reshape(-1, *per_size[0].shape[1:])
        save_image(out, tile(grid, rows))
        return fmt, len(ws)
    if fmt == "npz":
        writer = NpzWriter(out, len(ws), *sizes[0])
    else:
        out.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(len(ws)), desc="generate", unit="img", disable=not progress):
        image = render_images(g, ws[i : i + 1], sizes[0], view, chunk)
        if fmt == "npz":
            writer.write(image, classes[i : i + 1])
        else:
            Image.fromarray(image[0]).save(out / f"{i:06d}-class{classes[i]}-seed{seeds[i]}.png")
    if fmt == "npz":
        writer.close()
    return fmt, len(ws)


def walk(
    g: Generator,
    keys: Sequence[tuple[int, int]],
    psi: float,
    steps: int,
    size: tuple[int, int] | None = None,
    view=FULL_VIEW,
    chunk: int = DEFAULT_CHUNK,
    progress: bool = False,
) -> np.ndarray:
    """Frames of a walk, linear in w, through key samples (class, seed), `steps` frames from
    one key to the next: uint8 ((K - 1) * steps + 1, H, W, 3)."""
    if len(keys) < 2:
        raise ValueError("interpolation needs at least two keys: several seeds or classes")
    ws_keys = mapping(g, [c for c, _ in keys], [s for _, s in keys], psi)  # (K, L, w_dim)
    return render_images(g, interpolate(ws_keys, steps), size, view, chunk, progress)


def write_walk(path: str | Path, frames: np.ndarray, fps: float, strip: int, loop: bool) -> None:
    """A walk's frames as a .png strip of `strip` evenly spaced frames, or an animation."""
    path = Path(path)
    if path.suffix not in WALK_SUFFIXES:
        raise ValueError(f"{path}: use .gif or .mp4 (animation) or .png (strip)")
    if path.suffix == ".png":
        picks = np.linspace(0, len(frames) - 1, min(strip, len(frames))).round().astype(int)
        save_image(path, tile(frames[picks], rows=1, pad=2))
    else:
        # A loop's last frame is its first: drop it so the animation cycles smoothly.
        video.write(path, frames[:-1] if loop else frames, fps)


def mix_grid(
    g: Generator,
    sources: Sequence[tuple[int, int]],
    targets: Sequence[tuple[int, int]],
    levels: tuple[int, int],
    psi: float,
    size: tuple[int, int] | None = None,
    view=FULL_VIEW,
    chunk: int = DEFAULT_CHUNK,
    progress: bool = False,
) -> np.ndarray:
    """Targets B (class, seed) with levels [start, stop) of sources A's w as one uint8 grid:
    row 0 the targets, column 0 the sources, cell (i, j) B_j with A_i's levels."""
    ws_a = mapping(g, [c for c, _ in sources], [s for _, s in sources], psi)
    ws_b = mapping(g, [c for c, _ in targets], [s for _, s in targets], psi)
    mixed = mix(ws_a, ws_b, *levels)  # (NA, NB, L, w_dim)
    ws = torch.cat([ws_b, ws_a, mixed.flatten(0, 1)])
    rendered = render_images(g, ws, size, view, chunk, progress)  # (NB + NA + NA * NB, H, W, 3)
    nb, na = len(targets), len(sources)
    blank = np.full_like(rendered[:1], 255)
    rows = [np.concatenate([blank, rendered[:nb]])]
    for i in range(na):
        cells = rendered[nb + na + i * nb : nb + na + (i + 1) * nb]
        rows.append(np.concatenate([rendered[nb + i : nb + i + 1], cells]))
    return tile(np.concatenate(rows), rows=na + 1, pad=2)
