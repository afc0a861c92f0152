"""Training: one step moves G and the heads only; reruns resume; stages chain by EMA."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from polyinr import config, data, train
from polyinr.generator import Generator, load_generator

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(root: Path, kimg: float = 0.032, stages=None) -> list[str]:
    stages = stages or f"[{{resolution: 16, kimg: {kimg}}}]"
    return [
        f"data.source={root / 'demo'}",
        f"data.out_dir={root / 'ffcv'}",
        "data.demo_classes=2",
        "data.demo_per_class=8",
        "data.demo_size=24",
        "data.workers=1",
        "generator.num_classes=2",
        "generator.hidden=16",
        "generator.w_dim=16",
        "generator.z_dim=8",
        "generator.levels=3",
        "discriminator.proj_channels=4",
        "discriminator.head_channels=8",
        "discriminator.cmap_dim=8",
        "discriminator.blur_kimg=0.016",
        f"train.stages={stages}",
        "train.batch=8",
        "train.snapshot_kimg=0.016",
        "train.sample_kimg=0.032",
        "train.workers=1",
        f"storage.uri={root / 'checkpoints'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.artifact_location={root / 'mlartifacts'}",
        "tracking.run_name=test",
    ]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 2-class demo dataset converted at 16 and 24 px, shared by the module."""
    root = tmp_path_factory.mktemp("train")
    cfg = config.load(REPO / "params.yaml", tiny_overrides(root))
    data.make_demo_dataset(Path(cfg.data.source), 2, 8, 24, 0)
    data.prepare(cfg.data, [16, 24], progress=False)
    return root


def run_cfg(prepared, tmp_path, **kw):
    overrides = tiny_overrides(prepared, **kw)
    overrides = [o for o in overrides if not o.startswith(("storage.", "tracking."))]
    overrides += [
        f"storage.uri={tmp_path / 'checkpoints'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
        "tracking.run_name=test",
    ]
    return config.load(REPO / "params.yaml", overrides)


def test_training_step_moves_generator_and_heads_but_not_feature_network(prepared):
    """One G+D step changes G and the D heads; the frozen network stays bit-identical."""
    cfg = config.load(REPO / "params.yaml", tiny_overrides(prepared))
    torch.manual_seed(0)
    stage = cfg.train.stages[0]
    g, _, d, opt_g, opt_d = train._stage_models(cfg, stage, 2, torch.device("cpu"), None)
    g0, d0 = copy.deepcopy(g.state_dict()), copy.deepcopy(d.state_dict())
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    c = torch.randint(0, 2, (8,))
    d.train()
    z_g, z_d = torch.randn(8, cfg.generator.z_dim), torch.randn(8, cfg.generator.z_dim)
    train.training_step(g, d, opt_g, opt_d, [(x, c)], [z_g], [z_d], sigma=1.0)
    g1, d1 = g.state_dict(), d.state_dict()
    changed_g = [k for k in g0 if not torch.equal(g0[k], g1[k])]
    assert any(k.startswith("synthesis.") for k in changed_g)
    assert any(k.startswith("mapping.fc") for k in changed_g)
    feature_keys = [k for k in d0 if k.startswith("features.")]
    assert feature_keys and all(torch.equal(d0[k], d1[k]) for k in feature_keys)
    head_keys = [k for k in d0 if k.startswith("heads.") and "weight" in k]
    assert any(not torch.equal(d0[k], d1[k]) for k in head_keys)
    projector_keys = [k for k in d0 if k.startswith("projectors.")]
    assert all(torch.equal(d0[k], d1[k]) for k in projector_keys)


def test_rerun_resumes_instead_of_restarting(prepared, tmp_path, monkeypatch, capsys):
    """A second `train` with a longer schedule continues from the checkpoint's cur_nimg."""
    monkeypatch.chdir(tmp_path)
    cfg = run_cfg(prepared, tmp_path, kimg=0.016)
    first = train.train(cfg, torch.device("cpu"), progress=False)
    assert first["cur_nimg"] == 16
    assert (tmp_path / "checkpoints/test/latest.json").is_file()
    capsys.readouterr()

    seen = []
    original = train.training_step
    monkeypatch.setattr(train, "training_step", lambda *a, **k: seen.append(1) or original(*a, **k))
    cfg2 = run_cfg(prepared, tmp_path, kimg=0.032)
    second = train.train(cfg2, torch.device("cpu"), progress=False)
    assert "resuming from" in capsys.readouterr().err
    assert second["cur_nimg"] == 32
    assert len(seen) == 2  # only the 16 new images (batch 8), not all 32
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    g, meta = load_generator(tmp_path / "models/generator.pt")
    assert meta["cur_nimg"] == 32 and meta["resolution"] == 16
    curve = (tmp_path / "metrics/train.csv").read_text().splitlines()
    assert curve[0].startswith("kimg") and len(curve) == 3  # header + 0.016 + 0.032


def test_second_stage_starts_from_first_stage_ema(prepared, tmp_path, monkeypatch):
    """Stage 2's G equals stage 1's EMA generator (at the same coordinates) before its step."""
    monkeypatch.chdir(tmp_path)
    stages = "[{resolution: 16, kimg: 0.016}, {resolution: 24, kimg: 0.008}]"
    cfg = run_cfg(prepared, tmp_path, stages=stages)
    captured = {}
    original = train._stage_models

    def spy(cfg_, stage, num_classes, device, g_ema_prev):
        out = original(cfg_, stage, num_classes, device, g_ema_prev)
        if g_ema_prev is not None:
            captured["g"] = copy.deepcopy(out[0])
        return out

    monkeypatch.setattr(train, "_stage_models", spy)
    result = train.train(cfg, torch.device("cpu"), progress=False)
    assert result["cur_nimg"] == 24
    stage1 = torch.load(tmp_path / "checkpoints/test/snapshot-000000000016.pt", weights_only=True)
    assert stage1["stage"] == 0
    prev = Generator(cfg.generator, 16)
    prev.load_state_dict(stage1["G_ema"])
    g = captured["g"]
    assert g.resolution == 24
    z, c = torch.randn(3, 8), torch.tensor([0, 1, 0])
    coords = torch.rand(5, 2)
    with torch.no_grad():
        assert torch.allclose(prev(z, c, coords=coords), g(z, c, coords=coords))
        assert g(z, c).shape[-2:] == (24, 24)  # the grid swapped for the new resolution
    logged = json.loads((tmp_path / "checkpoints/test/latest.json").read_text())
    assert logged["name"].endswith("000000000024.pt")


def test_resumed_run_sees_the_batches_an_uninterrupted_run_sees(prepared, tmp_path, monkeypatch):
    """Stopped mid-epoch and rerun, training gets the same real batches (order and flips) as
    one uninterrupted run; the checkpoint stores the loader position (epoch, batch)."""
    seen = {}
    original = train.training_step

    def spy(g, d, opt_g, opt_d, reals, *a, **k):
        seen.setdefault(Path.cwd().name, []).append([(x.clone(), c.clone()) for x, c in reals])
        return original(g, d, opt_g, opt_d, reals, *a, **k)

    monkeypatch.setattr(train, "training_step", spy)
    for name, schedule in (("straight", [0.024]), ("resumed", [0.008, 0.024])):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        for kimg in schedule:  # 16 images, batch 8: 2 batches per epoch, 3 steps in all
            cfg = run_cfg(prepared, tmp_path / name, kimg=kimg)
            cfg = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, snapshot_kimg=0.008)
            )
            train.train(cfg, torch.device("cpu"), progress=False)
            if kimg == 0.008:
                ckpt = torch.load("checkpoints/test/snapshot-000000000008.pt", weights_only=True)
                assert ckpt["data_position"] == [0, 1]
    straight, resumed = seen["straight"], seen["resumed"]
    assert len(straight) == len(resumed) == 3
    for a, b in zip(straight, resumed, strict=True):
        (xa, ca), (xb, cb) = a[0], b[0]
        assert torch.equal(xa, xb) and torch.equal(ca, cb)
