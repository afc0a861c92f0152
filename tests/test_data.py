"""Tests for polyinr.data: demo data, ImageNet-folder -> FFCV conversion, loaders."""

import dataclasses
import io
import json
import multiprocessing as mp
import os
import random
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyinr import data
from polyinr.core.config import DataConfig
from polyinr.data import convert, sources

CLASSES, PER_CLASS, SIZE = 4, 8, 16


def config(source, out_dir, **overrides) -> DataConfig:
    base = DataConfig(
        source=str(source),
        out_dir=str(out_dir),
        encoding="raw",
        jpeg_quality=90,
        strict=False,
        workers=2,
        scan_cache=None,
        demo_kind="shapes",
        demo_classes=CLASSES,
        demo_per_class=PER_CLASS,
        demo_size=SIZE,
        demo_seed=0,
    )
    return dataclasses.replace(base, **overrides)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def odd_source(root: Path) -> tuple[list[str], list[str]]:
    """Two demo classes plus odd-but-valid and broken files; returns (odd, bad) paths."""
    data.make_demo_dataset(root, classes=2, per_class=2, size=SIZE, seed=1)
    folder = root / "train" / "n00000000"
    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(folder / "gray.JPEG")
    # CMYK of one flat colour, large enough that the decoder scales it down while decoding.
    Image.new("RGB", (96, 64), (200, 40, 90)).convert("CMYK").save(folder / "cmyk.JPEG")
    Image.fromarray(rgb).convert("P").save(folder / "png.JPEG", format="PNG")
    # Wide image: red | green | blue thirds; the centre crop must keep only the green.
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, :40, 0], wide[:, 40:80, 1], wide[:, 80:, 2] = 255, 255, 255
    Image.fromarray(wide).save(root / "train" / "n00000001" / "wide.png")
    (folder / "empty.JPEG").write_bytes(b"")
    big = np.random.default_rng(1).integers(0, 256, (192, 256, 3), dtype=np.uint8)
    full = io.BytesIO()
    Image.fromarray(big).save(full, format="JPEG")  # decoded at 1/8 scale for 8 px
    (folder / "truncated.JPEG").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (folder / "text.JPEG").write_text("not an image\n")
    odd = [str(folder / f"{n}.JPEG") for n in ("gray", "cmyk", "png")]
    bad = [str(folder / f"{n}.JPEG") for n in ("empty", "truncated", "text")]
    return odd, bad


def make_ilsvrc_tar(root: Path, archive: Path, order=sorted) -> None:
    """Pack root/train/<wnid>/* as ILSVRC2012_img_train.tar does: a tar of <wnid>.tar files."""
    with tarfile.open(archive, "w") as outer:
        for folder in order((root / "train").iterdir()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for path in sorted(folder.iterdir(), reverse=True):  # any member order
                    tar.add(path, arcname=path.name)
            info = tarfile.TarInfo(f"{folder.name}.tar")
            info.size = len(inner.getvalue())
            inner.seek(0)
            outer.addfile(info, inner)


def all_images(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(data.read_all(path, batch_size=4, workers=1))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_demo_dataset_is_deterministic_with_sorted_class_folders(tmp_path):
    """Same seed -> identical bytes (even when overwriting); another seed -> other bytes."""
    n = data.make_demo_dataset(tmp_path / "a", CLASSES, 3, SIZE, seed=0)
    first = tree_bytes(tmp_path / "a")
    assert n == len(first) == CLASSES * 3
    (tmp_path / "a" / "train" / "n00000000" / "stale.JPEG").write_bytes(b"x")
    data.make_demo_dataset(tmp_path / "a", CLASSES, 3, SIZE, seed=0)
    assert tree_bytes(tmp_path / "a") == first
    data.make_demo_dataset(tmp_path / "b", CLASSES, 3, SIZE, seed=1)
    assert tree_bytes(tmp_path / "b").keys() == first.keys()
    assert tree_bytes(tmp_path / "b") != first
    source = data.scan_source(tmp_path / "a")
    assert source.classes == [f"n{c:08d}" for c in range(CLASSES)]
    assert source.labels.tolist() == sorted(source.labels.tolist())


def test_demo_classes_differ_in_shape_not_colour(tmp_path):
    """Colours are random per image (class mean colours nearly equal) while the shapes
    differ: a disc's centre is foreground, a ring's is background."""
    data.make_demo_dataset(tmp_path, 2, 24, SIZE, seed=0)
    source = data.scan_source(tmp_path)
    images = np.stack([np.asarray(Image.open(source.path(i)), np.float64) for i in range(48)])
    labels = np.asarray(source.labels)
    means = [images[labels == k].mean((0, 1, 2)) for k in (0, 1)]
    assert np.linalg.norm(means[0] - means[1]) < 30
    assert images[labels == 0].mean((1, 2)).std(0).mean() > 10  # colours vary within a class
    c = SIZE // 2
    centre = images[:, c - 1 : c + 1, c - 1 : c + 1].max(-1).mean((1, 2))  # brightness
    assert centre[labels == 0].mean() > centre[labels == 1].mean() + 60


def test_scan_source_explains_the_expected_layout(tmp_path):
    """A missing or empty train folder raises DataError naming the expected layout."""
    with pytest.raises(data.DataError, match="<wnid>"):
        data.scan_source(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(data.DataError, match="no class folders"):
        data.scan_source(tmp_path)
    with pytest.raises(data.DataError, match="polyinr prepare"):
        data.read_manifest(tmp_path, 32)


def test_prepare_converts_odd_modes_and_skips_unreadable_files(tmp_path, capsys):
    """Grayscale/CMYK/PNG-as-JPEG are written; empty/truncated/text files are listed."""
    odd, bad = odd_source(tmp_path / "src")
    cfg = config(tmp_path / "src", tmp_path / "out")
    [manifest] = data.prepare(cfg, [8], progress=False)
    assert manifest == data.read_manifest(tmp_path / "out", 8)
    assert manifest["written"] == 4 + len(odd) + 1
    assert sorted(s["path"] for s in manifest["skipped"]) == sorted(bad)
    kinds = {Path(s["path"]).stem: s["reason"].split(":")[0] for s in manifest["skipped"]}
    assert kinds == {"empty": "empty", "truncated": "corrupt", "text": "not an image"}
    assert "truncated" in next(s["reason"] for s in manifest["skipped"] if "trunc" in s["path"])
    assert manifest["classes"] == ["n00000000", "n00000001"]
    assert manifest["per_class"] == [2 + len(odd), 3]
    err = capsys.readouterr().err
    assert "skipped 3 of 11 source images" in err and len(err.strip().splitlines()) == 1

    batches = list(data.read_all(data.beton_path(tmp_path / "out", 8), batch_size=4, workers=1))
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.shape == (manifest["written"], 3, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == [0] * 5 + [1] * 3
    # wide.png sorts last in class 1: its centre crop is green without red or blue bands.
    centre = images[-1, :, 2:6, 2:6].float()
    assert centre[1].min() > 200 and centre[[0, 2]].max() < 40
    # Class 0 sorts cmyk, gray, ...: CMYK keeps its colour, grayscale has equal channels.
    cmyk = images[0].float().mean((1, 2))
    assert torch.allclose(cmyk, torch.tensor([200.0, 40.0, 90.0]), atol=12), cmyk
    assert torch.equal(images[1, 0], images[1, 1]) and torch.equal(images[1, 1], images[1, 2])


def test_strict_prepare_raises_naming_the_bad_files(tmp_path):
    """With strict=True, unreadable files raise DataError naming each, and nothing is written."""
    _, bad = odd_source(tmp_path / "src")
    with pytest.raises(data.DataError) as error:
        data.prepare(config(tmp_path / "src", tmp_path / "out", strict=True), [8], progress=False)
    for path in bad:
        assert path in str(error.value)
    assert not data.beton_path(tmp_path / "out", 8).exists()
    assert not data.manifest_path(tmp_path / "out", 8).exists()


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A failure inside ffcv's writer workers raises, keeps the old file and leaves no temp."""
    data.make_demo_dataset(tmp_path / "src", 2, 3, SIZE, seed=0)
    out = tmp_path / "out"
    out.mkdir()
    data.beton_path(out, 8).write_bytes(b"previous")

    def broken(image, resolution):
        raise OSError("disk on fire")

    monkeypatch.setattr(convert, "_square", broken)  # writer processes are forked: they see it
    with pytest.raises(data.DataError, match="disk on fire"):
        data.prepare(config(tmp_path / "src", out), [8], progress=False)
    assert data.beton_path(out, 8).read_bytes() == b"previous"
    assert sorted(p.name for p in out.iterdir()) == ["train_8.beton"]


def test_ilsvrc_tar_gives_the_same_ffcv_content_as_the_folder(tmp_path):
    """The official tar-of-class-tars, read in place, converts to the same images, labels
    (sorted wnids, whatever the archive's order), skips and fingerprint as the folder."""
    odd_source(tmp_path / "src")
    archive = tmp_path / "ILSVRC2012_img_train.tar"
    make_ilsvrc_tar(tmp_path / "src", archive, order=lambda d: sorted(d, reverse=True))
    folder_cfg = config(tmp_path / "src", tmp_path / "a", encoding="jpg")
    tar_cfg = config(archive, tmp_path / "b", encoding="jpg")
    [a] = data.prepare(folder_cfg, [8], progress=False)
    [b] = data.prepare(tar_cfg, [8], progress=False)
    assert (a["source_kind"], b["source_kind"]) == ("folder", "tar")
    for key in ("written", "classes", "per_class", "source_images", "source_fingerprint"):
        assert a[key] == b[key], key
    assert a["written"] == 8 and b["classes"] == ["n00000000", "n00000001"]
    names = [(Path(s["path"]).name, s["reason"]) for s in b["skipped"]]
    assert names == [(Path(s["path"]).name, s["reason"]) for s in a["skipped"]]
    assert {n for n, _ in names} == {"empty.JPEG", "truncated.JPEG", "text.JPEG"}
    assert all(s["path"].startswith(f"{archive}/n00000000.tar/") for s in b["skipped"])
    xa, ya = all_images(data.beton_path(tmp_path / "a", 8))
    xb, yb = all_images(data.beton_path(tmp_path / "b", 8))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_broken_class_tar_and_stray_members_are_listed_not_fatal(tmp_path, capsys):
    """A class tar that is not a tar and a non-tar member are skipped with reasons; the rest
    converts and the broken class keeps its label (an empty class)."""
    data.make_demo_dataset(tmp_path / "src", 2, 2, SIZE, seed=0)
    archive = tmp_path / "train.tar"
    make_ilsvrc_tar(tmp_path / "src", archive)
    with tarfile.open(archive, "a") as outer:
        for name, payload in (("n00000002.tar", b"garbage" * 100), ("README.txt", b"hi")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            outer.addfile(info, io.BytesIO(payload))
    [manifest] = data.prepare(config(archive, tmp_path / "out"), [8], progress=False)
    assert manifest["classes"] == ["n00000000", "n00000001", "n00000002"]
    assert manifest["per_class"] == [2, 2, 0]
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"n00000002.tar", "README.txt"}
    assert "ReadError" in reasons["n00000002.tar"]
    assert "skipped 2 of" in capsys.readouterr().err
    with pytest.raises(data.DataError, match="not a readable tar"):
        data.scan_source(tmp_path / "src" / "train" / "n00000000" / "n00000000_0.JPEG")


def test_epoch_order_shares_are_disjoint_complete_and_seeded():
    """Each epoch's shares over 1-4 ranks are disjoint and cover the file; the order depends
    on (seed, epoch) only, and differs between epochs and seeds."""
    n = 24
    for world in (1, 2, 3, 4):
        shares = [data.EpochOrder(n, 2, 7, r, world, True).share(5) for r in range(world)]
        assert sorted(np.concatenate(shares).tolist()) == list(range(n))
        assert len({len(s) for s in shares}) == 1
    order = data.EpochOrder(n, 4, 7, 0, 1, True)
    again = data.EpochOrder(n, 4, 7, 0, 1, True)
    assert np.array_equal(order.share(3), again.share(3))
    assert np.array_equal(order.flips(3), again.flips(3))
    assert not np.array_equal(order.share(3), order.share(4))
    assert not np.array_equal(order.share(3), data.EpochOrder(n, 4, 8, 0, 1, True).share(3))
    assert len(data.EpochOrder(10, 4, 0, 0, 1, True).share(0)) == 8  # whole batches only


@pytest.fixture(scope="module")
def demo_beton(tmp_path_factory) -> tuple[Path, dict]:
    """One small prepared demo file shared by the loader tests (numba compiles once)."""
    root = tmp_path_factory.mktemp("demo")
    data.make_demo_dataset(root / "src", CLASSES, PER_CLASS, SIZE, seed=0)
    cfg = config(root / "src", root / "out", encoding="jpg")
    [manifest] = data.prepare(cfg, [SIZE], progress=False)
    return data.beton_path(root / "out", SIZE), manifest


def test_loader_yields_scaled_images_and_labels_every_epoch(demo_beton):
    """Batches are float (B, 3, R, R) in [-1, 1] with int64 labels, a new order each epoch."""
    path, manifest = demo_beton
    loader = data.make_loader(path, batch_size=8, seed=0, device=torch.device("cpu"))
    assert len(loader) == CLASSES * PER_CLASS // 8
    epochs = []
    for _ in range(2):
        labels = []
        for images, y in loader:
            assert images.shape == (8, 3, SIZE, SIZE) and images.dtype == torch.float32
            assert y.shape == (8,) and y.dtype == torch.int64
            assert images.min() >= -1 and images.max() <= 1
            assert images.min() < -0.5 and images.max() > 0.5  # uses the whole range
            labels += y.tolist()
        assert np.bincount(labels).tolist() == manifest["per_class"]
        epochs.append(labels)
    assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])


def test_read_all_matches_the_loader_without_augmentation(demo_beton):
    """read_all gives every image in file order; the unmirrored loader gives the same pixels."""
    path, manifest = demo_beton
    batches = list(data.read_all(path, batch_size=5))
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert [len(y) for _, y in batches][-1] == manifest["written"] % 5
    assert labels.tolist() == sorted(labels.tolist())
    assert np.bincount(labels.numpy()).tolist() == manifest["per_class"]
    # Class 0 of the demo data is a disc (its centre is foreground), class 1 a ring.
    c = images.shape[-1] // 2
    centre = images[:, :, c - 1 : c + 1, c - 1 : c + 1].float().amax(1).mean((1, 2))
    assert centre[labels == 0].mean() > centre[labels == 1].mean() + 60

    loader = data.make_loader(path, 32, seed=3, device="cpu", mirror=False, drop_last=False)
    got = {}
    for x, _ in loader:
        for image in x:
            got[image.numpy().tobytes()] = True
    expected = images.float().div(127.5).sub(1)
    assert all(image.numpy().tobytes() in got for image in expected)


def _rank_order(rank: int, path: str, store: str, queue) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2
    )
    loader = data.make_loader(path, 4, seed=0, device="cpu", distributed=True)
    queue.put((rank, sorted(loader.ffcv.first_traversal_order.tolist()), len(loader)))
    torch.distributed.destroy_process_group()


def test_distributed_ranks_get_disjoint_shares(demo_beton, tmp_path):
    """Two gloo ranks each get half of the file, together all of it, with no overlap."""
    path, manifest = demo_beton
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_order, args=(r, str(path), str(tmp_path / "store"), queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    results = dict((rank, (order, n)) for rank, order, n in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    a, b = results[0][0], results[1][0]
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(manifest["written"]))
    assert results[0][1] == results[1][1] == manifest["written"] // 2 // 4


def test_resume_mid_epoch_yields_the_remaining_batches_of_an_uninterrupted_run(demo_beton):
    """A fresh loader sought to (epoch e, batch k) serves exactly the batches, flips included,
    that an uninterrupted loader serves from there on, into the next epoch."""
    path, _ = demo_beton
    full = data.make_loader(path, 4, seed=5, device="cpu", workers=1)
    per_epoch = len(full)
    assert per_epoch == CLASSES * PER_CLASS // 4
    reference = [b for _ in range(3) for b in full]
    assert full.position == (3, 0)

    resumed = data.make_loader(path, 4, seed=5, device="cpu", workers=1)
    resumed.seek(1, 3)
    got = list(resumed) + list(resumed)
    assert resumed.position == (3, 0)
    expected = reference[per_epoch + 3 :]
    assert len(got) == len(expected) == 2 * per_epoch - 3
    for (x, y), (xe, ye) in zip(got, expected, strict=True):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    # Some images were mirrored: the unmirrored loader differs on the same order.
    plain = data.make_loader(path, 4, seed=5, device="cpu", workers=1, mirror=False)
    unflipped = [x for x, _ in plain]
    assert any(not torch.equal(a, b[0]) for a, b in zip(unflipped, reference, strict=False))


def test_position_counts_the_batches_served(demo_beton):
    """Stopping after k batches leaves position (epoch, k); a finished epoch moves on."""
    path, _ = demo_beton
    loader = data.make_loader(path, 8, seed=0, device="cpu", workers=1)
    assert loader.position == (0, 0)
    for k, _ in enumerate(loader, 1):
        if k == 2:
            break
    assert loader.position == (0, 2)
    rest = list(loader)
    assert len(rest) == len(loader) - 2 and loader.position == (1, 0)
    with pytest.raises(ValueError, match="per epoch"):
        loader.seek(0, len(loader) + 1)


def test_prepare_command_warns_in_one_line_or_fails_when_strict(tmp_path, capsys):
    """`polyinr prepare` exits 0 with one warning line on bad files; 2 with data.strict=true."""
    from polyinr.commands import cli

    odd_source(tmp_path / "src")
    args = [
        "prepare",
        "--quiet",
        "--params",
        str(Path(__file__).resolve().parents[1] / "params.yaml"),
        f"data.source={tmp_path / 'src'}",
        f"data.out_dir={tmp_path / 'out'}",
        "train.stages=[{resolution: 8, kimg: 1.0}]",
    ]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("warning: skipped 3 of 11")
    assert "8 images, 3 skipped" in out
    assert cli.main([*args, "data.strict=true", f"data.out_dir={tmp_path / 'strict'}"]) == 2
    assert "data.strict=true" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "train_8.beton").exists()


def test_prepare_command_converts_only_the_named_resolution(tmp_path, capsys):
    """`polyinr prepare --resolution R` (DVC's prepare@i) writes R's file and no other."""
    from polyinr.commands import cli

    data.make_demo_dataset(tmp_path / "src", 2, 4, 16, 0)
    args = [
        "prepare",
        "--quiet",
        "--params",
        str(Path(__file__).resolve().parents[1] / "params.yaml"),
        "--resolution",
        "12",
        f"data.source={tmp_path / 'src'}",
        f"data.out_dir={tmp_path / 'out'}",
        "train.stages=[{resolution: 8, kimg: 1.0}, {resolution: 12, kimg: 1.0}]",
    ]
    assert cli.main(args) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "train_12.beton",
        "train_12.json",
    ]
    assert "8 images, 0 skipped" in capsys.readouterr().out


def test_tar_listing_is_scanned_once_and_rescanned_when_the_archive_changes(
    tmp_path, monkeypatch, capsys
):
    """data.scan_cache keeps a tar's listing: the next scan reads it back (equal Source), a
    changed archive (size or mtime) or an unreadable cache file is scanned again."""
    data.make_demo_dataset(tmp_path / "src", 2, 3, SIZE, seed=0)
    archive = tmp_path / "train.tar"
    make_ilsvrc_tar(tmp_path / "src", archive)
    cache = tmp_path / "cache"
    scans = []
    original = sources._scan_tar
    monkeypatch.setattr(sources, "_scan_tar", lambda *a: scans.append(1) or original(*a))

    first = data.scan_source(archive, cache_dir=cache)
    again = data.scan_source(archive, cache_dir=cache)
    assert len(scans) == 1 and len(list(cache.iterdir())) == 1
    for field in ("location", "kind", "classes", "prefixes", "names", "unlisted"):
        assert getattr(again, field) == getattr(first, field), field
    for field in ("labels", "sizes", "offsets"):
        assert np.array_equal(getattr(again, field), getattr(first, field)), field
    assert again.read(4) == first.read(4) and again.fingerprint() == first.fingerprint()

    os.utime(archive, ns=(0, 10**9))  # the archive changed: a new key
    data.scan_source(archive, cache_dir=cache)
    assert len(scans) == 2
    for stale in cache.iterdir():
        stale.write_bytes(b"not an npz")
    data.scan_source(archive, cache_dir=cache)
    assert len(scans) == 3 and "rescanning" in capsys.readouterr().err
    data.scan_source(archive)  # no cache_dir: always scans
    assert len(scans) == 4


def test_manifests_of_identical_data_are_identical_whatever_the_workers_or_timing(tmp_path):
    """A manifest holds content only (DVC hashes it): no timings, no worker count."""
    data.make_demo_dataset(tmp_path / "src", 2, 3, SIZE, seed=0)
    data.prepare(config(tmp_path / "src", tmp_path / "a", workers=1), [8], progress=False)
    data.prepare(config(tmp_path / "src", tmp_path / "b", workers=2), [8], progress=False)
    a, b = (data.manifest_path(tmp_path / d, 8).read_bytes() for d in "ab")
    assert a == b
    assert not {"seconds", "images_per_second", "scan_seconds", "workers"} & set(json.loads(a))


def test_the_ffcv_file_is_the_same_bytes_whatever_the_worker_count(tmp_path, monkeypatch):
    """DVC hashes the FFCV file: 1 worker, 2 workers and a rerun give the same bytes, even when
    images decode at uneven speeds (pages go to the file in index order), so data.workers
    changes neither the file nor the weights trained on it."""
    data.make_demo_dataset(tmp_path / "src", 4, 16, SIZE, seed=0)
    square = convert._square

    def uneven(image, resolution):  # forked decoders see it: finishing order gets scrambled
        time.sleep(random.random() * 0.02)
        return square(image, resolution)

    monkeypatch.setattr(convert, "_square", uneven)
    for out, workers in (("a", 1), ("b", 2), ("c", 2)):
        cfg = config(tmp_path / "src", tmp_path / out, workers=workers, encoding="jpg")
        data.prepare(cfg, [8], progress=False)
    a, b, c = (data.beton_path(tmp_path / d, 8).read_bytes() for d in "abc")
    assert a == b == c


def test_conversion_rate_does_not_count_the_ffcv_import(tmp_path, monkeypatch, capsys):
    """The logged img/s is the conversion's: importing ffcv (seconds, once) is left out."""
    import builtins
    import re
    import time

    data.make_demo_dataset(tmp_path / "src", 2, 3, SIZE, seed=0)
    offset, real_clock, real_import = [0.0], time.perf_counter, builtins.__import__

    def slow_import(name, *args, **kwargs):
        if name.startswith("ffcv"):
            offset[0] += 100.0  # what a cold `import ffcv` costs, on a fake clock
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])
    monkeypatch.setattr(builtins, "__import__", slow_import)
    data.prepare(config(tmp_path / "src", tmp_path / "out", workers=1), [8], progress=True)
    monkeypatch.undo()
    seconds = re.search(r"train_8\.beton: 6 images in ([\d.]+) s", capsys.readouterr().err)
    assert seconds and float(seconds.group(1)) < 50


def test_prepared_data_that_disagree_with_the_config_or_the_file_are_refused(demo_beton, tmp_path):
    """check_prepared names both values: the class count, the resolution, the image count."""
    beton, manifest = demo_beton
    assert data.check_prepared(beton.parent, SIZE, CLASSES) == manifest
    assert data.check_prepared(beton.parent, SIZE, None) == manifest  # unconditional
    with pytest.raises(data.DataError, match=f"num_classes=1000 but .* lists {CLASSES} classes"):
        data.check_prepared(beton.parent, SIZE, 1000)
    out = tmp_path / "out"
    out.mkdir()
    (out / beton.name).write_bytes(beton.read_bytes())
    data.manifest_path(out, SIZE).write_text(json.dumps(manifest | {"written": 5}))
    with pytest.raises(data.DataError, match=f"holds {CLASSES * PER_CLASS} images .* says 5"):
        data.check_prepared(out, SIZE, CLASSES)
    (out / "train_8.beton").write_bytes(beton.read_bytes())  # a 16 px file under the 8 px name
    data.manifest_path(out, 8).write_text(json.dumps(manifest | {"resolution": 8}))
    with pytest.raises(data.DataError, match="16x16 px .* of 8 px"):
        data.check_prepared(out, 8, CLASSES)
    with pytest.raises(data.DataError, match="run `polyinr prepare` first"):
        data.check_prepared(out, 32, CLASSES)


def test_non_utf8_file_name_is_skipped_by_name_in_folder_and_tar(tmp_path):
    """A non-UTF-8 name is skipped and named (folder, tar); no .beton lacks its manifest."""
    data.make_demo_dataset(tmp_path / "src", 2, 2, SIZE, seed=0)
    folder = tmp_path / "src" / "train" / "n00000000"
    good = (folder / "n00000000_0.JPEG").read_bytes()
    (Path(os.fsdecode(bytes(folder) + b"/caf\xe9.JPEG"))).write_bytes(good)
    archive = tmp_path / "train.tar"
    make_ilsvrc_tar(tmp_path / "src", archive)
    for source, out in ((tmp_path / "src", tmp_path / "a"), (archive, tmp_path / "b")):
        [manifest] = data.prepare(config(source, out), [8], progress=False)
        assert manifest["written"] == 4
        [skipped] = manifest["skipped"]
        assert skipped["path"].endswith("n00000000/caf\\xe9.JPEG") or skipped["path"].endswith(
            "n00000000.tar/caf\\xe9.JPEG"
        )
        assert "not valid UTF-8" in skipped["reason"]
        assert data.beton_path(out, 8).is_file() and data.manifest_path(out, 8).is_file()
    with pytest.raises(data.DataError, match=r"caf\\xe9.JPEG: unreadable: the name is not"):
        data.prepare(config(archive, tmp_path / "c", strict=True), [8], progress=False)
    assert not (tmp_path / "c" / "train_8.beton").exists()


def test_dangling_symlink_is_listed_as_skipped_and_fails_strict(tmp_path):
    """A dangling symlink is listed as skipped with its target; data.strict=true fails on it."""
    data.make_demo_dataset(tmp_path / "src", 2, 2, SIZE, seed=0)
    link = tmp_path / "src" / "train" / "n00000001" / "gone.JPEG"
    link.symlink_to(tmp_path / "nowhere.JPEG")
    [manifest] = data.prepare(config(tmp_path / "src", tmp_path / "out"), [8], progress=False)
    assert manifest["written"] == 4
    assert manifest["skipped"] == [
        {"path": str(link), "reason": f"unreadable: dangling symlink to {tmp_path}/nowhere.JPEG"}
    ]
    with pytest.raises(data.DataError, match="gone.JPEG: unreadable: dangling symlink"):
        data.prepare(config(tmp_path / "src", tmp_path / "s", strict=True), [8], progress=False)


def test_truncated_class_tar_reports_the_images_written_and_the_cut(tmp_path):
    """A class tar cut in image 8 of 10: 7 written, 1 corrupt, its entry says where it ends."""
    data.make_demo_dataset(tmp_path / "src", 2, 10, SIZE, seed=0)
    archive = tmp_path / "train.tar"
    with tarfile.open(archive, "w") as outer:
        for folder in sorted((tmp_path / "src" / "train").iterdir()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for path in sorted(folder.iterdir()):
                    tar.add(path, arcname=path.name)
            payload = inner.getvalue()
            if folder.name == "n00000001":
                with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
                    eighth = tar.getmembers()[7]
                payload = payload[: eighth.offset_data + eighth.size // 2]  # inside image 8
            info = tarfile.TarInfo(f"{folder.name}.tar")
            info.size = len(payload)
            outer.addfile(info, io.BytesIO(payload))
    [manifest] = data.prepare(config(archive, tmp_path / "out"), [8], progress=False)
    assert manifest["per_class"] == [10, 7]
    reasons = {s["path"].removeprefix(f"{archive}/"): s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"n00000001.tar", "n00000001.tar/n00000001_7.JPEG"}
    assert reasons["n00000001.tar"].startswith(
        "truncated: 8 images listed, up to n00000001_7.JPEG; the rest of the class tar"
    )
    assert reasons["n00000001.tar/n00000001_7.JPEG"].startswith("corrupt")


@pytest.mark.parametrize("kind", ["glyphs", "colours"])
def test_demo_kinds_are_deterministic_and_class_dependent(tmp_path, kind):
    """Each demo kind draws the same images from the same seed, and its classes differ: in
    glyphs by the character (same colour statistics), in colours by mean hue."""
    from polyinr.data import demo

    a = demo.make_demo_dataset(tmp_path / "a", 3, 4, 32, 5, kind)
    demo.make_demo_dataset(tmp_path / "b", 3, 4, 32, 5, kind)
    files = sorted((tmp_path / "a" / "train").rglob("*.JPEG"))
    assert a == 12 and len(files) == 12
    assert all(
        f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
        for f in files
    )
    rng = np.random.default_rng
    one = [np.asarray(demo.demo_image(kind, 0, rng([0, i]), 32, 3)) for i in range(8)]
    two = [np.asarray(demo.demo_image(kind, 1, rng([0, i]), 32, 3)) for i in range(8)]
    assert not any(np.array_equal(x, y) for x, y in zip(one, two, strict=True))
    if kind == "colours":  # the brightest pixels' hue tells the class

        def hue(images):
            import colorsys

            px = np.concatenate([i.reshape(-1, 3) for i in images]).astype(float) / 255
            bright = px[px.max(1) > 0.7]
            return np.median([colorsys.rgb_to_hsv(*p)[0] for p in bright])

        def apart(a, b):  # on the hue circle
            return min(abs(a - b), 1 - abs(a - b))

        assert apart(hue(one), 0.0) < 0.05 and apart(hue(two), 1 / 3) < 0.05


def test_unknown_demo_kind_names_the_valid_ones():
    """data.demo_kind is checked when params load, naming the valid kinds."""
    with pytest.raises(ValueError, match="shapes, glyphs, colours"):
        config("s", "o", demo_kind="stars")
