"""DiffAugment (Zhao et al. 2020) and the blur of D's inputs, as pure tensor functions.

Every function is differentiable in the images so the generator's gradient flows through.
Randomness comes from the global torch RNG, which training reseeds per iteration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def color(x: torch.Tensor) -> torch.Tensor:
    """Random brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5); (B, 3, H, W)."""
    B = x.shape[0]
    x = x + (torch.rand(B, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(B, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(B, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to `ratio` of its size, filling with zeros; (B, C, H, W)."""
    B, _, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (B, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (B, 1, 1), device=x.device)
    rows = torch.arange(H, device=x.device).view(1, H, 1) + dy  # (B, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W) + dx  # (B, 1, W)
    # Index into a zero-padded copy: out-of-frame pixels read the padding.
    rows = (rows.clamp(-1, H) + 1).expand(B, H, W)
    cols = (cols.clamp(-1, W) + 1).expand(B, H, W)
    padded = F.pad(x, [1, 1, 1, 1])  # (B, C, H+2, W+2)
    flat = (rows * (W + 2) + cols).view(B, 1, H * W).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, flat).view_as(x)


def cutout(x: torch.Tensor, ratio: float = 0.2) -> torch.Tensor:
    """Zero one random square of `ratio` of the image size per image; (B, C, H, W)."""
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    cy = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), device=x.device)
    cx = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), device=x.device)
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    top, left = cy - ch // 2, cx - cw // 2
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)  # (B, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)


# The ops that config.DIFFAUGMENT_OPS names, which config.parse_policy checks against.
POLICIES = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """Apply the named augmentations in order; (B, 3, H, W) -> (B, 3, H, W)."""
    for name in policy:
        x = POLICIES[name](x)
    return x.contiguous()


def blur_sigma(stage_nimg: int, sigma0: float, fade_kimg: float) -> float:
    """Blur strength: sigma0 fading linearly to 0 over the first fade_kimg of a stage."""
    if fade_kimg <= 0:
        return 0.0
    return sigma0 * max(1.0 - stage_nimg / (fade_kimg * 1000), 0.0)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The reference's blur of D's inputs: separable 2^-(t/sigma)^2 over radius floor(3 sigma).

    Zero padding, as upfirdn2d pads; the identity once the radius is 0 (sigma < 1/3).
    """
    radius = int(math.floor(3 * sigma))
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp2(-((t / sigma) ** 2))
    k = k / k.sum()
    C = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), padding=(0, radius), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), padding=(radius, 0), groups=C)
