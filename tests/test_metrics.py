"""Tests for polyinr.metrics: the metric formulas, the Inception loader and evaluate()."""

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from polyinr import metrics
from polyinr.metrics import (
    EvalConfig,
    FeatureStats,
    MissingWeightsError,
    extract,
    frechet_distance,
    inception_score,
    load_inception,
    precision_recall,
    to_uint8,
)

MISSING = "/nonexistent/inception.pth"


def random_images(n, seed, size=32):
    """Seeded uint8 images (n, 3, size, size): colour ramps, so images differ in content."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    scale = torch.rand(n, 3, 1, 1, generator=g)
    offset = torch.rand(n, 3, 1, 1, generator=g)
    img = (offset + scale * ramp[None, None, None, :] * ramp[None, None, :, None]) % 1.0
    return (img * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def random_inception():
    """Random-weight Inception shared by the feature tests (building it takes ~2 s)."""
    model, real = load_inception(MISSING, allow_random=True, random_seed=0, device="cpu")
    assert not real
    return model


def test_frechet_distance_of_identical_stats_is_zero():
    """FD(N(mu, S), N(mu, S)) = 0 for a full random covariance."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 16))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    """For diagonal covariances FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_sqrtm_formula_on_random_covariances():
    """The eigenvalue trace term equals tr(sqrtm(S1 S2)) for full random covariances."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 10)), rng.normal(size=(40, 10)) @ rng.normal(size=(10, 10))
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("ddof", [0, 1])
def test_feature_stats_over_batches_equal_numpy_mean_and_covariance(ddof):
    """Accumulating in batches gives np.mean and np.cov with the protocol's normalisation."""
    x = np.random.default_rng(3).normal(loc=5.0, size=(37, 6))
    stats = FeatureStats()
    for start in range(0, len(x), 10):
        stats.add(x[start : start + 10])
    mu, sigma = stats.mean_cov(ddof)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False, ddof=ddof), rtol=1e-9, atol=1e-12)


def test_inception_score_of_uniform_logits_is_one():
    """Identical predictions carry no information: IS = 1 in every split."""
    mean, std = inception_score(np.zeros((20, 1008)), splits=2)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_distinct_logits_equals_class_count():
    """Confident predictions spread evenly over C classes in every split give IS = C."""
    classes = 7
    logits = np.tile(100.0 * np.eye(classes), (2, 1))  # two splits, each with all classes
    mean, std = inception_score(logits, splits=2)
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_are_one_for_identical_sets():
    """A set compared with itself lies entirely on its own manifold."""
    x = np.random.default_rng(4).normal(size=(50, 8))
    assert precision_recall(x, x, k=3, chunk=16) == (1.0, 1.0)


def test_precision_recall_are_zero_for_far_apart_sets():
    """Fakes far from every real ball (and vice versa) give precision = recall = 0."""
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(50, 8)), rng.normal(size=(60, 8)) + 100.0
    assert precision_recall(real, fake, k=3, chunk=16) == (0.0, 0.0)


def test_precision_halves_when_half_the_fakes_leave_the_real_manifold():
    """Fakes = the reals plus a far-away copy: precision is 1/2 while recall stays 1."""
    real = np.random.default_rng(6).normal(size=(40, 4))
    fake = np.concatenate([real, real + 100.0])
    assert precision_recall(real, fake, k=3) == (0.5, 1.0)


def test_to_uint8_maps_range_endpoints_rounds_and_clamps():
    """-1 -> 0, 1 -> 255, 0 -> 128 (127.5 rounded to even), out-of-range values are clamped."""
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 0.5])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 191]
    assert to_uint8(x).dtype == torch.uint8


def test_missing_weights_raise_error_naming_both_paths_and_the_escape_hatch(tmp_path, monkeypatch):
    """Without weights and without allow_random the loader refuses, saying where it looked."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        load_inception(MISSING, allow_random=False, random_seed=0, device="cpu")
    message = str(info.value)
    cached = os.path.join(str(tmp_path), "hub", "checkpoints", metrics.WEIGHTS_FILE)
    for needle in (MISSING, cached, metrics.WEIGHTS_URL, "eval.allow_random_weights=true"):
        assert needle in message


def test_weights_in_torch_home_cache_are_found_and_count_as_real(tmp_path, monkeypatch):
    """A weights file in $TORCH_HOME/hub/checkpoints is used when the configured path is absent."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / metrics.WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    state = metrics._random_state_dict(seed=1)
    torch.save(state, cached)
    model, real = load_inception(MISSING, allow_random=False, random_seed=0, device="cpu")
    assert real
    torch.testing.assert_close(model.net.fc.weight, state["fc.weight"])


def test_random_weights_are_seeded():
    """The same random_seed gives the same network; another seed a different one."""
    a, b = metrics._random_state_dict(0), metrics._random_state_dict(0)
    c = metrics._random_state_dict(1)
    key = "Mixed_6d.branch1x1.conv.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_random_weight_inception_gives_non_degenerate_features(random_inception):
    """Kaiming re-init keeps pool features from vanishing and images distinguishable."""
    feats = extract(random_inception, random_images(4, seed=0))
    assert feats["pool"].shape == (4, 2048) and feats["pool"].dtype == np.float64
    assert feats["logits"].shape == (4, 1008)
    assert feats["spatial"].shape == (4, 17 * 17 * 7)
    assert feats["pool"].std() > 1e-3
    assert feats["pool"].std(axis=0).mean() > 1e-3  # differs between images, not just constant
    assert inception_score(feats["logits"], splits=1)[0] > 1.01


def test_random_weight_fid_separates_different_image_sets(random_inception):
    """FID of a set with itself is ~0 and clearly positive against a different set."""
    # The first 256 pool features keep the eigen-decomposition cheap; evaluate() covers 2048.
    a = extract(random_inception, random_images(6, seed=1))["pool"][:, :256]
    b = extract(random_inception, 255 - random_images(6, seed=2))["pool"][:, :256]
    stats_a, stats_b = FeatureStats(), FeatureStats()
    stats_a.add(a)
    stats_b.add(b)
    # Rank-deficient covariances (6 images, 256-d) leave ~1e-6 of eigenvalue round-off.
    assert abs(frechet_distance(*stats_a.mean_cov(0), *stats_a.mean_cov(0))) < 1e-4
    assert frechet_distance(*stats_a.mean_cov(0), *stats_b.mean_cov(0)) > 1e-2


def test_no_tf32_restores_the_backend_flags():
    """The TF32 guard turns both flags off inside and restores them afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with metrics.no_tf32():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class TinyGenerator(nn.Module):
    """A class-conditional stand-in for the generator: tanh of a linear map, 32x32 output."""

    def __init__(self, z_dim=8, num_classes=10):
        super().__init__()
        self.cfg = SimpleNamespace(z_dim=z_dim)
        self.embed = nn.Embedding(num_classes, z_dim)
        self.proj = nn.Linear(z_dim, 3 * 8 * 8)
        self.calls = []  # (z, c) of every call, to check what evaluate() draws

    def forward(self, z, c, psi=1.0):
        """z (B, z_dim), c (B,) -> images (B, 3, 32, 32) in (-1, 1)."""
        self.calls.append((z, c))
        x = torch.tanh(psi * 2.0 * self.proj(z + self.embed(c))).view(-1, 3, 8, 8)
        return nn.functional.interpolate(x, size=32, mode="nearest")  # (B, 3, 32, 32)


def eval_config(**overrides):
    values = dict(
        protocol="adm",
        num_samples=8,
        batch=4,
        psi=1.0,
        seed=0,
        inception_weights=MISSING,
        allow_random_weights=True,
        random_seed=0,
        grid_classes=2,
        grid_seeds=2,
        grid_psi=1.0,
    )
    return EvalConfig(**(values | overrides))


def real_batches():
    """Two batches of four (uint8 images, labels) standing in for the training data."""
    return [(random_images(4, seed=s), torch.zeros(4, dtype=torch.long)) for s in (10, 11)]


def test_evaluate_returns_finite_json_numbers_and_labels_random_weights():
    """A tiny generator scored with random weights gives finite metrics labelled as random."""
    torch.manual_seed(0)
    result = metrics.evaluate(
        TinyGenerator(), real_batches(), eval_config(), num_classes=10, device="cpu", progress=False
    )
    json.dumps(result, allow_nan=False)
    for key in ("fid", "sfid", "is_mean", "is_std", "precision", "recall"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["num_samples"] == 8 and result["num_reference"] == 8
    assert result["protocol"] == "adm"
    assert result["inception_weights"] == "random (seed 0)"
    assert "RANDOM" in result["label"] and "FID@8" in result["label"]
    assert result["fid"] > 1e-2 and result["sfid"] > 1e-4 and result["is_mean"] > 1 + 1e-6
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1


def test_evaluate_draws_the_same_latents_and_classes_whatever_the_batch_size(monkeypatch):
    """Samples depend on cfg.seed only: batch 3 and batch 8 feed the generator the same z and c."""

    # Inception inference and 2048-d statistics cost seconds on CPU and are tested above; here
    # small features computed from the pixels stand in, since only the generator's inputs matter.
    def pixel_features(model, images):
        x = images.double().flatten(1)[:, :12].numpy()
        return {"pool": x[:, :4], "logits": x[:, 4:9] / 255, "spatial": x[:, 9:]}

    monkeypatch.setattr(metrics, "load_inception", lambda *args: (nn.Identity(), False))
    monkeypatch.setattr(metrics, "extract", pixel_features)
    drawn = []
    for batch in (3, 8):
        generator = TinyGenerator()
        cfg = eval_config(batch=batch)
        metrics.evaluate(generator, real_batches(), cfg, 10, "cpu", progress=False)
        assert [len(z) for z, _ in generator.calls] == ([3, 3, 2] if batch == 3 else [8])
        drawn.append([torch.cat(t) for t in zip(*generator.calls, strict=True)])
    torch.testing.assert_close(drawn[0], drawn[1], rtol=0, atol=0)
    assert drawn[0][1].max() < 10 and len(drawn[0][1].unique()) > 1
