"""Tests for polyinr.model.generator and polyinr.model.fast_synthesis: shapes, pixel/batch
independence,
counts, truncation, I/O, and the fast path equal to the plain definition."""

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny import TINY_GENERATOR

from polyinr.core.config import load
from polyinr.model import fast_synthesis, generator
from polyinr.model.generator import Generator, coordinate_grid

pytestmark = pytest.mark.usefixtures("single_thread")

R = 8
TINY = TINY_GENERATOR
# The paper's generator as shipped: the reference's parameter counts (docs/model.md) are
# checked on what users train.
PAPER = load(Path(__file__).resolve().parents[1] / "configs/imagenet-256.yaml").generator


class Payload:
    """An arbitrary pickled object: loading it would run code, so it must be refused."""


@pytest.fixture
def g():
    torch.manual_seed(0)
    return Generator(TINY, R).eval()


def latents(n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, TINY.z_dim, generator=gen)
    c = torch.arange(n) % TINY.num_classes
    return z, c


@pytest.fixture(scope="module")
def paper_counts():
    torch.manual_seed(0)
    cond = generator.parameter_counts(Generator(PAPER, 4))
    uncond = generator.parameter_counts(Generator(dataclasses.replace(PAPER, conditional=False), 4))
    return cond, uncond


def test_output_shape(g):
    """(z, c) gives images (B, 3, R, R), finite and not constant."""
    z, c = latents()
    with torch.no_grad():
        x = g(z, c)
    assert x.shape == (4, 3, R, R)
    assert torch.isfinite(x).all() and x.std() > 0


def test_pixel_independence(g):
    """Rendering a subset of coordinates equals the same pixels of the full render."""
    z, c = latents()
    grid = coordinate_grid(R)
    with torch.no_grad():
        full = g(z, c)
        part = g(z, c, coords=grid[::2, 1::3])
    assert part.shape == (4, 3, R // 2, len(range(1, R, 3)))
    torch.testing.assert_close(part, full[:, :, ::2, 1::3], atol=1e-5, rtol=1e-5)


def test_arbitrary_coordinate_set_shape(g):
    """Any (..., 2) coordinate set, even outside [0, 1], gives RGB (B, 3, ...)."""
    z, c = latents()
    coords = torch.rand(5, 2) * 3 - 1  # (P, 2) points outside the frame too
    with torch.no_grad():
        x = g(z, c, coords=coords)
    assert x.shape == (4, 3, 5)
    full = g(z, c, coords=coords[2:3]).detach()
    torch.testing.assert_close(x[:, :, 2:3], full, atol=1e-5, rtol=1e-5)


def test_batch_independence(g):
    """Sample i rendered alone equals sample i rendered in a batch."""
    z, c = latents(n=5)
    with torch.no_grad():
        batch = g(z, c)
        alone = torch.cat([g(z[i : i + 1], c[i : i + 1]) for i in range(5)])
    # fp32 matmuls block differently by batch size; 10 chained products amplify rounding.
    scale = batch.abs().max().item()
    torch.testing.assert_close(alone, batch, atol=1e-5 * scale, rtol=1e-4)


def test_class_condition_changes_the_image(g):
    """The same z with a different class gives a different image."""
    z, _ = latents(n=1)
    with torch.no_grad():
        a = g(z, torch.tensor([0]))
        b = g(z, torch.tensor([1]))
    assert (a - b).abs().max() > 1e-4


def test_conditional_generator_requires_classes(g):
    """A conditional generator refuses to run without labels."""
    z, _ = latents()
    with pytest.raises(ValueError, match="class labels"):
        g(z)


def test_paper_parameter_counts(paper_counts):
    """The paper configuration has the reference's exact per-part counts (45,869,695 in all)."""
    cond, _ = paper_counts
    assert cond["mapping"] == 669_248
    assert cond["levels"][0] == 2_628_614
    assert cond["levels"][1:] == [4_729_862] * 9
    assert cond["to_rgb"] == 3_075
    assert cond["total"] == 45_869_695


def test_paper_unconditional_parameter_count(paper_counts):
    """The unconditional paper generator has 45,496,383 parameters."""
    _, uncond = paper_counts
    assert uncond["total"] == 45_496_383


def test_parameter_counts_add_up(g):
    """parameter_counts' total equals every parameter of the module."""
    counts = generator.parameter_counts(g)
    assert counts["total"] == sum(p.numel() for p in g.parameters())


def test_coordinate_grid_is_a_non_persistent_buffer(g):
    """The grid is a fixed input: not a parameter, not in the state_dict."""
    assert not any("grid" in name for name, _ in g.named_parameters())
    assert not any("grid" in k for k in g.state_dict())
    assert any(name.endswith("grid") for name, _ in g.named_buffers())
    assert g.synthesis.grid.shape == (R, R, 2)


def test_coordinate_grid_values():
    """coordinate_grid(R) is arange(R)/(R-1) meshed with 'ij' indexing: (row, col)."""
    a = torch.arange(5, dtype=torch.float32) / 4
    expected = torch.stack(torch.meshgrid(a, a, indexing="ij"), dim=-1)
    grid = coordinate_grid(5)
    torch.testing.assert_close(grid, expected, rtol=0, atol=0)
    assert grid[0, 4].tolist() == [0.0, 1.0]  # row 0, last column


def test_set_resolution_swaps_the_grid(g):
    """set_resolution changes the default output size and leaves the state_dict alone."""
    keys = set(g.state_dict())
    g.synthesis.set_resolution(12)
    z, c = latents()
    with torch.no_grad():
        assert g(z, c).shape == (4, 3, 12, 12)
    assert g.resolution == 12 and set(g.state_dict()) == keys


def test_psi_zero_gives_the_class_average(g):
    """psi=0 returns w_avg[c] on every level; psi=1 leaves w unchanged."""
    torch.manual_seed(3)
    g.mapping.w_avg.copy_(torch.randn_like(g.mapping.w_avg))
    z, c = latents(n=6)
    with torch.no_grad():
        w0 = g.mapping(z, c, psi=0.0)
        w1 = g.mapping(z, c, psi=1.0)
        w_half = g.mapping(z, c, psi=0.5)
    expected = g.mapping.w_avg[c].unsqueeze(1).expand(-1, TINY.levels, -1)
    torch.testing.assert_close(w0, expected)
    assert w1.shape == (6, TINY.levels, TINY.w_dim)
    assert (w1 - expected).abs().max() > 1e-3
    torch.testing.assert_close(w_half, (w0 + w1) / 2)


def test_w_avg_update_moves_only_present_classes(g):
    """update_w_avg moves the rows of the classes in the batch towards their mean w."""
    torch.manual_seed(5)
    g.mapping.w_avg.normal_()
    before = g.mapping.w_avg.clone()
    z, _ = latents(n=4)
    c = torch.tensor([2, 0, 2, 0])
    with torch.no_grad():
        w = g.mapping(z, c, update_w_avg=True)[:, 0]
    after = g.mapping.w_avg
    assert torch.equal(after[1], before[1])
    beta = TINY.w_avg_beta
    for k in (0, 2):
        mean = w[c == k].mean(dim=0)
        torch.testing.assert_close(after[k], beta * before[k] + (1 - beta) * mean)


def test_w_avg_not_updated_by_default(g):
    """A plain forward pass leaves w_avg alone."""
    before = g.mapping.w_avg.clone()
    z, c = latents()
    with torch.no_grad():
        g(z, c)
    assert torch.equal(g.mapping.w_avg, before)


def test_finer_grid_contains_the_coarse_render(g):
    """Rendering 2R-1 points per side at the even coordinates equals the R render."""
    fine = coordinate_grid(2 * R - 1)
    torch.testing.assert_close(fine[::2, ::2], coordinate_grid(R), atol=1e-6, rtol=0)
    z, c = latents()
    with torch.no_grad():
        coarse = g(z, c)
        upsampled = g(z, c, coords=fine)
    assert upsampled.shape == (4, 3, 2 * R - 1, 2 * R - 1)
    torch.testing.assert_close(upsampled[:, :, ::2, ::2], coarse, atol=1e-5, rtol=1e-5)


def test_unconditional_generator_runs():
    """The unconditional variant renders from z alone with one w_avg row."""
    torch.manual_seed(0)
    g = Generator(dataclasses.replace(TINY, conditional=False), R)
    z, _ = latents()
    with torch.no_grad():
        assert g(z).shape == (4, 3, R, R)
        g(z, update_w_avg=True)
    assert g.mapping.w_avg.shape == (1, TINY.w_dim)
    assert g.mapping.w_avg.abs().sum() > 0


def test_save_load_round_trip(g, tmp_path):
    """save_generator then load_generator gives identical samples and the metadata."""
    path = tmp_path / "g.pt"
    g.mapping.w_avg.normal_()
    generator.save_generator(g, path, {"resolution": R, "kimg": 1.5})
    loaded, meta = generator.load_generator(path)
    assert meta == {"resolution": R, "kimg": 1.5}
    assert loaded.cfg == TINY and not loaded.training
    z, c = latents()
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, c, psi=0.7), g(z, c, psi=0.7), rtol=0, atol=0)


def test_load_refuses_pickled_objects(g, tmp_path):
    """A generator file carrying an arbitrary pickled object fails to load (weights_only)."""
    path = tmp_path / "evil.pt"
    state = {
        "config": dataclasses.asdict(TINY),
        "g_ema": g.state_dict(),
        "meta": {"resolution": R, "payload": Payload()},
    }
    torch.save(state, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        generator.load_generator(path)


def test_load_missing_file_says_so(tmp_path):
    """Loading a generator that was never trained names the path."""
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        generator.load_generator(tmp_path / "nope.pt")


def test_seed_latents_independent_of_batch():
    """seed_latents gives each seed the same z whatever else is in the batch."""
    a = generator.seed_latents([3, 7], 8)
    b = generator.seed_latents([7], 8)
    torch.testing.assert_close(a[1:], b)
    assert not torch.equal(a[0], a[1])


def test_to_uint8_maps_minus_one_one_to_0_255():
    """to_uint8 maps -1 -> 0, 1 -> 255 and clamps outside."""
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert generator.to_uint8(x).tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("hidden", [32, 256])
def test_init_neither_vanishes_nor_explodes_through_ten_levels(hidden):
    """With equalized C x C layers, at step 0 a typical sample has unit-scale output with
    spatial structure and a light tail: with PyTorch's default head init the median RMS is
    ~0.04 (flat grey). The plain layers get the same scale from _init_mixing (next test)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, hidden=hidden, w_dim=64, levels=10, mixing="equalized")
    g = Generator(cfg, 8).eval()
    z = torch.randn(128, cfg.z_dim)
    with torch.no_grad():
        x = g(z, torch.arange(128) % cfg.num_classes)
    rms = x.flatten(1).square().mean(dim=1).sqrt()
    spatial = x.std(dim=(2, 3)).mean(dim=1)
    assert 0.2 < rms.median() < 2.0
    assert torch.quantile(rms, 0.99) < 5 * rms.median()
    assert spatial.median() > 0.03
    # Each level's warp starts at the identity: the coordinates keep their spread.
    xs = coordinate_grid(8).reshape(1, -1, 2).expand(128, -1, -1)
    ws = g.mapping(z, torch.arange(128) % cfg.num_classes)
    for i, level in enumerate(g.synthesis.levels):
        warp, shift, _, _ = level.heads(ws[:, i])  # (B, 2, 2), (B, 1, 2)
        xs = torch.baddbmm(shift, xs, warp)  # x <- x M_i + b_i
    assert xs.std(dim=1).mean() > 0.5 * coordinate_grid(8).reshape(-1, 2).std(dim=0).mean()


def _generator_with_both_signs(**changes) -> Generator:
    """A tiny generator whose lifts g take both signs (the init's lift bias of 1 keeps
    them positive), so lrelu's negative slope is exercised too."""
    torch.manual_seed(0)
    g = Generator(dataclasses.replace(TINY, **changes), R)
    with torch.no_grad():
        for level in g.synthesis.levels:
            level.affine.bias.normal_()
    return g


def _render_plain(synthesis, ws, coords=None):
    """The synthesis through its levels' plain forward (the definition), with autograd."""
    synthesis.fast = False
    try:
        return synthesis(ws, coords)
    finally:
        synthesis.fast = True


@pytest.mark.parametrize("clamp", [256.0, 0.5])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_fast_render_equals_the_plain_definition(mode, clamp):
    """The default (fast) synthesis renders what PolyLevel.forward defines, level by level,
    with the same weights (clamp 0.5: the clamps are active)."""
    g = _generator_with_both_signs(clamp=clamp)
    z, c = latents(n=5)
    coords = torch.rand(7, 5, 2) * 1.5 - 0.25  # (7, 5, 2): not a square grid
    ws = g.mapping(z, c)
    expected = _render_plain(g.synthesis, ws, coords)
    scale = expected.abs().max().item()
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad}.get(mode, torch.inference_mode)
    with context():
        out = g.synthesis(ws, coords)
    assert out.shape == expected.shape == (5, 3, 7, 5)
    torch.testing.assert_close(out, expected, atol=1e-5 * scale, rtol=1e-4, check_dtype=True)


def test_default_render_never_runs_the_plain_levels(g, monkeypatch):
    """Synthesis.forward takes the fast path unless told otherwise: PolyLevel.forward unused."""

    def refuse(*args):
        raise AssertionError("PolyLevel.forward ran on the default path")

    monkeypatch.setattr(generator.PolyLevel, "forward", refuse)
    z, c = latents()
    assert g(z, c).shape == (4, 3, R, R)
    g.synthesis.fast = False
    with pytest.raises(AssertionError, match="PolyLevel.forward"):
        g(z, c)


def test_chunks_and_threads_do_not_change_the_images(g):
    """Inference in small chunks over several threads equals one whole-batch render."""
    z, c = latents(n=5)
    ws = g.mapping(z, c)
    whole = g.synthesis(ws)  # with autograd: one block
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # 24 rows: blocks of 1 sample x 24 pixels, 3 per sample, the last one shorter.
        g.synthesis.chunk_elements = 24 * TINY.hidden
        with torch.no_grad():
            chunked = g.synthesis(ws)
        assert torch.get_num_threads() == 2
        # 128 rows: blocks of 2 samples x 64 pixels, the last block a single sample.
        g.synthesis.chunk_elements = 128 * TINY.hidden
        with torch.no_grad():
            batched = g.synthesis(ws)
    finally:
        torch.set_num_threads(threads)
    scale = whole.abs().max().item()
    torch.testing.assert_close(chunked, whole.detach(), atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(batched, whole.detach(), atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("mixing", ["plain", "equalized"])
@pytest.mark.parametrize("clamp", [256.0, 0.5])
def test_fast_gradients_equal_the_plain_definition(clamp, mixing):
    """Every synthesis parameter's gradient through the fast path equals the one through
    the plain levels, also where the clamps are active (clamp 0.5)."""
    g = _generator_with_both_signs(clamp=clamp, mixing=mixing)
    z, c = latents(n=3)
    ws = g.mapping(z, c).detach()
    params = dict(g.synthesis.named_parameters())
    assert len(params) == 2 + 4 * TINY.levels + 2 * (TINY.levels - 1)
    weights = torch.randn(3, 3, R, R, generator=torch.Generator().manual_seed(2))
    expected = _render_plain(g.synthesis, ws)
    (expected * weights).sum().backward()
    want = {name: p.grad.clone() for name, p in params.items()}
    g.synthesis.zero_grad()
    out = g.synthesis(ws)
    (out * weights).sum().backward()
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, atol=1e-5 * scale, rtol=1e-4)
    for name, p in params.items():
        assert want[name].abs().max() > 0, name
        scale = want[name].abs().max().item()
        torch.testing.assert_close(p.grad, want[name], atol=1e-4 * scale, rtol=1e-3, msg=name)


def test_training_level_passes_gradcheck():
    """The hand-written backward of one level equals finite differences (float64, clamps active)."""
    gen = torch.Generator().manual_seed(3)
    B, P, C = 2, 5, 4

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, h, lift, weight, bias = rand(B, P, 3), rand(B * P, C), rand(B, 3, C), rand(C, C), rand(C)
    level = fast_synthesis._TrainingLevel.apply
    assert torch.autograd.gradcheck(lambda *t: level(*t, 1.5), (x, h, lift, weight, bias))
    first = (x, lift, weight, bias)  # level 0: no h
    assert torch.autograd.gradcheck(lambda *t: level(t[0], None, *t[1:], 1.5), first)
    out = level(x, h, lift, weight, bias, 1.5)
    assert (out.abs() == 1.5).any() and (out.abs() < 1.5).any()  # both sides of the clamp


def test_bf16_autocast_stays_close_to_float32(g):
    """Under bf16 autocast the render is float32 and within bf16 rounding of the fp32 one."""
    z, c = latents(n=2)
    with torch.no_grad():
        ref = g(z, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = g(z, c)
    assert out.dtype == torch.float32
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 5e-2


def test_exporting_the_same_generator_twice_gives_the_same_bytes(tmp_path):
    """DVC hashes run/generator.pt: the same weights and meta give the same bytes."""
    import hashlib

    from polyinr.model.generator import save_generator

    g = Generator(TINY_GENERATOR, 8)
    for name in ("a", "b"):
        save_generator(g, tmp_path / name / "generator.pt", {"cur_nimg": 8})
    a, b = ((tmp_path / n / "generator.pt").read_bytes() for n in ("a", "b"))
    assert hashlib.md5(a).digest() == hashlib.md5(b).digest()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_samples_differ_by_latent_class_and_pixel_at_init(seed):
    """At the demo's width, a freshly built G already draws images that depend on z, on the
    class and on the pixel, with no sample exploding: training does not start from one flat
    colour (the default nn.Linear init of the mixing layers gave spreads of 0.001)."""
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    cfg = load(params, ["generator.num_classes=10"]).generator
    torch.manual_seed(seed)
    g = Generator(cfg, 16).eval()
    z, c = generator.seed_latents(range(200), cfg.z_dim), torch.arange(200) % 10
    with torch.no_grad():
        x = g(z, c)  # (200, 3, 16, 16)
    class_means = torch.stack([x[c == k].mean(0) for k in range(10)])
    assert x.std(0).mean() > 0.05  # across latents
    assert x.std((2, 3)).mean() > 0.03  # across pixels of one image
    assert class_means.std(0).mean() > 0.02  # across classes
    assert x.square().mean((1, 2, 3)).sqrt().max() < 10  # no exploding sample
