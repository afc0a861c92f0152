"""Sampling from a trained generator: w codes from (class, seed), chunked rendering at any
resolution and field of view, interpolation and level mixing in w space, image files."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from polyinr.generator import Generator, seed_latents, to_uint8

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
