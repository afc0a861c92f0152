"""Tests for polyinr.model.augment (DiffAugment, blur) and polyinr.model.loss (hinge losses)."""

import pytest
import torch

from polyinr.model import augment, loss

B, H = 6, 16


def images(seed=0, shape=(B, 3, H, H)):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("op", sorted(augment.POLICIES))
def test_each_op_preserves_shape_and_dtype(op):
    """Every augmentation maps (B, 3, H, W) to the same shape and dtype."""
    torch.manual_seed(0)
    x = images(shape=(B, 3, H, H + 4))
    y = augment.POLICIES[op](x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.equal(y, x)


def test_diff_augment_applies_the_policy():
    """diff_augment with the full policy keeps the shape and changes the images."""
    torch.manual_seed(0)
    x = images()
    y = augment.diff_augment(x, ("color", "translation", "cutout"))
    assert y.shape == x.shape and y.is_contiguous() and not torch.equal(x, y)
    assert torch.equal(augment.diff_augment(x, ()), x)


def test_translation_shifts_content_and_fills_zeros():
    """Each image is its input shifted by one (dy, dx) within ratio*size, zeros outside."""
    torch.manual_seed(0)
    n = 32
    # Distinct positive values per pixel identify where each output pixel came from.
    x = (torch.arange(H * H, dtype=torch.float32).view(1, 1, H, H) + 1).repeat(n, 3, 1, 1)
    y = augment.translation(x, ratio=0.125)
    limit = int(H * 0.125 + 0.5)
    shifts = set()
    for i in range(n):
        src = y[i, 0]
        assert torch.equal(y[i, 1], src) and torch.equal(y[i, 2], src)  # same for all channels
        idx = torch.nonzero(src)
        r, c = idx[0].tolist()
        source = int(src[r, c].item()) - 1
        dy, dx = source // H - r, source % H - c
        assert abs(dy) <= limit and abs(dx) <= limit
        shifts.add((dy, dx))
        expected = torch.zeros(H, H)
        rows = slice(max(0, -dy), min(H, H - dy))
        cols = slice(max(0, -dx), min(H, H - dx))
        src_rows = slice(max(0, dy), min(H, H + dy))
        src_cols = slice(max(0, dx), min(H, H + dx))
        expected[rows, cols] = x[i, 0, src_rows, src_cols]
        assert torch.equal(src, expected), (dy, dx)
    assert len(shifts) > 5  # shifts are drawn per image


def test_cutout_zeros_one_square_of_the_right_side():
    """Cutout zeros one axis-aligned square of round(0.2*H) side (clipped at the border)."""
    torch.manual_seed(0)
    n, side = 64, 32
    x = torch.ones(n, 3, side, side)
    y = augment.cutout(x, ratio=0.2)
    size = round(0.2 * side)
    full = 0
    for i in range(n):
        zero = y[i] == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
        idx = torch.nonzero(zero[0])
        assert len(idx) > 0
        (r0, c0), (r1, c1) = idx.min(dim=0).values.tolist(), idx.max(dim=0).values.tolist()
        height, width = r1 - r0 + 1, c1 - c0 + 1
        assert len(idx) == height * width  # a filled rectangle
        assert height <= size and width <= size
        # Only a square touching the border may be smaller than `size`.
        assert height == size or r0 == 0 or r1 == side - 1
        assert width == size or c0 == 0 or c1 == side - 1
        full += len(idx) == size * size
        assert torch.equal(y[i][~zero], x[i][~zero])
    assert full > n // 2


def test_color_is_differentiable():
    """color passes gradcheck in float64 for a fixed random draw."""
    x = images(shape=(2, 3, 4, 4)).double().requires_grad_()

    def fixed_color(t):
        torch.manual_seed(0)
        return augment.color(t)

    assert torch.autograd.gradcheck(fixed_color, (x,))


@pytest.mark.parametrize("op", sorted(augment.POLICIES))
def test_every_op_passes_gradients(op):
    """Each op passes a non-zero gradient back to its input images."""
    torch.manual_seed(0)
    x = images().requires_grad_()
    (augment.POLICIES[op](x) * images(seed=1)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_blur_sigma_zero_is_identity():
    """blur(x, 0) returns x unchanged."""
    x = images()
    assert torch.equal(augment.blur(x, 0.0), x)


def test_blur_is_the_reference_kernel_with_zero_padding():
    """Radius floor(3 sigma), 2^-(t/sigma)^2 weights, zero borders: a constant image's
    centre stays, its corner drops to the reference's 0.38 at sigma 2."""
    const = torch.ones(1, 1, 32, 32)
    y = augment.blur(const, 2.0)
    t = torch.arange(-6, 7, dtype=torch.float64)
    k = torch.exp2(-((t / 2.0) ** 2))
    corner = float((k[6:].sum() / k.sum()) ** 2)
    assert corner == pytest.approx(0.38, abs=0.01)
    assert float(y[0, 0, 0, 0]) == pytest.approx(corner, abs=1e-6)
    assert float(y[0, 0, 16, 16]) == pytest.approx(1.0, abs=1e-6)


def test_blur_smooths_noise_and_keeps_the_mean_inside():
    """Blur lowers the variance of noise and keeps its level away from the borders."""
    x = images()
    y = augment.blur(x, 1.0)
    assert y.shape == x.shape
    assert y.var() < 0.5 * x.var()
    inner = (..., slice(3, -3), slice(3, -3))
    torch.testing.assert_close(y[inner].mean(), x[inner].mean(), atol=0.02, rtol=0)


def test_blur_stops_once_the_radius_is_zero():
    """sigma < 1/3 (radius floor(3 sigma) = 0) returns the images unchanged."""
    x = images()
    assert torch.equal(augment.blur(x, 0.33), x)
    assert not torch.equal(augment.blur(x, 0.34), x)


def test_blur_on_tiny_images_does_not_crash():
    """A kernel wider than a 4x4 image still gives a 4x4 image (zero padding)."""
    x = images(shape=(1, 3, 4, 4))
    assert augment.blur(x, 2.0).shape == x.shape


def test_blur_sigma_fades_linearly_to_zero():
    """blur_sigma goes 2 -> 0 linearly over blur_kimg and stays 0 after."""
    assert augment.blur_sigma(0, 2.0, 300.0) == 2.0
    assert augment.blur_sigma(75_000, 2.0, 300.0) == pytest.approx(1.5)
    assert augment.blur_sigma(150_000, 2.0, 300.0) == pytest.approx(1.0)
    assert augment.blur_sigma(300_000, 2.0, 300.0) == 0.0
    assert augment.blur_sigma(900_000, 2.0, 300.0) == 0.0
    assert augment.blur_sigma(10, 2.0, 0.0) == 0.0


def test_d_hinge_is_zero_at_the_margins():
    """d_hinge is 0 when real logits are +1 and fake logits -1."""
    real, fake = [torch.ones(4, 1, 2, 2)] * 2, [-torch.ones(4, 1, 2, 2)] * 2
    assert loss.d_hinge(real, fake).item() == 0.0


def test_d_hinge_at_zero_logits_is_two_per_head():
    """At zero logits each head contributes 1 + 1 = 2; two heads sum to 4."""
    zeros = torch.zeros(4, 1, 3, 3)
    assert loss.d_hinge([zeros], [zeros]).item() == pytest.approx(2.0)
    assert loss.d_hinge([zeros, zeros[:, :, :1, :1]], [zeros, zeros]).item() == pytest.approx(4.0)


def test_d_hinge_means_then_sums():
    """d_hinge is mean(relu(1 - real)) + mean(relu(1 + fake)), summed over heads."""
    real = [torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0.5])]
    fake = [torch.tensor([[-2.0, 0.0, 1.0]]), torch.tensor([-0.5])]
    expected = (0 + 1 + 2) / 3 + 0.5 + (0 + 1 + 2) / 3 + 0.5
    assert loss.d_hinge(real, fake).item() == pytest.approx(expected)


def test_g_hinge_is_minus_the_mean_fake_logit():
    """g_hinge of logits 0.5 is -0.5; summed over heads."""
    half = torch.full((4, 1, 2, 2), 0.5)
    assert loss.g_hinge([half]).item() == pytest.approx(-0.5)
    assert loss.g_hinge([half, torch.tensor([1.0, 3.0])]).item() == pytest.approx(-2.5)
