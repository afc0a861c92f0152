"""The generator's synthesis written plainly, as docs/model.md section 2 writes it: the baseline.

One nn.Linear per head, one level after the other on whole (B, P, C) tensors. It loads the
weights of a polyinr Synthesis, so both must render the same images; the benchmarks time one
against the other and the tests check that they agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polyinr.generator import EqualizedLinear, GeneratorConfig, Synthesis, coordinate_grid


class PlainLevel(nn.Module):
    """One level with the four heads of docs/model.md as separate layers."""

    def __init__(self, w_dim: int, hidden: int, first: bool, clamp: float, mixing: str):
        super().__init__()
        self.clamp = clamp
        self.gain = 1.0 if mixing == "plain" else math.sqrt(2)  # StyleGAN's bias_act gain
        self.style = None if first else EqualizedLinear(w_dim, hidden, activation=True)
        head_in = w_dim if first else hidden
        self.warp = nn.Linear(head_in, 4)  # M_i (2x2)
        self.shift = nn.Linear(head_in, 2)  # b_i (2)
        self.lift = nn.Linear(head_in, 2 * hidden)  # A_i (2xC)
        self.lift_bias = nn.Linear(head_in, hidden)  # a_i (C)
        # Linear_CxC; lrelu and gain below.
        self.linear = (
            nn.Linear(hidden, hidden) if mixing == "plain" else EqualizedLinear(hidden, hidden)
        )

    def forward(self, x, h, w):
        """x (B, P, 2), h (B, P, C) or None, w (B, w_dim) -> x (B, P, 2), h (B, P, C)."""
        B = w.shape[0]
        u = w if self.style is None else self.style(w)
        x = x @ self.warp(u).view(B, 2, 2) + self.shift(u).view(B, 1, 2)  # (B, P, 2)
        g = x @ self.lift(u).view(B, 2, -1) + self.lift_bias(u).view(B, 1, -1)  # (B, P, C)
        h = g if h is None else h * F.leaky_relu(g, 0.2)
        h = F.leaky_relu(self.linear(h), 0.2) * self.gain
        return x, h.clamp(-self.clamp, self.clamp)


class PlainSynthesis(nn.Module):
    """The synthesis network of docs/model.md, level by level on whole tensors (B, P, C)."""

    def __init__(self, cfg: GeneratorConfig, resolution: int):
        super().__init__()
        self.levels = nn.ModuleList(
            [
                PlainLevel(cfg.w_dim, cfg.hidden, i == 0, cfg.clamp, cfg.mixing)
                for i in range(cfg.levels)
            ]
        )
        self.to_rgb = nn.Linear(cfg.hidden, 3)
        self.register_buffer("grid", coordinate_grid(resolution), persistent=False)

    @classmethod
    def like(cls, synthesis: Synthesis, cfg: GeneratorConfig) -> PlainSynthesis:
        """A plain copy of a polyinr Synthesis: same weights, split back into four heads."""
        plain = cls(cfg, synthesis.resolution).to(synthesis.to_rgb.weight.device)
        C = cfg.hidden
        with torch.no_grad():
            for ours, level in zip(synthesis.levels, plain.levels, strict=True):
                if level.style is not None:
                    level.style.load_state_dict(ours.style.state_dict())
                level.linear.load_state_dict(ours.linear.state_dict())
                cuts = {"warp": (0, 4), "shift": (4, 6), "lift": (6, 6 + 2 * C)}
                cuts["lift_bias"] = (6 + 2 * C, 6 + 3 * C)
                for name, (a, b) in cuts.items():
                    getattr(level, name).weight.copy_(ours.affine.weight[a:b])
                    getattr(level, name).bias.copy_(ours.affine.bias[a:b])
            plain.to_rgb.load_state_dict(synthesis.to_rgb.state_dict())
        return plain.train(synthesis.training)

    def forward(self, ws, coords=None):
        """ws (B, L, w_dim), coords (..., 2) -> RGB (B, 3, ...), as Synthesis.forward."""
        B = ws.shape[0]
        coords = self.grid if coords is None else coords.to(ws.device, ws.dtype)
        x = coords.reshape(1, -1, 2).expand(B, -1, -1)  # (B, P, 2)
        h = None
        for i, level in enumerate(self.levels):
            x, h = level(x, h, ws[:, i])
        rgb = self.to_rgb(h)  # (B, P, 3)
        return rgb.transpose(1, 2).reshape(B, 3, *coords.shape[:-1])
