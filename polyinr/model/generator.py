"""Poly-INR generator: a mapping network and a per-pixel polynomial MLP, as the paper (section
3) and docs/model.md section 2 define them; polyinr/model/fast_synthesis.py renders the same faster.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polyinr.core.config import GeneratorConfig
from polyinr.core.storage import write_atomic
from polyinr.model import fast_synthesis


def coordinate_grid(resolution: int, device=None) -> torch.Tensor:
    """The default pixel coordinates of an R x R image: (R, R, 2), (row, col) in [0, 1]."""
    a = torch.arange(resolution, dtype=torch.float32, device=device) / max(resolution - 1, 1)
    return torch.stack(torch.meshgrid(a, a, indexing="ij"), dim=-1)  # (R, R, 2)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class EqualizedLinear(nn.Module):
    """StyleGAN's fully connected layer with an equalised learning rate."""

    def __init__(self, in_features, out_features, lr_mult=1.0, activation=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.weight_gain = lr_mult / math.sqrt(in_features)
        self.lr_mult = lr_mult
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mult)
        return _lrelu(x) * math.sqrt(2) if self.activation else x


def _normalize_2nd_moment(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class MappingNetwork(nn.Module):
    """z (and a class) -> one w per level (paper section 3.2); per-class w_avg for truncation."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.levels = cfg.levels
        self.w_avg_beta = cfg.w_avg_beta
        if cfg.conditional:
            self.embed = nn.Embedding(cfg.num_classes, cfg.embed_dim)
            # The class projection has StyleGAN's lrelu (gain sqrt 2), as the reference.
            self.embed_fc = EqualizedLinear(cfg.embed_dim, cfg.cond_dim, activation=True)
            in_dim = cfg.z_dim + cfg.cond_dim
        else:
            self.embed = None
            in_dim = cfg.z_dim
        self.fc = nn.ModuleList(
            [
                EqualizedLinear(in_dim, cfg.w_dim, cfg.mapping_lr_mult, activation=True),
                EqualizedLinear(cfg.w_dim, cfg.w_dim, cfg.mapping_lr_mult, activation=True),
            ]
        )
        rows = max(cfg.class_count, 1)
        self.register_buffer("w_avg", torch.zeros(rows, cfg.w_dim))

    def forward(self, z, c=None, psi=1.0, update_w_avg=False):
        """z (B, z_dim), c (B,) int64 or None -> ws (B, levels, w_dim)."""
        # docs/model.md section 2, Mapping: z and the class vector at unit second moment,
        # concatenated, then two equalized layers; the same w at every level.
        x = _normalize_2nd_moment(z)
        if self.embed is not None:
            if c is None:
                raise ValueError("a conditional generator needs class labels c")
            y = _normalize_2nd_moment(self.embed_fc(self.embed(c)))
            x = torch.cat([x, y], dim=1)  # (B, z_dim + cond_dim)
        for layer in self.fc:
            x = layer(x)  # (B, w_dim)
        rows = (
            c if self.embed is not None else torch.zeros(len(z), dtype=torch.long, device=z.device)
        )
        if update_w_avg:
            self._update_w_avg(x.detach(), rows)
        if psi != 1.0:
            # Truncation towards the class average: w = lerp(w_avg[c], w, psi).
            x = torch.lerp(self.w_avg[rows], x, psi)
        return x.unsqueeze(1).repeat(1, self.levels, 1)  # (B, L, w_dim)

    @torch.no_grad()
    def _update_w_avg(self, w: torch.Tensor, rows: torch.Tensor) -> None:
        classes, inverse = torch.unique(rows, return_inverse=True)
        sums = torch.zeros(len(classes), w.shape[1], device=w.device).index_add_(0, inverse, w)
        counts = torch.bincount(inverse, minlength=len(classes)).unsqueeze(1)
        means = sums / counts
        self.w_avg[classes] = torch.lerp(means, self.w_avg[classes], self.w_avg_beta)


HEAD_WEIGHT_GAIN = 0.25


def _init_heads(affine: nn.Linear, hidden: int) -> None:
    """Start every level near the identity: warp M = I, lift bias a = 1, small weights.

    The paper does not fix the init (docs/differences.md). With PyTorch's default init the
    ten multiplicative factors
    lrelu(g_i) have E[lrelu(g)^2] well below 1, so the output of a typical sample vanishes
    (median RMS 0.04 at C=128, 0.01 at C=1024) while a few explode, and the cumulative warp
    contracts the coordinates 40-fold. Gates that start at 1 (as StyleGAN2 starts its style
    affines at bias 1) with head weights at a quarter of the default scale give a median
    RMS of 0.6 at both widths, a light tail and visible spatial structure at step 0.
    """
    with torch.no_grad():
        affine.weight.mul_(HEAD_WEIGHT_GAIN)
        affine.bias[:4] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # warp M, row-major 2x2
        affine.bias[6 + 2 * hidden :] = 1.0  # lift bias a


def _init_mixing(linear: nn.Linear) -> None:
    """He init for leaky ReLU 0.2 and zero bias: each level keeps the signal's scale.

    With PyTorch's default nn.Linear init (weights of std 1/sqrt(3C), biases of the same
    size) every level shrinks the per-pixel signal about sqrt(6)-fold and adds a constant,
    so after ten levels G's output is one flat colour that depends on neither z, the class
    nor the pixel (spread across samples 0.001 at C = 128): G starts collapsed and must
    first grow every W_i. Here samples differ from step 0 (spread 0.2-0.5) with a light
    tail (docs/differences.md).
    """
    with torch.no_grad():
        nn.init.normal_(
            linear.weight, 0.0, math.sqrt(2 / (1 + 0.2**2)) / math.sqrt(linear.in_features)
        )
        linear.bias.zero_()


class PolyLevel(nn.Module):
    """One level of the polynomial: heads read w, then each pixel rises one order."""

    def __init__(self, w_dim: int, hidden: int, first: bool, clamp: float, mixing: str):
        super().__init__()
        self.hidden = hidden
        self.clamp = clamp
        # Level 0 reads w directly; later levels read u = lrelu(FC(w)) (C wide).
        self.style = None if first else EqualizedLinear(w_dim, hidden, activation=True)
        head_in = w_dim if first else hidden
        # The four plain linear heads of docs/model.md section 2 (warp M 2x2, shift b 2,
        # lift A 2xC, lift bias a C) fused into one nn.Linear: identical parameters and init,
        # one matmul.
        self.affine = nn.Linear(head_in, 4 + 2 + 2 * hidden + hidden)
        _init_heads(self.affine, hidden)
        # W_i and d_i: the reference's nn.Linear (lrelu without gain) or StyleGAN's
        # equalized layer (lrelu with gain sqrt 2), docs/model.md section 2.
        if mixing == "plain":
            self.linear, self.gain = nn.Linear(hidden, hidden), 1.0
            _init_mixing(self.linear)
        else:
            self.linear, self.gain = EqualizedLinear(hidden, hidden), math.sqrt(2)

    def heads(self, w):
        """w (B, w_dim) -> warp M (B, 2, 2), shift b (B, 1, 2), lift A (B, 2, C), a (B, 1, C)."""
        B, C = w.shape[0], self.hidden
        u = w if self.style is None else self.style(w)  # (B, C) at levels 1..L-1
        params = self.affine(u)  # (B, 6 + 3C)
        warp = params[:, :4].view(B, 2, 2)
        shift = params[:, 4:6].view(B, 1, 2)
        lift = params[:, 6 : 6 + 2 * C].view(B, 2, C)
        lift_bias = params[:, 6 + 2 * C :].view(B, 1, C)
        return warp, shift, lift, lift_bias

    def forward(self, x, h, w):
        """x (B, P, 2), h (B, P, C) or None (level 0), w (B, w_dim) -> the next x and h.

        The paper's level (section 3.1, eq. 3-5) as docs/model.md section 2 writes it, on
        whole tensors; fast_synthesis computes the same numbers faster.
        """
        warp, shift, lift, lift_bias = self.heads(w)
        # Affine warp of the coordinates, accumulated over levels: x <- x M_i + b_i.
        x = x @ warp + shift  # (B, P, 2)
        # Lift to C channels: g = x A_i + a_i.
        g = x @ lift + lift_bias  # (B, P, C)
        # One polynomial order higher: h <- h * lrelu(g); level 0 starts with h = g.
        h = g if h is None else h * F.leaky_relu(g, 0.2)
        # Channel mixing: h <- clamp(lrelu(W_i h + d_i), -clamp, clamp).
        h = F.leaky_relu(self.linear(h), 0.2) * self.gain  # (B, P, C)
        return x, h.clamp(-self.clamp, self.clamp)


class Synthesis(nn.Module):
    """Per-pixel MLP: coordinates and one w per level -> RGB at those coordinates."""

    def __init__(self, cfg: GeneratorConfig, resolution: int):
        super().__init__()
        self.levels = nn.ModuleList(
            [
                PolyLevel(cfg.w_dim, cfg.hidden, i == 0, cfg.clamp, cfg.mixing)
                for i in range(cfg.levels)
            ]
        )
        self.to_rgb = nn.Linear(cfg.hidden, 3)  # a 1x1 conv with bias
        self.hidden = cfg.hidden
        self.clamp = cfg.clamp
        # Run-time settings that change speed and memory, the numbers by rounding at most:
        # fast=False renders through the levels' forward above instead of fast_synthesis
        # (the reference that tests and benchmarks compare with). The fast path renders CPU
        # inference in chunks of chunk_elements rows x C (None: its default) and, with
        # checkpoint_levels (train.checkpoint_levels), recomputes each level in backward.
        self.fast = True
        self.chunk_elements: int | None = None
        self.checkpoint_levels = False
        self.set_resolution(resolution)

    def set_resolution(self, resolution: int) -> None:
        """Swap the default coordinate grid (a fixed input, never a trained parameter)."""
        self.resolution = resolution
        device = self.to_rgb.weight.device
        self.register_buffer("grid", coordinate_grid(resolution, device), persistent=False)

    def forward(self, ws, coords=None):
        """ws (B, L, w_dim), coords (..., 2) shared by the batch -> RGB (B, 3, ...).

        With coords=None the default grid (R, R, 2) gives images (B, 3, R, R). The output
        has no activation: real images live in [-1, 1].
        """
        B = ws.shape[0]
        coords = self.grid if coords is None else coords
        if self.fast:
            rgb = fast_synthesis.render(self, ws, coords.reshape(-1, 2))  # (B, P, 3)
        else:
            x = coords.to(ws.device, ws.dtype).reshape(1, -1, 2).expand(B, -1, -1)  # (B, P, 2)
            h = None
            for i, level in enumerate(self.levels):
                x, h = level(x, h, ws[:, i])  # (B, P, 2), (B, P, C)
            rgb = self.to_rgb(h)  # (B, P, 3)
        return rgb.transpose(1, 2).reshape(B, 3, *coords.shape[:-1])


class Generator(nn.Module):
    """Class-conditional Poly-INR: (z, c) -> image; any resolution or coordinate set."""

    def __init__(self, cfg: GeneratorConfig, resolution: int):
        super().__init__()
        self.cfg = cfg
        self.mapping = MappingNetwork(cfg)
        self.synthesis = Synthesis(cfg, resolution)

    @property
    def resolution(self) -> int:
        return self.synthesis.resolution

    def forward(self, z, c=None, psi=1.0, coords=None, update_w_avg=False):
        """z (B, z_dim), c (B,) -> images (B, 3, R, R) in about [-1, 1] (or (B, 3, ...))."""
        ws = self.mapping(z, c, psi=psi, update_w_avg=update_w_avg)
        return self.synthesis(ws, coords)


def parameter_counts(g: Generator) -> dict:
    """Trainable parameters per part, as `polyinr summary` reports them."""

    def n(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    levels = [n(level) for level in g.synthesis.levels]
    counts = {"mapping": n(g.mapping), "levels": levels, "to_rgb": n(g.synthesis.to_rgb)}
    counts["total"] = counts["mapping"] + sum(levels) + counts["to_rgb"]
    return counts


def macs_per_image(cfg: GeneratorConfig, resolution: int) -> int:
    """Multiply-adds of one synthesis pass (the per-pixel MLP dominates; mapping excluded)."""
    C, P = cfg.hidden, resolution * resolution
    per_pixel = cfg.levels * (2 * 2 + 2 * C + C * C) + 3 * C
    per_image_heads = cfg.w_dim * (6 + 3 * C) + (cfg.levels - 1) * (cfg.w_dim * C + C * (6 + 3 * C))
    return P * per_pixel + per_image_heads


def seed_latents(seeds, z_dim: int, device=None) -> torch.Tensor:
    """One z per integer seed, independent of batch composition: (N, z_dim)."""
    z = np.stack([np.random.RandomState(s).randn(z_dim) for s in seeds])
    return torch.from_numpy(z).float().to(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 via (x + 1) * 127.5, as samples are exported."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def save_generator(g: Generator, path: str | Path, meta: dict) -> None:
    """The exported (EMA) generator: weights, its config and metadata, loadable safely."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"config": dataclasses.asdict(g.cfg), "g_ema": g.state_dict(), "meta": dict(meta)}
    # Through a file object: torch names the zip's root after a path's stem, which would put
    # the temporary name into the bytes (and into DVC's hash of the output).
    with write_atomic(path) as tmp, tmp.open("wb") as f:
        torch.save(state, f)


def load_generator(path: str | Path, device=None) -> tuple[Generator, dict]:
    """Load an exported generator (weights only, never pickled code) -> (G in eval mode, meta)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `polyinr train` first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # The file carries its own shape; a file of another polyinr version fails in one line.
    known = {f.name for f in dataclasses.fields(GeneratorConfig)}
    if set(state["config"]) != known:
        unknown, lacking = (
            sorted(set(state["config"]) - known),
            sorted(known - set(state["config"])),
        )
        raise ValueError(
            f"{path} comes from another polyinr version: its generator config has "
            f"{unknown or 'no extra'} keys and lacks {lacking or 'none'} of this version's"
        )
    cfg = GeneratorConfig(**state["config"])
    g = Generator(cfg, state["meta"]["resolution"])
    try:
        g.load_state_dict(state["g_ema"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(
            f"{path}: its weights do not fit this polyinr's generator ({first})"
        ) from None
    return g.to(device).eval().requires_grad_(False), state["meta"]
