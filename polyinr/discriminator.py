"""Projected discriminator: frozen feature networks, frozen random projections, trained heads.

StyleGAN-XL's D (SPEC.md section 3): per feature network, four feature taps go through a
cross-channel (1x1) and a cross-scale (upsample-add, 1x1) mixing that stay frozen at
their random init, then one small trainable head per tap gives patch logits.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from polyinr import augment

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Per network: normalisation of its input and whether it only runs at 224 x 224.
NETWORKS = {
    "tf_efficientnet_lite0": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "fixed_224": False},
    "deit_base_distilled_patch16_224": {
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "fixed_224": True,
    },
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin")


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that are needed but not on this machine."""


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """Which frozen networks D looks through, its projections, heads, augmentation and blur."""

    networks: tuple[str, ...]
    pretrained: bool
    weights_dir: str
    resize_224: bool
    proj_channels: int
    head_channels: int
    cmap_dim: int
    diffaugment: str
    blur_sigma: float
    blur_kimg: float

    def __post_init__(self):
        if not self.networks:
            raise ValueError("networks must name at least one feature network")
        unknown = [n for n in self.networks if n not in NETWORKS]
        if unknown:
            raise ValueError(f"unknown network {unknown[0]!r}; valid: {sorted(NETWORKS)}")
        augment.parse_policy(self.diffaugment)


def weights_file(name: str, weights_dir: str) -> Path | None:
    """The local pretrained weights of network `name`, if present."""
    for suffix in WEIGHT_SUFFIXES:
        path = Path(weights_dir) / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def create_feature_network(name: str, pretrained: bool, weights_dir: str) -> nn.Module:
    """A timm network, pretrained from a local file only (never downloaded at run time)."""
    if not pretrained:
        return timm.create_model(name, pretrained=False)
    path = weights_file(name, weights_dir)
    if path is None:
        raise MissingWeightsError(
            f"pretrained weights for {name} not found: put them at "
            f"{Path(weights_dir) / (name + '.safetensors')} (or .pth/.bin; timm's "
            f"'timm/{name}' files on the Hugging Face hub), or set "
            "discriminator.pretrained=false to train with random frozen features (labelled)."
        )
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})


class FeatureNetwork(nn.Module):
    """A frozen timm network cut into four taps at strides 4, 8, 16 and 32."""

    def __init__(self, name: str, pretrained: bool, weights_dir: str):
        super().__init__()
        self.name = name
        net = create_feature_network(name, pretrained, weights_dir)
        spec = NETWORKS[name]
        self.register_buffer("mean", torch.tensor(spec["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec["std"]).view(1, 3, 1, 1), persistent=False)
        if name.startswith("tf_efficientnet"):
            b = net.blocks
            self.taps = nn.ModuleList(
                [nn.Sequential(net.conv_stem, net.bn1, *b[0:2]), b[2:3], b[3:5], b[5:]]
            )
            self.vit = None
        else:
            self.taps = None
            self.vit = net
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        """Frozen: BatchNorm statistics never update, whatever mode D is in."""
        return super().train(False)

    def forward(self, x):
        """x (B, 3, H, W) in [-1, 1] -> four maps (B, C_i, H/s, H/s) for s = 4, 8, 16, 32."""
        x = ((x + 1) / 2 - self.mean) / self.std
        if self.vit is None:
            feats = []
            for tap in self.taps:
                x = tap(x)
                feats.append(x)
            return feats
        return self._vit_taps(x)

    def _vit_taps(self, x):
        # Tokens after blocks 3, 6, 9, 12 as 14 x 14 maps, resampled to strides 4..32.
        vit, B = self.vit, x.shape[0]
        x = vit.patch_embed(x)
        x = vit.norm_pre(vit._pos_embed(x))
        side = int(math.isqrt(x.shape[1] - vit.num_prefix_tokens))
        feats = []
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if i % 3 == 2:
                grid = x[:, vit.num_prefix_tokens :].transpose(1, 2).reshape(B, -1, side, side)
                feats.append(grid)
        sizes = [side * 4, side * 2, side, max(side // 2, 1)]
        return [
            F.interpolate(f, size=s, mode="bilinear", align_corners=False)
            for f, s in zip(feats, sizes, strict=True)
        ]


class Projector(nn.Module):
    """Frozen random cross-channel (1x1) and cross-scale (upsample-add, 1x1) mixing."""

    def __init__(self, in_channels: list[int], proj_channels: int):
        super().__init__()
        self.out_channels = [proj_channels * 2**i for i in range(len(in_channels))]
        self.ccm = nn.ModuleList(
            [nn.Conv2d(c, o, 1) for c, o in zip(in_channels, self.out_channels, strict=True)]
        )
        self.csm = nn.ModuleList(
            [
                nn.Conv2d(o_deep, o, 1)
                for o, o_deep in zip(self.out_channels[:-1], self.out_channels[1:], strict=True)
            ]
        )
        self.requires_grad_(False)

    def forward(self, feats):
        """Four maps -> four mixed maps with proj_channels * (1, 2, 4, 8) channels."""
        mixed = [ccm(f) for ccm, f in zip(self.ccm, feats, strict=True)]
        out = [mixed[-1]]
        # Cross-scale fusion, deepest first: add the upsampled deeper map, then 1x1 conv.
        for i in range(len(mixed) - 2, -1, -1):
            deeper = F.interpolate(
                out[0], size=mixed[i].shape[-2:], mode="bilinear", align_corners=False
            )
            out.insert(0, mixed[i] + self.csm[i](deeper))
        return out


class Head(nn.Module):
    """Trainable patch discriminator on one tap, projecting onto a class embedding."""

    def __init__(self, channels: int, size: int, width: int, num_classes: int, cmap_dim: int):
        super().__init__()
        layers = []
        # Stride-2 blocks (spectral-norm conv 4x4, BatchNorm, leaky ReLU) down to 8 x 8.
        while size > 8:
            layers += [
                spectral_norm(nn.Conv2d(channels, width, 4, 2, 1, bias=False)),
                nn.BatchNorm2d(width),
                nn.LeakyReLU(0.2),
            ]
            channels, size = width, size // 2
        out = cmap_dim if num_classes > 0 else 1
        layers.append(spectral_norm(nn.Conv2d(channels, out, min(4, size), 1, 0)))
        self.main = nn.Sequential(*layers)
        self.embed = nn.Embedding(num_classes, cmap_dim) if num_classes > 0 else None
        self.cmap_dim = cmap_dim

    def forward(self, x, c=None):
        """x (B, C, S, S), c (B,) -> patch logits (B, 1, s, s)."""
        out = self.main(x)
        if self.embed is None:
            return out
        cmap = self.embed(c).view(x.shape[0], -1, 1, 1)  # (B, cmap_dim, 1, 1)
        return (out * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)


class ProjectedDiscriminator(nn.Module):
    """Frozen feature networks + frozen projections + one trainable head per tap."""

    def __init__(self, cfg: DiscriminatorConfig, resolution: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.policy = augment.parse_policy(cfg.diffaugment)
        self.features = nn.ModuleList(
            [FeatureNetwork(n, cfg.pretrained, cfg.weights_dir) for n in cfg.networks]
        )
        self.input_size = {}
        self.projectors = nn.ModuleList()
        self.heads = nn.ModuleList()
        for net in self.features:
            size = self.feature_input_size(net.name, resolution)
            self.input_size[net.name] = size
            with torch.no_grad():
                feats = net(torch.zeros(2, 3, size, size))
            proj = Projector([f.shape[1] for f in feats], cfg.proj_channels)
            self.projectors.append(proj)
            for ch, f in zip(proj.out_channels, feats, strict=True):
                self.heads.append(
                    Head(ch, f.shape[-1], cfg.head_channels, num_classes, cfg.cmap_dim)
                )

    def feature_input_size(self, name: str, resolution: int) -> int:
        """DeiT always sees 224; EfficientNet sees 224 below it when resize_224, else native."""
        if NETWORKS[name]["fixed_224"] or (self.cfg.resize_224 and resolution < 224):
            return 224
        return resolution

    def forward(self, images, c=None):
        """images (B, 3, R, R) in [-1, 1], c (B,) -> list of patch logits, one per head."""
        logits, heads = [], iter(self.heads)
        for net, proj in zip(self.features, self.projectors, strict=True):
            # A separate augmentation draw for each feature network.
            x = augment.diff_augment(images, self.policy)
            size = self.input_size[net.name]
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            for f in proj(net(x)):
                logits.append(next(heads)(f, c))
        return logits

    def trainable_state_dict(self) -> dict:
        """Everything but the feature networks, which are rebuilt from weights or a seed."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("features.")}


def parameter_counts(d: ProjectedDiscriminator) -> dict:
    """Trainable and frozen parameters, as `polyinr summary` reports them."""
    trainable = sum(p.numel() for p in d.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in d.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}
