"""FID, sFID, IS, precision/recall and rFID, ADM or StyleGAN-XL protocol (docs/evaluation.md).

Float64 statistics with TF32 off, Frechet distance from eigenvalues; generation split over
torchrun ranks with the same result; the cheap FID of training with its best snapshot.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn

from polyinr import data
from polyinr.core.config import EvalConfig
from polyinr.core.distributed import rank_world
from polyinr.evaluation.featurenets import Networks, no_tf32
from polyinr.evaluation.featurestats import accumulate, rank_share
from polyinr.evaluation.reference import load_reference
from polyinr.model.generator import to_uint8  # samples are scored exactly as they are exported

PR_K = 3
# Up to this many samples their feature rows are kept (float32, 8 KiB each per statistic) for
# the Frechet distances' low-rank trace term: exact, and O(N^2 D) instead of O(D^3) for N < D.
FACTOR_ROWS = 2048
PARTS = ("fid", "pr", "rfid")  # fid: FID + sFID (+ IS on samples); pr: precision/recall
# The parts each protocol reports: rFID (a second, random Inception: as much compute again) is
# in StyleGAN-XL's tables, not in the ADM suite.
PROTOCOL_PARTS = {"adm": ("fid", "pr"), "stylegan-xl": PARTS}


# ---------------------------------------------------------------------------------------------
# Metrics


def covariance_factor(rows: np.ndarray, ddof: int) -> np.ndarray:
    """Feature rows (N, D) -> F (D, N), the centred rows over sqrt(N - ddof): sigma = F F^T."""
    x = np.asarray(rows, np.float64)
    if len(x) <= ddof:
        raise ValueError(f"need more than {ddof} samples, have {len(x)}")
    return (x - x.mean(axis=0)).T / np.sqrt(len(x) - ddof)


def _low_rank(factor) -> bool:
    """Whether a factor (D, N) makes the trace term cheaper: fewer samples than dimensions."""
    return factor is not None and factor.shape[1] < factor.shape[0]


def trace_sqrt_product(sigma1, sigma2, factor1=None, factor2=None) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) for PSD sigmas, exactly, at the samples' cost when it can.

    The nonzero eigenvalues of S1 S2 = F1 F1^T S2 equal those of the symmetric (N1, N1)
    F1^T S2 F1, and with both factors those of (F1^T F2)(F1^T F2)^T, whose square roots are
    the singular values of F1^T F2: O(N^2 D) instead of the O(D^3) eigenvalues of S1 S2.
    """
    if _low_rank(factor1) and _low_rank(factor2):
        return float(scipy.linalg.svdvals(factor1.T @ factor2).sum())
    if _low_rank(factor2):  # tr sqrtm(S1 S2) = tr sqrtm(S2 S1)
        sigma1, sigma2, factor1 = sigma2, sigma1, factor2
    if _low_rank(factor1):
        eigenvalues = scipy.linalg.eigvalsh(factor1.T @ (sigma2 @ factor1))
        return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())
    # The general path: eigenvalues of S1 S2 are real and >= 0 for PSD inputs; round-off
    # makes tiny imaginary or negative parts, hence the real part clipped at 0.
    eigenvalues = scipy.linalg.eigvals(sigma1 @ sigma2)
    return float(np.sqrt(np.clip(eigenvalues.real, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, factor1=None, factor2=None) -> float:
    """Frechet distance between two Gaussians, trace term from eigenvalues (exact).

    factor1/factor2 (optional, (D, N)): sigma = F F^T (covariance_factor of the rows it came
    from); with fewer rows than dimensions the trace term costs O(N^2 D), not O(D^3).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    trace_sqrt = trace_sqrt_product(sigma1, sigma2, factor1, factor2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std over consecutive splits of exp(E[KL(p(y|x) || p(y))]).

    Split i holds samples [i N // splits, (i + 1) N // splits), torch-fidelity's boundaries
    for any N (its isc_features_to_metric with shuffle=False; it shuffles by default).
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, {n}], got {splits}")
    log_p = torch.log_softmax(logits, dim=1).numpy()
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
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


def metric_name(num_samples: int) -> str:
    """FID named by its sample count: fid50k, fid10k, fid256 (never compare different counts)."""
    return f"fid{num_samples // 1000}k" if num_samples % 1000 == 0 else f"fid{num_samples}"


def evaluate(
    generator: nn.Module,
    reference: dict,
    cfg: EvalConfig,
    num_classes: int,
    nets: Networks,
    device,
    parts=PARTS,
    num_samples: int | None = None,
    progress: bool = True,
    seconds: collections.Counter | None = None,
) -> dict:
    """Score `num_samples` (default cfg.num_samples) samples of `generator` against `reference`.

    Latents and classes are drawn up front from cfg.seed, so a sample depends neither on the
    batch size nor on the number of ranks; each rank renders every world-th batch. The time
    spent rendering is added to seconds["render"].
    """
    n = num_samples or cfg.num_samples
    ddof = 1 if cfg.protocol == "adm" else 0
    rng = torch.Generator().manual_seed(cfg.seed)
    z_all = torch.randn(n, generator.cfg.z_dim, generator=rng)
    c_all = torch.randint(0, max(num_classes, 1), (n,), generator=rng)
    rank, world = rank_world()

    def mine():
        for start in range(rank * cfg.batch, n, world * cfg.batch):
            z = z_all[start : start + cfg.batch].to(device)
            c = c_all[start : start + cfg.batch].to(device) if num_classes else None
            began = time.perf_counter()
            with torch.no_grad():
                images = to_uint8(generator(z, c, psi=cfg.psi))
            if seconds is not None:
                seconds["render"] += time.perf_counter() - began
            yield start, images

    pr_key = nets.pr_network()[1]
    stats_keys = (["pool", "spatial"] if "fid" in parts else []) + (
        ["rpool"] if "rfid" in parts else []
    )
    inception = nets.get("inception")
    with_is = "fid" in parts and inception.has_logits  # the packaged weights have no classifier
    row_keys = (["logits"] if with_is else []) + ([pr_key] if "pr" in parts else [])
    factor_keys = stats_keys if n <= FACTOR_ROWS else []
    row_keys = list(dict.fromkeys(row_keys + factor_keys))
    names = nets.names(parts)
    out, rows = accumulate(
        mine(),
        nets,
        names,
        stats_keys,
        row_keys,
        lambda i: np.ones(len(i), bool),
        "samples",
        progress,
        total=rank_share(n, cfg.batch),
    )

    factors = {k: covariance_factor(rows[k], ddof) for k in factor_keys}
    result = {"protocol": cfg.protocol, "num_samples": n, "seed": cfg.seed, "psi": cfg.psi}
    if "fid" in parts:
        result["fid"] = frechet_distance(
            *out["pool"].mean_cov(ddof), reference["mu"], reference["sigma"], factors.get("pool")
        )
        result["sfid"] = frechet_distance(
            *out["spatial"].mean_cov(ddof),
            reference["mu_s"],
            reference["sigma_s"],
            factors.get("spatial"),
        )
        if with_is:  # 10 consecutive splits as published; tiny runs keep >= 2 per split
            result["is_mean"], result["is_std"] = inception_score(rows["logits"], min(10, n // 2))
        else:
            result["is_skipped"] = (
                f"no IS: {inception.source} has no 1008-way logits; torch-fidelity's "
                "weights file (eval.inception_weights) gives it"
            )
        result["num_reference"] = int(reference["n"])
    if "pr" in parts:
        real = reference["pr"]
        result["precision"], result["recall"] = precision_recall(real, rows[pr_key], PR_K, device)
        result["num_pr_reference"] = len(real)
        result["pr_features"] = "inception-pool" if pr_key == "pool" else "vgg16-fc7"
        result["pr_weights"] = nets.get(nets.pr_network()[0]).label
    if "rfid" in parts:
        result["rfid"] = frechet_distance(
            *out["rpool"].mean_cov(ddof),
            reference["mu_r"],
            reference["sigma_r"],
            factors.get("rpool"),
        )
        result["rfid_seed"] = cfg.random_seed
        result["rfid_label"] = (
            f"rFID with a seeded Kaiming-initialised random Inception (seed {cfg.random_seed}); "
            "StyleGAN-XL uses one fixed random network file: not comparable to the paper's rFID"
        )
    random = inception.weights_id.startswith("random")
    result["inception_weights"] = inception.source
    result["reference"] = cfg.reference_npz or "training data"
    caveats = [inception.label]
    if "pr" in parts and result["pr_weights"].startswith("RANDOM") and not random:
        caveats.append(f"precision/recall on {result['pr_weights']}")
    comparable = not any(c.startswith("RANDOM") for c in caveats)
    result["label"] = f"{metric_name(n)} ({cfg.protocol}, {', '.join(caveats)}" + (
        ")" if comparable else ": not comparable to published numbers)"
    )
    return result


def evaluate_generator(cfg, generator, resolution: int, device, progress=True, nets=None):
    """The scoring of the `evaluate` stage: every part, cfg.eval.num_samples samples of the
    generator, whose shape (classes) comes from the generator itself, never from cfg.

    Returns (result, seconds): where the time went (reference pass, its networks, rendering,
    the networks on samples, the metrics' arithmetic, total), for the log, not the result.
    """
    start = time.perf_counter()
    num_classes = generator.cfg.class_count
    if not cfg.eval.reference_npz:
        # Reference images of other classes than the generator's would make every number wrong.
        owner = "the generator's num_classes"
        data.check_prepared(cfg.data.out_dir, resolution, num_classes or None, owner)
    nets = nets or Networks(cfg.eval, device)
    parts = PROTOCOL_PARTS[cfg.eval.protocol]
    reference = load_reference(
        cfg.eval, parts, resolution, nets, cfg.data.out_dir, cfg.storage, progress
    )
    seconds = collections.Counter({"reference": time.perf_counter() - start})
    seconds.update({f"reference_{k}": v for k, v in nets.seconds.items()})
    nets.seconds.clear()
    began = time.perf_counter()
    result = evaluate(
        generator, reference, cfg.eval, num_classes, nets, device, parts, progress=progress,
        seconds=seconds,
    )  # fmt: skip
    seconds["samples"] = time.perf_counter() - began
    seconds.update({f"samples_{k}": v for k, v in nets.seconds.items()})
    features = sum(v for k, v in seconds.items() if k.startswith("samples_"))
    seconds["metrics"] = seconds["samples"] - seconds["render"] - features
    seconds["total"] = time.perf_counter() - start
    return result, dict(seconds)


class TrainingFID:
    """The cheap FID of training: eval.train_samples samples of a generator against the
    training data's statistics at its resolution; networks and statistics load at first use.
    Call it on every rank."""

    def __init__(self, cfg, device, nets: Networks | None = None):
        self.cfg, self.device = cfg, device
        self.name = metric_name(cfg.eval.train_samples)
        self.nets = nets
        self.references = {}

    def __call__(self, g_ema, resolution: int) -> float:
        if self.nets is None:
            self.nets = Networks(self.cfg.eval, self.device)
        if resolution not in self.references:
            self.references[resolution] = load_reference(
                self.cfg.eval,
                ["fid"],
                resolution,
                self.nets,
                self.cfg.data.out_dir,
                self.cfg.storage,
                progress=False,
            )
        num_classes = self.cfg.generator.class_count
        result = evaluate(
            g_ema,
            self.references[resolution],
            self.cfg.eval,
            num_classes,
            self.nets,
            self.device,
            parts=["fid"],
            num_samples=self.cfg.eval.train_samples,
            progress=False,
        )
        return result["fid"]
