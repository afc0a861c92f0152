"""The demo datasets, drawn procedurally in ImageNet's folder layout (`polyinr demo-data`):
`shapes` (one shape per class, random colours), `glyphs` (one character per class,
classes that differ in details) and `colours` (one colour distribution per class, the same
shapes in every class). data.demo_kind picks one; the learning benchmark uses all three."""

from __future__ import annotations

import colorsys
import functools
import importlib.util
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from polyinr.core.errors import DataError

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


def _contrasting_colours(
    rng: np.random.Generator, fg_sat: float, bg_sat: float, bg_val: float
) -> tuple[tuple, tuple]:
    """A bright foreground (saturation >= fg_sat) and a dark background (saturation <= bg_sat,
    value <= bg_val) of unrelated random hues, as RGB 0-255."""
    hue = rng.uniform(0, 1)
    fg = colorsys.hsv_to_rgb(hue, rng.uniform(fg_sat, 1.0), rng.uniform(0.75, 1.0))
    bg_hue = (hue + rng.uniform(0.25, 0.75)) % 1.0
    bg = colorsys.hsv_to_rgb(bg_hue, rng.uniform(0.0, bg_sat), rng.uniform(0.05, bg_val))
    return tuple(round(255 * v) for v in fg), tuple(round(255 * v) for v in bg)


def _demo_image(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    """Render one demo image of class `label`: its shape in a random colour, random jitter.

    Classes beyond the ten shapes repeat them as a 2x2, 3x3, ... tiling (structure again).
    """
    shape = _DEMO_SHAPES[label % len(_DEMO_SHAPES)]
    tiles = 1 + label // len(_DEMO_SHAPES)
    fill, bg = _contrasting_colours(rng, fg_sat=0.6, bg_sat=0.5, bg_val=0.3)
    canvas = 2 * size  # draw at 2x, then downsample: cheap antialiasing
    image = Image.new("RGB", (canvas, canvas), bg)
    draw, cell = ImageDraw.Draw(image), canvas / tiles
    r = cell * rng.uniform(0.22, 0.34)
    jitter = rng.uniform(-0.12, 0.12, size=2) * cell
    for i in range(tiles):
        for j in range(tiles):
            cx, cy = (i + 0.5) * cell + jitter[0], (j + 0.5) * cell + jitter[1]
            _draw_shape(draw, shape, cx, cy, r, fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


# Ten characters of DejaVu Sans (the font matplotlib ships): classes that differ in strokes
# and details, not in coarse shape or colour.
GLYPHS = "0123456789"
_FONT = "mpl-data/fonts/ttf/DejaVuSans-Bold.ttf"


@functools.cache
def _font_path() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    path = Path(spec.submodule_search_locations[0]) / _FONT if spec else None
    if path is None or not path.is_file():
        raise DataError("the glyphs demo draws DejaVu Sans from matplotlib: pip install matplotlib")
    return path


def _glyph_image(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    """One character of class `label`: random position, scale, rotation, stroke and colours,
    and a little noise."""
    fg, bg = _contrasting_colours(rng, fg_sat=0.5, bg_sat=0.6, bg_val=0.35)
    canvas = 2 * size
    font = ImageFont.truetype(str(_font_path()), round(canvas * rng.uniform(0.55, 0.8)))
    glyph = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(glyph).text(
        (canvas / 2, canvas / 2),
        GLYPHS[label % len(GLYPHS)],
        fill=255,
        font=font,
        anchor="mm",
        stroke_width=int(rng.integers(0, 3)),
        stroke_fill=255,
    )
    shift = rng.uniform(-0.1, 0.1, size=2) * canvas
    glyph = glyph.rotate(rng.uniform(-15, 15), Image.Resampling.BILINEAR, translate=tuple(shift))
    image = Image.composite(
        Image.new("RGB", glyph.size, fg), Image.new("RGB", glyph.size, bg), glyph
    )
    image = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float64)
    noisy = image + rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def _colour_image(label: int, rng: np.random.Generator, size: int, classes: int) -> Image.Image:
    """A random shape of any class, in the colour of class `label`: its hue is the class's
    (evenly spaced around the wheel, +-0.02), saturation and value vary as in `shapes`."""
    hue = (label / classes + rng.uniform(-0.02, 0.02)) % 1.0
    fg = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    bg = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.3), rng.uniform(0.05, 0.3))
    shape = _DEMO_SHAPES[int(rng.integers(len(_DEMO_SHAPES)))]
    canvas = 2 * size
    image = Image.new("RGB", (canvas, canvas), tuple(round(255 * v) for v in bg))
    r = canvas * rng.uniform(0.22, 0.34)
    cx, cy = canvas * (0.5 + rng.uniform(-0.12, 0.12, size=2))
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, tuple(round(255 * v) for v in fg))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def demo_image(kind: str, label: int, rng: np.random.Generator, size: int, classes: int):
    """One image of class `label` of the demo dataset `kind` (DEMO_KINDS in core/config.py)."""
    if kind == "shapes":
        return _demo_image(label, rng, size)
    if kind == "glyphs":
        return _glyph_image(label, rng, size)
    if kind == "colours":
        return _colour_image(label, rng, size, classes)
    raise ValueError(f"unknown demo dataset {kind!r}: shapes, glyphs or colours")


def make_demo_dataset(
    root, classes: int, per_class: int, size: int, seed: int, kind: str = "shapes"
) -> int:
    """Write a procedural ImageNet-layout dataset under `root/train` and return its size."""
    if kind == "glyphs" and classes > len(GLYPHS):
        raise DataError(f"the glyphs demo has {len(GLYPHS)} classes, not {classes}")
    train = Path(root) / "train"
    if train.exists():
        shutil.rmtree(train)
    for label in range(classes):
        wnid = f"n{label:08d}"  # zero-padded so sorted names give label order
        folder = train / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, label, i])
            image = demo_image(kind, label, rng, size, classes)
            image.save(folder / f"{wnid}_{i}.JPEG", quality=_DEMO_JPEG_QUALITY)
    return classes * per_class
