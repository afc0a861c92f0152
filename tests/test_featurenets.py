"""Tests for polyinr.evaluation.featurenets: weights from local files, clear errors, honest
random doubles."""

import os

import numpy as np
import pytest
import torch

from polyinr.evaluation import featurenets
from polyinr.evaluation.featurenets import MissingWeightsError, extract, load_inception, load_vgg16
from polyinr.evaluation.featurestats import FeatureStats
from polyinr.evaluation.metrics import frechet_distance, inception_score

MISSING = "/nonexistent/weights.pth"


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
    assert not real and "RANDOM" in model.label
    return model


def test_missing_weights_raise_error_naming_both_paths_and_the_escape_hatch(tmp_path, monkeypatch):
    """Without weights and without allow_random the loader refuses, saying where it looked."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        load_inception(MISSING, allow_random=False, random_seed=0, device="cpu")
    message = str(info.value)
    cached = os.path.join(str(tmp_path), "hub", "checkpoints", featurenets.WEIGHTS_FILE)
    for needle in (MISSING, cached, featurenets.WEIGHTS_URL, "eval.allow_random_weights=true"):
        assert needle in message


def test_weights_in_torch_home_cache_are_found_and_count_as_real(tmp_path, monkeypatch):
    """A weights file in $TORCH_HOME/hub/checkpoints is used when the configured path is absent;
    its weights id is the file's hash (the reference-statistics cache key)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / featurenets.WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    state = featurenets._random_state_dict(seed=1)
    torch.save(state, cached)
    model, real = load_inception(MISSING, allow_random=False, random_seed=0, device="cpu")
    assert real and model.label == "TF-2015 Inception weights"
    assert model.weights_id == f"inception-{featurenets.file_sha256(cached)[:16]}"
    torch.testing.assert_close(model.net.fc.weight, state["fc.weight"])


def test_random_weights_are_seeded():
    """The same random_seed gives the same network; another seed a different one."""
    a, b = featurenets._random_state_dict(0), featurenets._random_state_dict(0)
    c = featurenets._random_state_dict(1)
    key = "Mixed_6d.branch1x1.conv.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_random_weight_inception_gives_non_degenerate_features(random_inception):
    """Kaiming re-init keeps pool features from vanishing and images distinguishable; the sFID
    features are 17 x 17 x 7 = 2023-d."""
    feats = extract(random_inception, random_images(4, seed=0))
    assert feats["pool"].shape == (4, 2048) and feats["pool"].dtype == np.float64
    assert feats["logits"].shape == (4, 1008)
    assert feats["spatial"].shape == (4, 2023)
    assert feats["pool"].std() > 1e-3
    assert feats["pool"].std(axis=0).mean() > 1e-3  # differs between images, not just constant
    assert feats["spatial"].std(axis=0).mean() > 1e-3
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


def test_loaded_networks_are_frozen_channels_last_and_match_the_contiguous_network(
    random_inception,
):
    """The loaded Inception is in eval mode without gradients, its convolutions channels-last
    (the CPU's fast layout), and its features equal those of the same weights in NCHW."""
    assert not random_inception.training
    assert not any(p.requires_grad for p in random_inception.parameters())
    weight = random_inception.net.Conv2d_4a_3x3.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    contiguous = featurenets.random_inception(0, "cpu").to(memory_format=torch.contiguous_format)
    images = random_images(3, seed=4)
    fast, plain = extract(random_inception, images), extract(contiguous, images)
    for key in ("pool", "logits", "spatial"):  # other convolution kernels: round-off only
        difference = np.linalg.norm(fast[key] - plain[key]) / np.linalg.norm(plain[key])
        assert difference < 1e-5, key


def test_missing_vgg16_weights_name_the_file_and_the_escape_hatch():
    """Precision/recall of stylegan-xl needs VGG16: the error names the file and the option."""
    with pytest.raises(MissingWeightsError) as info:
        load_vgg16(MISSING, allow_random=False, random_seed=0, device="cpu")
    for needle in (MISSING, featurenets.VGG16_FILE, "eval.vgg16_weights", "allow_random_weights"):
        assert needle in str(info.value)


def test_random_vgg16_double_does_not_collapse_and_is_seeded():
    """Random VGG16 fc7 features keep their scale and differ between images, so precision and
    recall on them can fail; the same seed gives the same features."""
    model, real = load_vgg16(MISSING, allow_random=True, random_seed=0, device="cpu")
    assert not real and "RANDOM VGG16" in model.label
    images = random_images(4, seed=3)
    feats = extract(model, images)["vgg"]
    assert feats.shape == (4, 4096)
    assert feats.std() > 1e-2 and (feats > 0).mean() > 0.05  # ReLU outputs, not all dead
    distances = np.linalg.norm(feats[:, None] - feats[None], axis=-1)[np.triu_indices(4, 1)]
    assert distances.min() > 1e-2 * np.linalg.norm(feats, axis=1).mean()
    again, _ = load_vgg16(MISSING, allow_random=True, random_seed=0, device="cpu")
    np.testing.assert_array_equal(extract(again, images)["vgg"], feats)


def test_the_configured_inception_path_is_the_file_the_loader_reads():
    """params.yaml and the paper's config point at torch-fidelity's file, the one that loads
    (pytorch-fid's pt_inception-*.pth is another format)."""
    from pathlib import Path

    from polyinr.core import config

    root = Path(__file__).resolve().parents[1]
    for params in ("params.yaml", "configs/imagenet-256.yaml"):
        path = config.load(root / params).eval.inception_weights
        assert Path(path).name == featurenets.WEIGHTS_FILE, params


def test_missing_weights_error_names_only_the_paths_looked_at(tmp_path, monkeypatch):
    """The message names the configured path and the cache, and says where to download to;
    no other file name appears outside the URL."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    configured = str(tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(MissingWeightsError) as info:
        load_inception(configured, allow_random=False, random_seed=0, device="cpu")
    message = str(info.value).replace(featurenets.WEIGHTS_URL, "URL")
    cached = os.path.join(str(tmp_path), "hub", "checkpoints", featurenets.WEIGHTS_FILE)
    assert f"no Inception weights at {configured!r} nor at {cached!r}" in message
    assert f"Download URL to {configured!r}" in message


def test_a_weights_file_of_another_format_is_named_with_the_right_one(tmp_path):
    """A file that exists but does not fit (pytorch-fid's format) is one clear error."""
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match=f"{path} is not torch-fidelity's TF-2015 Inception"):
        load_inception(str(path), allow_random=False, random_seed=0, device="cpu")
