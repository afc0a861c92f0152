"""Tests for polyinr.model.sampling: exact chunked and super-resolved rendering, mixing,
interpolation,
views and the ADM npz writer."""

import dataclasses

import numpy as np
import pytest
import torch
from tiny import TINY_GENERATOR

from polyinr.model import sampling
from polyinr.model.generator import Generator, coordinate_grid

pytestmark = pytest.mark.usefixtures("single_thread")

R = 49  # 2401 pixels: chunks of 1024 or 1500 split an image unevenly
TINY10 = dataclasses.replace(TINY_GENERATOR, levels=10)


@pytest.fixture(scope="module")
def g():
    torch.manual_seed(0)
    g = Generator(TINY10, R).eval().requires_grad_(False)
    g.mapping.w_avg.normal_()  # a non-trivial class average, so psi matters
    return g


def test_chunked_render_equals_full_render_bit_for_bit(g):
    """Rendering in chunks of pixels (uneven last chunk) equals one full synthesis pass."""
    ws = sampling.mapping(g, [0, 1, 2], [5, 6, 7], psi=0.7)
    full = torch.cat([g.synthesis(ws[i : i + 1]) for i in range(len(ws))])  # (3, 3, R, R)
    for chunk in (sampling.MIN_CHUNK, 1500, R * R, 10**6):
        assert torch.equal(sampling.render(g, ws, chunk=chunk), full), chunk


def test_render_refuses_tiny_chunks(g):
    """A chunk under MIN_CHUNK pixels is an error, not a silent slowdown."""
    ws = sampling.mapping(g, [0], [0], psi=1.0)
    with pytest.raises(ValueError, match="chunk"):
        sampling.render(g, ws, chunk=sampling.MIN_CHUNK - 1)


def test_2x_grid_at_even_coordinates_equals_1x_render(g):
    """The grid of 2(R-1)+1 pixels holds the trained grid at even indices: same pixels."""
    ws = sampling.mapping(g, [0, 2], [1, 2], psi=1.0)
    one = sampling.render(g, ws, sampling.view_grid(R), chunk=sampling.MIN_CHUNK)
    two = sampling.render(g, ws, sampling.view_grid(2 * (R - 1) + 1), chunk=sampling.MIN_CHUNK)
    assert two.shape[-2:] == (2 * R - 1, 2 * R - 1)
    assert torch.equal(two[..., ::2, ::2], one)


def test_full_view_is_the_training_grid_and_boxes_map_corners():
    """view_grid of the frame is coordinate_grid; a box puts its corners at the image's."""
    assert torch.equal(sampling.view_grid(17), coordinate_grid(17))
    v = sampling.view_grid(5, 9, box=(-0.5, 0.25, 1.5, 0.75))
    assert v.shape == (5, 9, 2)
    assert v[0, 0].tolist() == [-0.5, 0.25] and v[-1, -1].tolist() == [1.5, 0.75]
    assert torch.allclose(v[2, 4], torch.tensor([0.5, 0.5]))


def test_mapping_of_a_sample_does_not_depend_on_the_request(g):
    """A (class, seed) gets the same w alone or among others, and psi pulls to w_avg[c]."""
    many = sampling.mapping(g, [0, 1, 2, 1], [3, 4, 5, 6], psi=0.5)
    assert torch.equal(sampling.mapping(g, [1], [4], psi=0.5)[0], many[1])
    full = sampling.mapping(g, [1], [4], psi=1.0)[0]
    assert torch.allclose(many[1], torch.lerp(g.mapping.w_avg[1], full, 0.5), atol=1e-6)
    with pytest.raises(ValueError, match="class 3 requested, but the generator has 3 classes"):
        sampling.mapping(g, [3], [0], psi=1.0)


def test_mixing_all_levels_gives_the_source_and_no_levels_the_target(g):
    """mix [0, 10) reproduces the source A, [0, 0) the target B, pixel for pixel."""
    ws_a = sampling.mapping(g, [0, 1], [10, 11], psi=1.0)
    ws_b = sampling.mapping(g, [2, 2, 0], [20, 21, 22], psi=1.0)
    coords = sampling.view_grid(12)
    a = sampling.render(g, ws_a, coords)
    b = sampling.render(g, ws_b, coords)
    every = sampling.render(g, sampling.mix(ws_a, ws_b, 0, 10).flatten(0, 1), coords)
    none = sampling.render(g, sampling.mix(ws_a, ws_b, 0, 0).flatten(0, 1), coords)
    assert torch.equal(every.view(2, 3, *a.shape[1:]), a[:, None].expand(2, 3, *a.shape[1:]))
    assert torch.equal(none.view(2, 3, *b.shape[1:]), b[None].expand(2, 3, *b.shape[1:]))


def test_shape_mixing_changes_only_levels_0_to_4(g):
    """The shape preset copies A's w at levels 0-4 and keeps B's at 5-9 (style the reverse)."""
    ws_a = sampling.mapping(g, [0], [1], psi=1.0)
    ws_b = sampling.mapping(g, [1], [2], psi=1.0)
    start, stop = sampling.mix_levels("shape", g.cfg.levels)
    mixed = sampling.mix(ws_a, ws_b, start, stop)[0, 0]  # (L, D)
    assert torch.equal(mixed[:5], ws_a[0, :5]) and torch.equal(mixed[5:], ws_b[0, 5:])
    assert sampling.mix_levels("style", 10) == (5, 10)
    assert sampling.mix_levels("2:7", 10) == (2, 7)
    for bad in ("7:2", "0:11", "eyes"):
        with pytest.raises(ValueError):
            sampling.mix_levels(bad, 10)


def test_interpolation_endpoints_equal_the_endpoint_samples(g):
    """Frames 0, steps and the last of a walk through 3 keys are the key samples themselves."""
    steps = 4
    keys = sampling.mapping(g, [0, 1, 1], [3, 3, 8], psi=0.8)
    ws = sampling.interpolate(keys, steps)
    assert ws.shape[0] == 2 * steps + 1
    coords = sampling.view_grid(10)
    frames = sampling.render(g, ws, coords)
    samples = sampling.render(g, keys, coords)
    assert torch.equal(frames[[0, steps, 2 * steps]], samples)
    assert not torch.equal(frames[1], frames[0])  # the frames in between do move


def test_npz_writer_writes_the_adm_format(tmp_path):
    """arr_0 is uint8 (N, H, W, 3) in order, arr_1 the labels; a short write is an error."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    w = sampling.NpzWriter(tmp_path / "s.npz", 5, 6, 7)
    w.write(images[:2], [1, 2])
    w.write(images[2:], [0, 0, 3])
    w.close()
    data = np.load(tmp_path / "s.npz")
    assert data["arr_0"].dtype == np.uint8 and np.array_equal(data["arr_0"], images)
    assert data["arr_1"].tolist() == [1, 2, 0, 0, 3]
    short = sampling.NpzWriter(tmp_path / "short.npz", 5, 6, 7)
    short.write(images[:1], [0])
    with pytest.raises(ValueError, match="1 of 5"):
        short.close()


def test_tile_and_upscale_place_pixels():
    """tile puts image i at row i // cols; upscale repeats pixels by whole factors."""
    images = np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1).repeat(3, axis=3)
    grid = sampling.tile(images, rows=2)
    assert grid[:, :, 0].tolist() == [[0, 1], [2, 3]]
    assert sampling.upscale(images, (3, 2)).shape == (4, 3, 2, 3)
    with pytest.raises(ValueError):
        sampling.upscale(np.zeros((1, 2, 2, 3), np.uint8), (3, 3))


def test_pairs_broadcast_one_class_or_one_seed_and_refuse_unequal_counts():
    """One class goes with every seed (and one seed with every class); 2 and 3 do not pair."""
    assert sampling.pairs([4], [1, 2]) == [(4, 1), (4, 2)]
    assert sampling.pairs([0, 1], [7]) == [(0, 7), (1, 7)]
    assert sampling.pairs([0, 1], [5, 6]) == [(0, 5), (1, 6)]
    with pytest.raises(ValueError, match="2 classes and 3 seeds"):
        sampling.pairs([0, 1], [1, 2, 3])


def test_a_grid_has_a_row_per_class_or_rows_of_eight_random_classes(g):
    """Classes x seeds pair every class with every seed, a row each; without classes each
    seed draws its class (random_classes) and the grid has rows of 8."""
    assert sampling.grid_samples(g, [0, 2], [5, 6, 7]) == ([0, 0, 0, 2, 2, 2], [5, 6, 7] * 2, 2)
    classes, seeds, rows = sampling.grid_samples(g, None, range(10))
    assert classes == sampling.random_classes(range(10), 3) and seeds == list(range(10))
    assert rows == 2


def test_a_walk_passes_through_its_keys(g):
    """Frames 0 and `steps` of a walk are the key samples themselves; one key is refused."""
    keys, size = [(0, 3), (1, 3)], (6, 5)
    frames = sampling.walk(g, keys, psi=0.8, steps=4, size=size)
    alone = sampling.render_images(g, sampling.mapping(g, [0, 1], [3, 3], psi=0.8), size)
    assert frames.shape == (5, 6, 5, 3)
    assert np.array_equal(frames[[0, 4]], alone)
    with pytest.raises(ValueError, match="two keys"):
        sampling.walk(g, keys[:1], psi=0.8, steps=4)


def test_random_classes_depend_on_the_seed_alone():
    """--classes random gives each seed the same class whatever the other seeds are."""
    assert sampling.random_classes([5, 9], 1000)[1] == sampling.random_classes([9], 1000)[0]
    drawn = sampling.random_classes(range(2000), 4)
    assert set(drawn) == {0, 1, 2, 3}
