"""Tests for the metrics suite (polyinr.evaluation.metrics, .reference, .featurestats): the
formulas,
reference statistics (ADM npz, cache, storage), evaluate() under both protocols, one
process vs two, and the FID during training."""

import json
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from polyinr.core.config import DataConfig, EvalConfig, StorageConfig
from polyinr.evaluation import featurenets, metrics, reference
from polyinr.evaluation.featurenets import Networks, no_tf32
from polyinr.evaluation.featurestats import FeatureStats
from polyinr.evaluation.metrics import (
    frechet_distance,
    inception_score,
    precision_recall,
    to_uint8,
)

MISSING = "/nonexistent/weights.pth"


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


def _realish_features(n, d, shift, seed):
    """Inception-pool-like rows (N, D): non-negative, correlated through a few factors."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(24, d)) / 6
    return np.maximum(rng.normal(size=(n, 24)) @ mix + 0.3 + shift, 0) + 0.05 * rng.random((n, d))


def _sqrtm_fd(x, y):
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)


@pytest.mark.parametrize("kind", ["random", "real-like"])
@pytest.mark.parametrize(("n1", "n2", "d"), [(12, 30, 48), (40, 9, 48), (10, 14, 48), (60, 70, 24)])
def test_low_rank_frechet_distance_agrees_with_sqrtm(kind, n1, n2, d):
    """With either, both or no sample factors (N < D or N >= D) the Frechet distance equals
    the sqrtm formula to 1e-6 relative."""
    if kind == "random":
        rng = np.random.default_rng(n1 + n2)
        x, y = rng.normal(size=(n1, d)), rng.normal(size=(n2, d)) @ rng.normal(size=(d, d))
    else:
        x, y = _realish_features(n1, d, 0.0, 1), _realish_features(n2, d, 0.02, 2)
    expected = _sqrtm_fd(x, y)
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    f1, f2 = metrics.covariance_factor(x, 1), metrics.covariance_factor(y, 1)
    np.testing.assert_allclose(f1 @ f1.T, s1, rtol=1e-12, atol=1e-12)
    for factors in [(f1, None), (None, f2), (f1, f2), (None, None)]:
        got = frechet_distance(mu1, s1, mu2, s2, *factors)
        assert got == pytest.approx(expected, rel=1e-6), factors


def test_low_rank_trace_term_is_taken_only_with_fewer_samples_than_dimensions(monkeypatch):
    """A factor with N >= D leaves the general eigenvalue path; one with N < D avoids it."""
    rng = np.random.default_rng(3)
    calls = []
    real_eigvals = scipy.linalg.eigvals
    monkeypatch.setattr(scipy.linalg, "eigvals", lambda a: calls.append(a) or real_eigvals(a))
    wide, tall = rng.normal(size=(8, 16)), rng.normal(size=(32, 16))
    for x in (wide, tall):
        s = np.cov(x, rowvar=False)
        frechet_distance(x.mean(0), s, x.mean(0) + 1, s, metrics.covariance_factor(x, 1))
    assert len(calls) == 1 and calls[0].shape == (16, 16)


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


def test_recall_halves_when_the_fakes_cover_half_the_reals():
    """Reals = a cluster plus a far-away copy, fakes = the cluster: precision 1, recall 1/2."""
    fake = np.random.default_rng(7).normal(size=(40, 4))
    real = np.concatenate([fake, fake + 100.0])
    assert precision_recall(real, fake, k=3) == (1.0, 0.5)


def test_precision_counts_fakes_inside_the_kth_neighbour_radius_on_a_line():
    """Reals 0..19 on a line have 3rd-neighbour radius 2 inside, 3 at the ends: a fake at 5.5
    is inside, one at 22 (the last real's radius ends at 22) too, one at 22.5 is not."""
    real = np.arange(20.0)[:, None]
    fake = np.array([[5.5], [22.0], [22.5], [-3.5], [10.0]])
    precision, _ = precision_recall(real, fake, k=3)
    assert precision == pytest.approx(3 / 5)


def test_inception_score_of_one_hot_logits_over_k_classes_is_k():
    """Each sample certain of one class, the K classes equally often: IS = K exactly."""
    k = 10
    logits = np.full((5 * k, k), -1e4)
    logits[np.arange(5 * k), np.arange(5 * k) % k] = 0.0
    mean, _ = inception_score(logits, splits=5)
    assert mean == pytest.approx(k, rel=1e-12)


@pytest.mark.parametrize("n", [12, 25, 50])
def test_inception_score_equals_torch_fidelity_for_any_sample_count(n):
    """Splits at i N // 10 as torch-fidelity (unshuffled), also when N is not a multiple of 10."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(n).normal(scale=3.0, size=(n, 7))
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    mean, std = inception_score(logits, 10)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9)


def test_no_tf32_restores_the_backend_flags():
    """The TF32 guard turns both flags off inside and restores them afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with no_tf32():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------------------------------------
# Doubles: a tiny generator and tiny feature networks, so the plumbing tests take milliseconds.


class TinyGenerator(nn.Module):
    """A class-conditional stand-in for the generator: tanh of a linear map, 32x32 output."""

    def __init__(self, z_dim=8, num_classes=10):
        super().__init__()
        self.cfg = SimpleNamespace(z_dim=z_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.embed = nn.Embedding(num_classes, z_dim)
            self.proj = nn.Linear(z_dim, 3 * 8 * 8)
        self.calls = []  # (z, c) of every call, to check what evaluate() draws

    def forward(self, z, c, psi=1.0):
        """z (B, z_dim), c (B,) -> images (B, 3, 32, 32) in (-1, 1)."""
        self.calls.append((z, c))
        x = torch.tanh(psi * 2.0 * self.proj(z + self.embed(c))).view(-1, 3, 8, 8)
        return nn.functional.interpolate(x, size=32, mode="nearest")  # (B, 3, 32, 32)


class TinyNet(nn.Module):
    """A seeded random projection of 4x4-pooled pixels standing in for a feature network."""

    def __init__(self, outputs: dict[str, int], seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.heads = nn.ParameterDict(
            {k: nn.Parameter(torch.randn(48, d, generator=g)) for k, d in outputs.items()}
        )
        self.label, self.weights_id = f"tiny test double {seed}", f"tiny-{seed}"
        self.source, self.has_logits = f"tiny-{seed}", "logits" in outputs

    def forward(self, images):
        """uint8 (N, 3, H, W) -> {name: (N, d)}."""
        x = nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)  # (N, 48)
        x = (x - 0.5) * 10.0  # block means of noise images differ by a few percent: spread them
        return {k: torch.tanh(x @ w / 48**0.5) for k, w in self.heads.items()}


def tiny_networks(cfg):
    """Networks of `cfg` with tiny doubles for Inception, the rFID Inception and VGG16."""
    modules = {
        "inception": TinyNet({"pool": 6, "logits": 5, "spatial": 7}, seed=1),
        "rinception": TinyNet({"pool": 6}, seed=2),
        "vgg16": TinyNet({"vgg": 9}, seed=3),
    }
    return Networks(cfg, "cpu", modules)


def storage_config(uri, endpoint_url, keep, tmp_path):
    return StorageConfig(
        uri=uri, endpoint_url=endpoint_url, keep=keep, retries=2, multipart_mb=64,
        staging_dir=str(tmp_path / "staging"), outage_minutes=15.0,
    )  # fmt: skip


def eval_config(tmp_path, **overrides):
    values = dict(
        protocol="adm",
        num_samples=12,
        batch=4,
        psi=1.0,
        seed=0,
        inception_weights=MISSING,
        vgg16_weights=MISSING,
        allow_random_weights=True,
        random_seed=0,
        reference_npz=None,
        cache_dir=str(tmp_path / "cache"),
        every_kimg=1.0,
        train_samples=8,
        grid_classes=2,
        grid_seeds=2,
        grid_psi=1.0,
    )
    return EvalConfig(**(values | overrides))


def adm_npz(path, n=14, seed=0):
    """A small synthetic ADM reference batch: statistics of a 6-d and 7-d Gaussian, 32px images."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(7, 7))
    arrays = dict(
        mu=rng.normal(size=6),
        sigma=a @ a.T / 6,
        mu_s=rng.normal(size=7),
        sigma_s=b @ b.T / 7,
        arr_0=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
    )
    np.savez(path, **arrays)
    return arrays


def test_metric_name_carries_the_sample_count():
    """FIDs on different sample counts are never confused: fid50k, fid10k, fid256."""
    assert [metrics.metric_name(n) for n in (50_000, 10_000, 256)] == ["fid50k", "fid10k", "fid256"]


def test_adm_reference_npz_statistics_are_used_as_is(tmp_path):
    """mu, sigma, mu_s, sigma_s of an ADM batch come through unchanged; P/R and rFID features
    are computed from its arr_0 images (all of them: ADM uses 10k reference images)."""
    arrays = adm_npz(tmp_path / "ref.npz")
    cfg = eval_config(tmp_path, reference_npz=str(tmp_path / "ref.npz"))
    ref = reference.load_reference(cfg, metrics.PARTS, 32, tiny_networks(cfg), None, None, False)
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(ref[key], arrays[key])
    assert int(ref["n"]) == 14 and ref["pr"].shape == (14, 6)  # Inception pool under adm
    images = torch.from_numpy(arrays["arr_0"]).permute(0, 3, 1, 2)
    expected = TinyNet({"pool": 6, "logits": 5, "spatial": 7}, seed=1)(images)["pool"]
    np.testing.assert_allclose(ref["pr"], expected.detach().numpy(), rtol=1e-6)
    rpool = TinyNet({"pool": 6}, seed=2)(images)["pool"].detach().double().numpy()
    np.testing.assert_allclose(ref["mu_r"], rpool.mean(0), rtol=1e-9)
    np.testing.assert_allclose(ref["sigma_r"], np.cov(rpool, rowvar=False), rtol=1e-9, atol=1e-14)


def test_reference_npz_without_adm_keys_is_refused(tmp_path):
    """A file lacking mu/sigma/... is named with what it lacks."""
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    cfg = eval_config(tmp_path, reference_npz=str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="mu_s"):
        reference.load_reference(cfg, ["fid"], 32, tiny_networks(cfg), None, None, False)


def test_reference_is_cached_locally_and_in_s3_and_keyed_by_weights(tmp_path, s3_bucket, s3_env):
    """Computed once: a second call reads the local cache, a fresh machine (empty cache dir)
    reads storage.uri, and other feature weights make a new key."""
    adm_npz(tmp_path / "ref.npz")
    cfg = eval_config(tmp_path, reference_npz=str(tmp_path / "ref.npz"), protocol="stylegan-xl")
    storage = storage_config(f"s3://{s3_bucket}/runs", s3_env, 2, tmp_path)
    first = reference.load_reference(cfg, ["pr", "rfid"], 32, tiny_networks(cfg), None, storage)
    assert first["pr"].shape == (14, 9)  # VGG16 features under stylegan-xl
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2

    class Refuses(TinyNet):
        def forward(self, images):
            raise AssertionError("the cache should have answered")

    refusing = Networks(cfg, "cpu", {"vgg16": Refuses({"vgg": 9}, 3), "inception": Refuses({}, 1)})
    refusing._modules["rinception"] = Refuses({"pool": 6}, 2)
    again = reference.load_reference(cfg, ["pr", "rfid"], 32, refusing, None, storage)
    fresh = dataclasses_replace(cfg, cache_dir=str(tmp_path / "empty"))
    from_s3 = reference.load_reference(fresh, ["pr", "rfid"], 32, refusing, None, storage)
    for ref in (again, from_s3):
        for key in ("pr", "mu_r", "sigma_r"):
            np.testing.assert_array_equal(ref[key], first[key])
    import boto3

    listed = boto3.client("s3", endpoint_url=s3_env).list_objects_v2(Bucket=s3_bucket)
    names = sorted(o["Key"] for o in listed["Contents"])
    assert len(names) == 2 and all(n.startswith("runs/reference-stats/") for n in names)
    other = Networks(cfg, "cpu", {"vgg16": TinyNet({"vgg": 9}, seed=4)})
    other._modules |= {"inception": Refuses({}, 1), "rinception": Refuses({"pool": 6}, 2)}
    changed = reference.load_reference(cfg, ["pr"], 32, other, None, None, False)
    assert not np.array_equal(changed["pr"], first["pr"])


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_data_fingerprint_is_a_function_of_content_only(tmp_path):
    """The cache key of training data changes with the data, not with how long prepare took,
    how many workers it had, where the source was or the FFCV file's page layout."""
    manifest = {"resolution": 32, "written": 4, "classes": ["a"], "per_class": [4]}
    manifest |= {"encoding": "jpg", "jpeg_quality": 90, "source_fingerprint": "sha256:1"}
    (tmp_path / "train_32.json").write_text(json.dumps(manifest))
    (tmp_path / "train_32.beton").write_bytes(b"x" * 10)
    before = reference.data_fingerprint(tmp_path, 32)
    volatile = {"seconds": 9.0, "images_per_second": 9.0, "scan_seconds": 3.0, "workers": 7}
    volatile |= {"source": "/elsewhere/ILSVRC.tar", "source_kind": "tar"}
    (tmp_path / "train_32.json").write_text(json.dumps(manifest | volatile))
    (tmp_path / "train_32.beton").write_bytes(b"x" * 11)
    assert reference.data_fingerprint(tmp_path, 32) == before
    for change in ({"source_fingerprint": "sha256:2"}, {"jpeg_quality": 95}, {"written": 3}):
        (tmp_path / "train_32.json").write_text(json.dumps(manifest | change))
        assert reference.data_fingerprint(tmp_path, 32) != before, change


class Counting(nn.Module):
    """Wraps a feature network: counts its calls and fails on call number `fail_at`."""

    def __init__(self, net, fail_at=None):
        super().__init__()
        self.net, self.calls, self.fail_at = net, 0, fail_at
        self.label, self.weights_id = net.label, net.weights_id
        self.source, self.has_logits = net.source, net.has_logits

    def forward(self, images):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed mid-pass")
        return self.net(images)


def test_an_interrupted_reference_pass_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Killed after 2 of 4 batches, the pass computes only the other 2 when run again and
    gives the uninterrupted result bit for bit; its progress bar counts images with a total."""
    monkeypatch.setattr(reference, "PARTIAL_SECONDS", 0.0)  # save after every batch
    adm_npz(tmp_path / "ref.npz")  # 14 images: batches of 4, 4, 4, 2
    cfg = eval_config(tmp_path, reference_npz=str(tmp_path / "ref.npz"), protocol="stylegan-xl")

    def nets_with(inception, vgg):
        nets = tiny_networks(cfg)
        nets._modules |= {"rinception": inception, "vgg16": vgg}
        return nets

    whole = reference.load_reference(
        dataclasses_replace(cfg, cache_dir=str(tmp_path / "other")), ["pr", "rfid"], 32,
        tiny_networks(cfg), None, None, False,
    )  # fmt: skip
    killed = nets_with(Counting(TinyNet({"pool": 6}, 2), fail_at=3), TinyNet({"vgg": 9}, 3))
    with pytest.raises(KeyboardInterrupt):
        reference.load_reference(cfg, ["pr", "rfid"], 32, killed, None, None, False)
    assert len(list((tmp_path / "cache").glob("pass-*.partial-0of1.npz"))) == 1
    rinception, vgg = Counting(TinyNet({"pool": 6}, 2)), Counting(TinyNet({"vgg": 9}, 3))
    resumed = reference.load_reference(
        cfg, ["pr", "rfid"], 32, nets_with(rinception, vgg), None, None, progress=True
    )
    assert rinception.calls == vgg.calls == 2
    for key in ("pr", "mu_r", "sigma_r"):
        np.testing.assert_array_equal(resumed[key], whole[key])
    assert not list((tmp_path / "cache").glob("pass-*"))  # finished: only the results stay
    assert "14/14" in capsys.readouterr().err  # a total, hence an ETA


def test_evaluate_takes_the_class_count_from_the_generator_not_the_params(tmp_path):
    """A 10-class generator evaluated with params saying 4 classes samples all 10."""
    adm_npz(tmp_path / "ref.npz")
    cfg_eval = eval_config(tmp_path, reference_npz=str(tmp_path / "ref.npz"), num_samples=40)
    cfg = SimpleNamespace(
        eval=cfg_eval, storage=None, data=SimpleNamespace(out_dir=None),
        generator=SimpleNamespace(num_classes=4, conditional=True, class_count=4),
    )  # fmt: skip
    generator = TinyGenerator(num_classes=10)
    generator.cfg = SimpleNamespace(z_dim=8, num_classes=10, conditional=True, class_count=10)
    result, seconds = metrics.evaluate_generator(
        cfg, generator, 32, "cpu", progress=False, nets=tiny_networks(cfg_eval)
    )
    classes = torch.cat([c for _, c in generator.calls])
    assert classes.max() >= 4 and result["num_samples"] == 40
    assert {"reference", "render", "samples", "metrics", "total"} <= set(seconds)
    assert seconds["total"] >= seconds["reference"] + seconds["render"]


@pytest.mark.slow
def test_training_data_reference_reads_the_ffcv_file_once_with_an_even_pr_subset(
    tmp_path, monkeypatch
):
    """From a prepared FFCV file: statistics of every image (1/N under stylegan-xl), P/R rows
    of every stride-th image (here at most 3 of 8: images 0, 3, 6), then the cache answers."""
    from polyinr import data

    cfg_data = DataConfig(
        source=str(tmp_path / "demo"), out_dir=str(tmp_path / "ffcv"), encoding="raw",
        jpeg_quality=90, strict=True, workers=1, scan_cache=None, demo_kind="shapes",
        demo_classes=2, demo_per_class=4,
        demo_size=16, demo_seed=0,
    )  # fmt: skip
    data.make_demo_dataset(Path(cfg_data.source), 2, 4, 16, 0)
    data.prepare(cfg_data, [16], progress=False)
    monkeypatch.setitem(reference.PR_REFERENCE, "stylegan-xl", 3)
    cfg = eval_config(tmp_path, protocol="stylegan-xl", batch=3)
    nets = tiny_networks(cfg)
    ref = reference.load_reference(cfg, metrics.PARTS, 16, nets, cfg_data.out_dir, None, False)
    images = torch.cat([x for x, _ in data.read_all(data.beton_path(cfg_data.out_dir, 16))])
    feats = nets.features(images, ["inception", "vgg16"])
    assert len(images) == 8 and int(ref["n"]) == 8
    np.testing.assert_allclose(ref["mu"], feats["pool"].mean(0), rtol=1e-9)
    np.testing.assert_allclose(
        ref["sigma"], np.cov(feats["pool"], rowvar=False, ddof=0), atol=1e-12
    )
    np.testing.assert_allclose(ref["pr"], feats["vgg"][[0, 3, 6]], rtol=1e-5)  # float32 rows
    monkeypatch.setattr(reference, "accumulate", None)  # a second pass would fail
    cached = reference.load_reference(cfg, metrics.PARTS, 16, nets, cfg_data.out_dir, None)
    assert len(list(Path(cfg.cache_dir).glob("*.npz"))) == 3
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pr", "mu_r", "sigma_r"):
        np.testing.assert_array_equal(cached[key], ref[key])


@pytest.mark.parametrize("protocol", ["adm", "stylegan-xl"])
def test_evaluate_scores_every_part_with_the_protocols_covariance(tmp_path, protocol):
    """evaluate() equals the formulas applied by hand to the same features: covariance 1/(N-1)
    for adm and 1/N for stylegan-xl, P/R on Inception pool (adm) or VGG16 (stylegan-xl)."""
    adm_npz(tmp_path / "ref.npz")
    cfg = eval_config(tmp_path, reference_npz=str(tmp_path / "ref.npz"), protocol=protocol)
    nets = tiny_networks(cfg)
    ref = reference.load_reference(cfg, metrics.PARTS, 32, nets, None, None, False)
    result = metrics.evaluate(TinyGenerator(), ref, cfg, 10, nets, "cpu", progress=False)
    json.dumps(result, allow_nan=False)

    rng = torch.Generator().manual_seed(cfg.seed)
    z = torch.randn(12, 8, generator=rng)
    c = torch.randint(0, 10, (12,), generator=rng)
    with torch.no_grad():
        images = to_uint8(TinyGenerator()(z, c))
    feats = nets.features(images, ["inception", "rinception", "vgg16"])
    ddof = 1 if protocol == "adm" else 0

    def fd(x, mu, sigma):
        return frechet_distance(x.mean(0), np.cov(x, rowvar=False, ddof=ddof), mu, sigma)

    assert result["fid"] == pytest.approx(fd(feats["pool"], ref["mu"], ref["sigma"]), rel=1e-9)
    assert result["sfid"] == pytest.approx(fd(feats["spatial"], ref["mu_s"], ref["sigma_s"]))
    assert result["rfid"] == pytest.approx(fd(feats["rpool"], ref["mu_r"], ref["sigma_r"]))
    assert (result["is_mean"], result["is_std"]) == pytest.approx(
        inception_score(feats["logits"], 6)
    )
    pr_key = "pool" if protocol == "adm" else "vgg"
    assert (result["precision"], result["recall"]) == precision_recall(ref["pr"], feats[pr_key])
    assert result["pr_features"] == ("inception-pool" if protocol == "adm" else "vgg16-fc7")
    assert result["protocol"] == protocol and result["num_samples"] == 12
    assert result["label"].startswith("fid12 (") and result["rfid_seed"] == 0
    assert result["fid"] > 1e-3 and 0 <= result["precision"] <= 1


def test_an_inception_without_logits_scores_fid_and_sfid_and_says_why_is_is_missing(tmp_path):
    """The packaged weights have no classifier: FID and sFID as usual, no IS numbers, a note
    naming the weights' source, and eval.json's inception_weights is that source."""
    adm_npz(tmp_path / "ref.npz")
    cfg = eval_config(tmp_path, reference_npz=str(tmp_path / "ref.npz"))
    nets = tiny_networks(cfg)
    nets._modules["inception"] = TinyNet({"pool": 6, "spatial": 7}, seed=1)
    ref = reference.load_reference(cfg, ["fid"], 32, nets, None, None, False)
    result = metrics.evaluate(
        TinyGenerator(), ref, cfg, 10, nets, "cpu", parts=["fid"], progress=False
    )
    assert math.isfinite(result["fid"]) and math.isfinite(result["sfid"])
    assert "is_mean" not in result and "is_std" not in result
    assert result["is_skipped"].startswith("no IS: tiny-1 has no 1008-way logits")
    assert result["inception_weights"] == "tiny-1"


def test_evaluate_draws_the_same_latents_and_classes_whatever_the_batch_size(tmp_path):
    """Samples depend on cfg.seed only: batch 3 and batch 12 feed the generator the same z, c."""
    adm_npz(tmp_path / "ref.npz")
    drawn = []
    for batch in (3, 12):
        cfg = eval_config(tmp_path, reference_npz=str(tmp_path / "ref.npz"), batch=batch)
        nets = tiny_networks(cfg)
        ref = reference.load_reference(cfg, ["fid"], 32, nets, None, None, False)
        generator = TinyGenerator()
        metrics.evaluate(generator, ref, cfg, 10, nets, "cpu", parts=["fid"], progress=False)
        assert [len(z) for z, _ in generator.calls] == ([3, 3, 3, 3] if batch == 3 else [12])
        drawn.append([torch.cat(t) for t in zip(*generator.calls, strict=True)])
    torch.testing.assert_close(drawn[0], drawn[1], rtol=0, atol=0)
    assert drawn[0][1].max() < 10 and len(drawn[0][1].unique()) > 1


# ---------------------------------------------------------------------------------------------
# Distributed: two gloo processes give the single-process result


def _distributed_worker(rank, world, port, tmp, out):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    from pathlib import Path

    cfg = eval_config(Path(tmp), reference_npz=f"{tmp}/ref.npz", cache_dir=f"{tmp}/cache{world}")
    nets = tiny_networks(cfg)
    ref = reference.load_reference(cfg, metrics.PARTS, 32, nets, None, None, False)
    result = metrics.evaluate(TinyGenerator(), ref, cfg, 10, nets, "cpu", progress=False)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
        np.save(f"{out}.pr.npy", ref["pr"])
    dist.destroy_process_group()


def test_two_processes_give_the_single_process_result(tmp_path):
    """Reference pass and samples split over 2 gloo ranks (uneven: 14 reals, 12 samples in
    batches of 4) give the same metrics and the same gathered P/R rows as one process."""
    import torch.multiprocessing as mp

    adm_npz(tmp_path / "ref.npz")
    results = {}
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = str(tmp_path / f"result{world}.json")
        mp.spawn(_distributed_worker, args=(world, port, str(tmp_path), out), nprocs=world)
        results[world] = json.loads((tmp_path / f"result{world}.json").read_text())
        results[world]["pr_rows"] = np.load(f"{out}.pr.npy")
    np.testing.assert_array_equal(results[1].pop("pr_rows"), results[2].pop("pr_rows"))
    assert results[1].keys() == results[2].keys()
    for key, value in results[1].items():
        if isinstance(value, float):
            assert results[2][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        else:
            assert results[2][key] == value, key


# ---------------------------------------------------------------------------------------------
# The FID during training


def test_training_fid_is_the_fid_of_train_samples_with_networks_loaded_once(tmp_path):
    """TrainingFID(g, resolution) is evaluate()'s FID of eval.train_samples samples against the
    training statistics at that resolution, which load once; it writes nothing."""
    adm_npz(tmp_path / "ref.npz")
    cfg_eval = eval_config(tmp_path, reference_npz=str(tmp_path / "ref.npz"), every_kimg=1.0)
    generator = SimpleNamespace(num_classes=10, conditional=True, class_count=10)
    cfg = SimpleNamespace(
        eval=cfg_eval, storage=None, generator=generator, data=SimpleNamespace(out_dir=None)
    )
    nets = tiny_networks(cfg_eval)
    fid = metrics.TrainingFID(cfg, "cpu", nets=nets)
    g = TinyGenerator()
    first = fid(g, 32)
    reference = fid.references[32]
    expected = metrics.evaluate(
        g, reference, cfg_eval, 10, nets, "cpu", parts=["fid"],
        num_samples=cfg_eval.train_samples, progress=False,
    )["fid"]  # fmt: skip
    assert first == expected and fid.name == metrics.metric_name(cfg_eval.train_samples)
    with torch.no_grad():  # the generator "trains": samples move away from the start
        g.proj.bias += 0.5
    assert fid(g, 32) != first and fid.references[32] is reference
    assert not [*tmp_path.rglob("*.csv"), *tmp_path.rglob("*.json")]


# ---------------------------------------------------------------------------------------------
# The real networks end to end (random weights)


@pytest.mark.slow
def test_evaluate_with_random_weight_networks_gives_finite_labelled_numbers(tmp_path):
    """The real Inception (random, labelled) on an ADM npz: finite metrics, non-trivial FID,
    IS above 1; rFID shares the random network with FID and says so."""
    adm_npz(tmp_path / "ref.npz", n=8)
    cfg = eval_config(tmp_path, reference_npz=str(tmp_path / "ref.npz"), num_samples=8)
    nets = Networks(cfg, "cpu", {"inception": featurenets.random_inception(0, "cpu")})
    ref = reference.load_reference(cfg, ["pr", "rfid"], 32, nets, None, None, False)
    ref |= {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023)}
    ref |= {"sigma_s": np.eye(2023), "n": np.array(8)}
    result = metrics.evaluate(TinyGenerator(), ref, cfg, 10, nets, "cpu", progress=False)
    json.dumps(result, allow_nan=False)
    for key in ("fid", "sfid", "is_mean", "is_std", "precision", "recall", "rfid"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["inception_weights"] == "random (seed 0)" and "RANDOM" in result["label"]
    assert nets.get("rinception") is nets.get("inception")
    assert result["is_mean"] > 1 + 1e-6 and result["rfid"] > 1e-2


def test_evaluate_refuses_reference_data_of_other_classes_than_the_generator(tmp_path):
    """Training data with 2 classes cannot score a 10-class generator: one line, both counts."""
    from polyinr import data

    cfg_data = DataConfig(
        source=str(tmp_path / "demo"), out_dir=str(tmp_path / "ffcv"), encoding="raw",
        jpeg_quality=90, strict=True, workers=1, scan_cache=None, demo_kind="shapes",
        demo_classes=2, demo_per_class=2,
        demo_size=8, demo_seed=0,
    )  # fmt: skip
    data.make_demo_dataset(Path(cfg_data.source), 2, 2, 8, 0)
    data.prepare(cfg_data, [8], progress=False)
    cfg = SimpleNamespace(eval=eval_config(tmp_path), storage=None, data=cfg_data)
    generator = TinyGenerator(num_classes=10)
    generator.cfg = SimpleNamespace(z_dim=8, num_classes=10, conditional=True, class_count=10)
    with pytest.raises(data.DataError, match="num_classes=10 but .* lists 2 classes"):
        metrics.evaluate_generator(
            cfg, generator, 8, "cpu", progress=False, nets=tiny_networks(cfg.eval)
        )
