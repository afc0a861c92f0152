"""Tests for polyinr.discriminator: logits per tap, frozen features, gradients to G, weights."""

import dataclasses

import pytest
import torch
from tiny import TINY_GENERATOR

from polyinr import augment, discriminator, loss
from polyinr.discriminator import DiscriminatorConfig, ProjectedDiscriminator
from polyinr.generator import Generator

pytestmark = pytest.mark.usefixtures("single_thread")

R, B, CLASSES = 32, 2, 3
CFG = DiscriminatorConfig(
    networks=("tf_efficientnet_lite0",),
    pretrained=False,
    weights_dir="weights/timm",
    resize_224=False,
    proj_channels=8,
    head_channels=16,
    cmap_dim=8,
    diffaugment="color,translation,cutout",
    blur_sigma=2.0,
    blur_kimg=2.0,
)
G_CFG = dataclasses.replace(TINY_GENERATOR, num_classes=CLASSES, levels=3)


@pytest.fixture
def d():
    torch.manual_seed(0)
    return ProjectedDiscriminator(CFG, R, CLASSES)


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(B, 3, R, R, generator=gen) * 2 - 1
    return images, torch.tensor([0, 2])


def frozen_snapshot(d):
    params = {f"p:{k}": v.detach().clone() for k, v in d.features.named_parameters()}
    buffers = {f"b:{k}": v.detach().clone() for k, v in d.features.named_buffers()}
    projector = {f"proj:{k}": v.detach().clone() for k, v in d.projectors.state_dict().items()}
    return {**params, **buffers, **projector}


def test_forward_gives_one_logit_map_per_tap(d):
    """One feature network gives 4 patch-logit tensors (B, 1, s, s), finite."""
    images, c = batch()
    logits = d(images, c)
    assert len(logits) == 4 == len(d.heads)
    for x in logits:
        assert x.shape[:2] == (B, 1) and x.shape[2] == x.shape[3] >= 1
        assert torch.isfinite(x).all()


def test_d_step_leaves_frozen_networks_bit_identical(d):
    """An Adam hinge step in train mode changes the heads but no frozen parameter or buffer."""
    d.train()
    assert not any(m.training for net in d.features for m in net.modules())
    before = frozen_snapshot(d)
    assert any("running_mean" in k for k in before)
    heads_before = {k: v.clone() for k, v in d.heads.state_dict().items()}
    trainable = [p for p in d.parameters() if p.requires_grad]
    assert trainable and all(
        not p.requires_grad for p in [*d.features.parameters(), *d.projectors.parameters()]
    )
    opt = torch.optim.Adam(trainable, lr=1e-2, betas=(0.0, 0.99))
    torch.manual_seed(1)
    for step in range(2):
        real, c = batch(seed=step)
        fake, _ = batch(seed=10 + step)
        opt.zero_grad()
        loss.d_hinge(d(real, c), d(fake, c)).backward()
        opt.step()
    after = frozen_snapshot(d)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    heads_after = d.heads.state_dict()
    assert any(not torch.equal(heads_before[k], heads_after[k]) for k in heads_before)


def test_gradients_reach_the_generator():
    """G's parameters get non-zero gradients through blur, augmentation and D."""
    torch.manual_seed(0)
    g = Generator(G_CFG, R)
    d = ProjectedDiscriminator(CFG, R, CLASSES).train()
    z = torch.randn(B, G_CFG.z_dim)
    c = torch.tensor([1, 2])
    loss.g_hinge(d(augment.blur(g(z, c), 1.0), c)).backward()
    missing = [n for n, p in g.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert all(p.grad is None for p in d.features.parameters())


def test_pretrained_without_weights_says_where_to_put_them(tmp_path):
    """pretrained=True with an empty weights_dir names the file and the opt-out flag."""
    cfg = dataclasses.replace(CFG, pretrained=True, weights_dir=str(tmp_path))
    with pytest.raises(discriminator.MissingWeightsError) as e:
        ProjectedDiscriminator(cfg, R, CLASSES)
    message = str(e.value)
    assert str(tmp_path / "tf_efficientnet_lite0.safetensors") in message
    assert "discriminator.pretrained=false" in message


def test_weights_file_finds_a_local_file(tmp_path):
    """weights_file returns a present <dir>/<name>.pth and None when absent."""
    assert discriminator.weights_file("tf_efficientnet_lite0", str(tmp_path)) is None
    path = tmp_path / "tf_efficientnet_lite0.pth"
    path.write_bytes(b"")
    assert discriminator.weights_file("tf_efficientnet_lite0", str(tmp_path)) == path


def test_unknown_network_lists_valid_ones():
    """An unknown feature network name is refused, listing the known ones."""
    with pytest.raises(ValueError) as e:
        dataclasses.replace(CFG, networks=("resnet50",))
    assert "resnet50" in str(e.value)
    assert all(name in str(e.value) for name in discriminator.NETWORKS)


def test_unknown_diffaugment_op_is_refused():
    """The config rejects a DiffAugment policy naming an unknown op."""
    with pytest.raises(ValueError, match="rotate"):
        dataclasses.replace(CFG, diffaugment="color,rotate")


def test_trainable_state_dict_excludes_feature_networks(d):
    """trainable_state_dict holds heads and projections, never `features.` keys."""
    state = d.trainable_state_dict()
    assert state and not any(k.startswith("features.") for k in state)
    assert any(k.startswith("heads.") for k in state)
    assert any(k.startswith("projectors.") for k in state)


def test_resize_224_rule():
    """EfficientNet sees 224 below it only with resize_224; DeiT always sees 224."""
    d = ProjectedDiscriminator.__new__(ProjectedDiscriminator)
    torch.nn.Module.__init__(d)
    d.cfg = CFG
    assert d.feature_input_size("tf_efficientnet_lite0", 32) == 32
    assert d.feature_input_size("deit_base_distilled_patch16_224", 32) == 224
    d.cfg = dataclasses.replace(CFG, resize_224=True)
    assert d.feature_input_size("tf_efficientnet_lite0", 32) == 224
    assert d.feature_input_size("tf_efficientnet_lite0", 256) == 256
