"""Inception features, statistics and the metrics: FID, sFID, IS, precision/recall (SPEC.md 4).

Everything is accumulated in float64 with TF32 off; reference statistics come from real batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
from tqdm import tqdm

from polyinr.generator import to_uint8  # samples are scored exactly as they are exported

PROTOCOLS = ("stylegan-xl", "adm")
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
PR_REFERENCE = 10_000  # ADM compares 10k reference images against all samples
PR_K = 3


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How samples are drawn and scored."""

    protocol: str
    num_samples: int
    batch: int
    psi: float
    seed: int
    inception_weights: str
    allow_random_weights: bool
    random_seed: int
    grid_classes: int
    grid_seeds: int
    grid_psi: float

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {self.num_samples}")


class MissingWeightsError(FileNotFoundError):
    """The TF-2015 Inception weights are not on disk and random weights were not allowed."""


# ---------------------------------------------------------------------------------------------
# Feature network


class InceptionFeatures(nn.Module):
    """torch-fidelity's TF-2015 Inception-v3 returning pool, logits and sFID spatial features."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._spatial = None
        net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # ADM's sFID: the first 7 channels of mixed_6/conv (17x17), flattened in TF's NHWC
        # order so that reference files (mu_s, sigma_s) from the ADM suite can be read directly.
        self._spatial = output[:, :7].permute(0, 2, 3, 1).reshape(output.shape[0], -1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (N, 3, H, W) uint8 -> pool (N, 2048), logits (N, 1008), spatial (N, 2023)."""
        pool, logits = self.net(images)
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "logits": logits, "spatial": spatial}


def _inception_net(state_dict_file):
    """torch-fidelity's TF-2015 Inception-v3 loaded strictly from a path or file object."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        feature_extractor_weights_path=state_dict_file,
    )


def _random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A Kaiming-initialised state dict with the exact keys and shapes of the TF-2015 net."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        # torch-fidelity's constructor always loads strictly; an empty dict means "keep init".
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if state_dict:
                return super().load_state_dict(state_dict, strict, assign)

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    gen = torch.Generator().manual_seed(seed)
    # PyTorch's default init shrinks activations layer by layer, so with eval BatchNorm the pool
    # features vanish (FID ~ 1e-15, IS = 1); Kaiming keeps their scale and the metrics honest.
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            std = (2.0 / module.weight[0].numel()) ** 0.5  # Kaiming: each conv feeds a ReLU
            module.weight.data.normal_(0.0, std, generator=gen)
        elif isinstance(module, nn.Linear):
            # Unit weights rather than 1/sqrt(fan_in): pool features of different images differ
            # by ~1e-2, and larger logits keep IS visibly above 1 instead of 1 + 1e-5.
            module.weight.data.normal_(0.0, 1.0, generator=gen)
            module.bias.data.zero_()
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()  # identity: weight 1, bias 0, mean 0, var 1
    return net.state_dict()


def load_inception(
    weights_path: str, allow_random: bool, random_seed: int, device
) -> tuple[nn.Module, bool]:
    """Return (InceptionFeatures in eval mode, whether the weights are the real TF-2015 ones)."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    found = next((p for p in (weights_path, cached) if p and os.path.isfile(p)), None)
    if found is not None:
        net, real = _inception_net(found), True
    elif allow_random:
        buffer = io.BytesIO()
        torch.save(_random_state_dict(random_seed), buffer)
        buffer.seek(0)
        net, real = _inception_net(buffer), False
    else:
        raise MissingWeightsError(
            f"Inception weights {WEIGHTS_FILE} not found at {weights_path!r} nor at {cached!r}. "
            f"Download {WEIGHTS_URL} to one of these paths (no network here), or set "
            "eval.allow_random_weights=true for labelled random-weight numbers that are not "
            "comparable to published ones."
        )
    return InceptionFeatures(net).to(device).eval(), real


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


def extract(model: nn.Module, images_uint8: torch.Tensor) -> dict[str, np.ndarray]:
    """images (N, 3, H, W) uint8 -> float64 arrays pool (N, 2048), logits (N, 1008), spatial."""
    device = next(model.parameters()).device
    with no_tf32(), torch.no_grad():
        feats = model(images_uint8.to(device))
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in feats.items()}


# ---------------------------------------------------------------------------------------------
# Statistics and metrics


class FeatureStats:
    """Running float64 sum and sum of outer products of feature vectors."""

    def __init__(self):
        self.n = 0
        self.sum = None
        self.outer = None

    def add(self, feats: np.ndarray) -> None:
        """Accumulate a batch of features (N, D)."""
        x = np.asarray(feats, dtype=np.float64)
        if self.sum is None:
            self.sum = np.zeros(x.shape[1])
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def mean_cov(self, ddof: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and covariance (D, D) normalised by 1/(N - ddof)."""
        if self.n <= ddof:
            raise ValueError(f"need more than {ddof} samples, have {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - ddof)
        return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between two Gaussians, trace term from eigenvalues of sigma1 @ sigma2."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    # tr(sqrtm(S1 S2)) = sum of sqrt of the eigenvalues of S1 S2, which are real and >= 0 for
    # PSD inputs; round-off makes tiny imaginary or negative parts, hence real part clipped at 0.
    eigenvalues = scipy.linalg.eigvals(sigma1 @ sigma2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std over consecutive splits of exp(E[KL(p(y|x) || p(y))])."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"splits must be in [1, {logits.shape[0]}], got {splits}")
    log_p = torch.log_softmax(logits, dim=1).numpy()
    scores = []
    for part in np.array_split(log_p, splits):
        log_marginal = np.log(np.exp(part).mean(axis=0, keepdims=True))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row of x (N, D) to its k-th nearest other row, (N,)."""
    # k + 1 because every point is its own nearest neighbour at distance 0.
    radii = [
        torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values
        for i in range(0, len(x), chunk)
    ]
    return torch.cat(radii)


def _coverage(manifold, radii, queries, chunk: int) -> float:
    """Fraction of queries inside at least one ball (manifold point, its k-NN radius)."""
    inside = [
        (torch.cdist(queries[i : i + chunk], manifold) <= radii[None]).any(dim=1)
        for i in range(0, len(queries), chunk)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real_feats: np.ndarray, fake_feats: np.ndarray, k: int = PR_K, device="cpu", chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifold radii."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} real and fake features")
    # Rows are processed `chunk` at a time so memory is O(chunk * N), not O(N^2).
    with no_tf32():
        precision = _coverage(real, _knn_radii(real, k, chunk), fake, chunk)
        recall = _coverage(fake, _knn_radii(fake, k, chunk), real, chunk)
    return precision, recall


# ---------------------------------------------------------------------------------------------
# Evaluation of a generator


def _label(cfg: EvalConfig, num_samples: int, real_weights: bool) -> str:
    """The human-readable name of the numbers, flagging random weights."""
    if real_weights:
        return f"FID@{num_samples} ({cfg.protocol}, TF-2015 Inception weights)"
    return (
        f"FID@{num_samples} ({cfg.protocol}, RANDOM Inception weights (seed {cfg.random_seed}): "
        "not comparable to published numbers)"
    )


def evaluate(
    generator: nn.Module, real_batches, cfg: EvalConfig, num_classes: int, device, progress=True
) -> dict:
    """Score cfg.num_samples generator samples against features of real (uint8, label) batches."""
    model, real_weights = load_inception(
        cfg.inception_weights, cfg.allow_random_weights, cfg.random_seed, device
    )
    ddof = 1 if cfg.protocol == "adm" else 0  # ADM: unbiased covariance; StyleGAN-XL: 1/N

    real_stats = {"pool": FeatureStats(), "spatial": FeatureStats()}
    real_pool, num_kept = [], 0
    for images, _ in tqdm(real_batches, desc="reference", disable=not progress):
        feats = extract(model, images)
        for name, stats in real_stats.items():
            stats.add(feats[name])
        if num_kept < PR_REFERENCE:
            real_pool.append(feats["pool"][: PR_REFERENCE - num_kept].astype(np.float32))
            num_kept += len(real_pool[-1])

    # All latents and classes are drawn up front so a sample does not depend on cfg.batch.
    rng = torch.Generator().manual_seed(cfg.seed)
    z_all = torch.randn(cfg.num_samples, generator.cfg.z_dim, generator=rng)
    c_all = torch.randint(0, num_classes, (cfg.num_samples,), generator=rng)
    fake_stats = {"pool": FeatureStats(), "spatial": FeatureStats()}
    fake_pool, fake_logits = [], []
    with torch.no_grad():
        for start in tqdm(
            range(0, cfg.num_samples, cfg.batch), desc="samples", disable=not progress
        ):
            z = z_all[start : start + cfg.batch].to(device)
            c = c_all[start : start + cfg.batch].to(device)
            feats = extract(model, to_uint8(generator(z, c, psi=cfg.psi)))
            for name, stats in fake_stats.items():
                stats.add(feats[name])
            fake_pool.append(feats["pool"].astype(np.float32))
            fake_logits.append(feats["logits"])

    fid, sfid = (
        frechet_distance(*real_stats[n].mean_cov(ddof), *fake_stats[n].mean_cov(ddof))
        for n in ("pool", "spatial")
    )
    # 10 splits as published; tiny runs keep >= 2 samples per split (one sample has IS = 1).
    splits = min(10, cfg.num_samples // 2)
    is_mean, is_std = inception_score(np.concatenate(fake_logits), splits)
    real_pool, fake_pool = np.concatenate(real_pool), np.concatenate(fake_pool)
    if min(len(real_pool), len(fake_pool)) > PR_K:
        precision, recall = precision_recall(real_pool, fake_pool, PR_K, device)
    else:
        precision = recall = None  # too few points for k-NN radii
    return {
        "fid": fid,
        "sfid": sfid,
        "is_mean": is_mean,
        "is_std": is_std,
        "precision": precision,
        "recall": recall,
        # StyleGAN-XL reports precision/recall on VGG16 features; here both use Inception pool.
        "pr_features": "inception-pool",
        "num_samples": int(cfg.num_samples),
        "num_reference": int(real_stats["pool"].n),
        "protocol": cfg.protocol,
        "inception_weights": "real" if real_weights else f"random (seed {cfg.random_seed})",
        "label": _label(cfg, cfg.num_samples, real_weights),
    }
