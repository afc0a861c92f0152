"""Tests for polyinr.model.discriminator: logits per tap, frozen features, gradients to G,
weights."""

import dataclasses

import numpy as np
import pytest
import torch
from tiny import TINY_GENERATOR

from polyinr.core.config import DiscriminatorConfig
from polyinr.core.errors import MissingWeightsError
from polyinr.model import augment, discriminator, loss
from polyinr.model.discriminator import ProjectedDiscriminator
from polyinr.model.generator import Generator

pytestmark = pytest.mark.usefixtures("single_thread")

R, B, CLASSES = 32, 2, 3
CFG = DiscriminatorConfig(
    networks=("tf_efficientnet_lite0",),
    pretrained=False,
    weights_dir="weights/timm",
    input_size=32,
    proj_channels=8,
    head_channels=16,
    embed_dim=12,
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


def frozen(d):
    """The frozen parts of D: feature networks and projections."""
    return [m for b in d.branches for m in (b.features, b.projector)]


def frozen_snapshot(d):
    out = {}
    for i, module in enumerate(frozen(d)):
        out |= {f"{i}:{k}": v.detach().clone() for k, v in module.state_dict().items()}
    return out


def test_forward_gives_one_logit_map_per_tap(d):
    """One feature network gives 4 patch-logit tensors (B, 1, s, s), finite."""
    images, c = batch()
    logits = d(images, c)
    assert len(logits) == 4 == len(d.branches[0].heads)
    for x in logits:
        assert x.shape[:2] == (B, 1) and x.shape[2] == x.shape[3] >= 1
        assert torch.isfinite(x).all()


def test_d_step_leaves_frozen_networks_bit_identical(d):
    """An Adam hinge step in train mode changes the heads but no frozen parameter or buffer."""
    d.train()
    assert not any(m.training for b in d.branches for m in b.features.modules())
    before = frozen_snapshot(d)
    assert any("running_mean" in k for k in before)
    heads_before = {k: v.clone() for k, v in d.branches[0].heads.state_dict().items()}
    trainable = [p for p in d.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for m in frozen(d) for p in m.parameters())
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
    heads_after = d.branches[0].heads.state_dict()
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
    assert all(p.grad is None for m in frozen(d) for p in m.parameters())


def test_pretrained_without_weights_says_where_to_put_them(tmp_path):
    """pretrained=True for a network with no file names the file and the opt-out flag."""
    cfg = dataclasses.replace(
        CFG,
        networks=("deit_base_distilled_patch16_224",),
        pretrained=True,
        weights_dir=str(tmp_path),
    )
    with pytest.raises(MissingWeightsError) as e:
        ProjectedDiscriminator(cfg, R, CLASSES)
    message = str(e.value)
    assert str(tmp_path / "deit_base_distilled_patch16_224.safetensors") in message
    assert "discriminator.pretrained=false" in message


def test_weights_file_prefers_a_local_file_then_the_packaged_lite0(tmp_path):
    """A <dir>/<name>.pth wins; else EfficientNet-Lite0 comes from its pinned package."""
    packaged = discriminator.weights_file("tf_efficientnet_lite0", str(tmp_path))
    assert packaged is not None and packaged.name == "efficientnet-lite0-57934424.pth"
    path = tmp_path / "tf_efficientnet_lite0.pth"
    path.write_bytes(b"")
    assert discriminator.weights_file("tf_efficientnet_lite0", str(tmp_path)) == path
    assert discriminator.weights_file("deit_base_distilled_patch16_224", str(tmp_path)) is None


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
    """trainable_state_dict holds heads and projections, never the feature networks; it
    loads back exactly and refuses a state with other keys."""
    state = d.trainable_state_dict()
    assert state and not any(".features." in k for k in state)
    assert any(".heads." in k for k in state)
    assert any(".projector." in k for k in state)
    d.load_trainable_state_dict(state)
    with pytest.raises(ValueError, match="keys differ"):
        d.load_trainable_state_dict({k: v for k, v in state.items() if ".heads.0." not in k})


def test_counts_of_a_config_are_its_ds_and_leave_the_rng_alone(d):
    """Counting a config gives the counts of the D it builds, and draws nothing from the
    global RNG (summary runs beside seeded work)."""
    torch.manual_seed(1)
    counts = discriminator.config_parameter_counts(CFG, R, CLASSES)
    drawn = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(drawn, torch.rand(1))
    assert counts == discriminator.parameter_counts(d)


def test_input_size_rule():
    """EfficientNet sees images resized up to input_size, never down; DeiT always sees 224."""
    assert discriminator.input_size("tf_efficientnet_lite0", 32, 64) == 64
    assert discriminator.input_size("tf_efficientnet_lite0", 256, 224) == 256
    assert discriminator.input_size("deit_base_distilled_patch16_224", 32, 64) == 224


def test_reference_structure_at_224():
    """At 224 px the mixed maps are 112/56/28/14 px with 64/64/128/256 channels and every
    head ends in 4 x 4 logits, as the reference's D (proj and head widths at 64)."""
    cfg = dataclasses.replace(CFG, input_size=224, proj_channels=64, head_channels=64)
    torch.manual_seed(0)
    d = ProjectedDiscriminator(cfg, 32, CLASSES)
    branch = d.branches[0]
    with torch.no_grad():
        mixed = branch.projector(branch.features(torch.zeros(1, 3, 224, 224)))
        c = torch.tensor([1])
        logits = [head(m, c) for head, m in zip(branch.heads, mixed, strict=True)]
    assert [tuple(m.shape[1:]) for m in mixed] == [
        (64, 112, 112),
        (64, 56, 56),
        (128, 28, 28),
        (256, 14, 14),
    ]
    assert all(tuple(x.shape) == (1, 1, 4, 4) for x in logits)
    widths = [
        [m.out_channels for m in head.main if isinstance(m, torch.nn.Conv2d)]
        for head in branch.heads
    ]
    assert widths == [[64, 128, 256, 512], [128, 256, 512], [256, 512], [512]]


def test_pretrained_lite0_classifies_photographs():
    """The packaged ImageNet EfficientNet-Lite0, loaded by position into timm's network,
    puts the right ImageNet class on top for scikit-image's cat, coffee and rocket."""
    import numpy as np
    import torch.nn.functional as F
    from skimage import data

    net = discriminator.create_feature_network("tf_efficientnet_lite0", True, "no/such/dir").eval()
    expected = {"chelsea": {281, 282, 285}, "coffee": {504, 967, 968}, "rocket": {657, 744, 812}}
    for name, classes in expected.items():
        image = torch.from_numpy(np.ascontiguousarray(getattr(data, name)()[..., :3]))
        x = image.permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
        h, w = x.shape[-2:]
        s = min(h, w)
        x = x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        x = F.interpolate(x, size=224, mode="bicubic", antialias=True, align_corners=False)
        with torch.no_grad():
            top = int(net((x - 0.5) / 0.5).argmax())
        assert top in classes, (name, top)


def test_d_learns_against_a_fixed_random_generator():
    """With pretrained features, 30 Adam steps of D alone on shape images (random colours)
    against a fixed random G take the hinge loss from ~8 (chance) to below 2."""

    from polyinr.data import demo

    torch.manual_seed(0)
    classes, n = 2, 32
    images = torch.stack(
        [
            torch.from_numpy(np.array(demo._demo_image(k % classes, np.random.default_rng(k), R)))
            for k in range(n)
        ]
    )
    labels = torch.arange(n) % classes
    reals = images.permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, R, R)
    g = Generator(dataclasses.replace(G_CFG, num_classes=classes), R).eval()
    cfg = dataclasses.replace(CFG, pretrained=True, input_size=32)
    d = ProjectedDiscriminator(cfg, R, classes).train()
    opt = torch.optim.Adam(
        [p for p in d.parameters() if p.requires_grad], lr=1e-3, betas=(0.0, 0.99)
    )
    losses = []
    for _ in range(30):
        idx = torch.randint(n, (16,))
        with torch.no_grad():
            fake = g(torch.randn(16, G_CFG.z_dim), labels[idx])
        d_loss = loss.d_hinge(d(reals[idx], labels[idx]), d(fake, labels[idx]))
        opt.zero_grad()
        d_loss.backward()
        opt.step()
        losses.append(d_loss.item())
    assert losses[0] > 6
    assert np.mean(losses[-5:]) < 2


def test_deit_token_maps_reach_the_readout_contiguous():
    """DeiT's token grids are made contiguous before the readout convs, as the reference's:
    a strided (transposed) view makes the convs sum in another order (1.7e-5 apart in fp32),
    so the logits would not equal the reference's under copied weights."""
    torch.manual_seed(0)
    net = discriminator.FeatureNetwork("deit_base_distilled_patch16_224", False, "weights/none")
    seen = []
    for layer in net.readout:
        first = layer[0] if isinstance(layer, torch.nn.Sequential) else layer
        first.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    feats = net(torch.rand(1, 3, 224, 224) * 2 - 1)
    assert seen == [True] * 4
    assert [tuple(f.shape[1:]) for f in feats] == [
        (96, 56, 56),
        (192, 28, 28),
        (384, 14, 14),
        (768, 7, 7),
    ]
