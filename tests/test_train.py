"""Training: one step moves G and the heads only; reruns resume; stages chain by EMA."""

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from polyinr import data
from polyinr.core import config
from polyinr.model.generator import Generator, load_generator
from polyinr.training import loop, run
from polyinr.training.run import train
from polyinr.training.rundir import RunDir

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
        "discriminator.input_size=16",
        "train.embed_init=null",
        f"train.stages={stages}",
        "train.batch=8",
        "train.snapshot_kimg=0.016",
        "train.sample_kimg=0.032",
        "train.workers=1",
        "eval.every_kimg=0.0",  # the FID during training is tested in tests/test_metrics.py
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
    g, _, d, opt_g, opt_d = run._stage_models(cfg, stage, 2, torch.device("cpu"), None)
    g0, d0 = copy.deepcopy(g.state_dict()), copy.deepcopy(d.state_dict())
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    c = torch.randint(0, 2, (8,))
    d.train()
    z_g, z_d = torch.randn(8, cfg.generator.z_dim), torch.randn(8, cfg.generator.z_dim)
    stats = loop.training_step(g, d, opt_g, opt_d, [(x, c)], [z_g], [z_d], sigma=1.0)
    assert stats["acc_real"].shape == stats["acc_fake"].shape == (4,)  # one per head
    # Tensors left on the device: nothing in the step waits for the device (no .item()).
    assert all(isinstance(v, torch.Tensor) for v in stats.values())
    g1, d1 = g.state_dict(), d.state_dict()
    changed_g = [k for k in g0 if not torch.equal(g0[k], g1[k])]
    assert any(k.startswith("synthesis.") for k in changed_g)
    assert any(k.startswith("mapping.fc") for k in changed_g)
    feature_keys = [k for k in d0 if ".features." in k]
    assert feature_keys and all(torch.equal(d0[k], d1[k]) for k in feature_keys)
    head_keys = [k for k in d0 if ".heads." in k and "weight" in k]
    assert any(not torch.equal(d0[k], d1[k]) for k in head_keys)
    projector_keys = [k for k in d0 if ".projector." in k]
    assert projector_keys
    assert all(torch.equal(d0[k], d1[k]) for k in projector_keys)


def test_rerun_resumes_instead_of_restarting(prepared, tmp_path, monkeypatch, capsys):
    """A second `train` with a longer schedule continues from the checkpoint's cur_nimg."""
    monkeypatch.chdir(tmp_path)
    cfg = run_cfg(prepared, tmp_path, kimg=0.016)
    first = train(cfg, torch.device("cpu"), "run", progress=False)
    assert first["cur_nimg"] == 16
    assert (tmp_path / "checkpoints/test/latest.json").is_file()
    capsys.readouterr()

    seen = []
    original = loop.training_step
    monkeypatch.setattr(loop, "training_step", lambda *a, **k: seen.append(1) or original(*a, **k))
    cfg2 = run_cfg(prepared, tmp_path, kimg=0.032)
    second = train(cfg2, torch.device("cpu"), "run", progress=False)
    assert "resuming from" in capsys.readouterr().err
    assert second["cur_nimg"] == 32
    assert len(seen) == 2  # only the 16 new images (batch 8), not all 32
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    g, meta = load_generator(tmp_path / "run/generator.pt")
    assert meta["cur_nimg"] == 32 and meta["resolution"] == 16
    curve = (tmp_path / "run/train.csv").read_text().splitlines()
    assert curve[0].startswith("kimg") and len(curve) == 3  # header + 0.016 + 0.032
    events = RunDir(tmp_path / "run").read_events()  # both sessions, appended
    started = [e for e in events if e["event"] == "run_started"]
    assert [e["resumed_from"] for e in started] == [
        None,
        f"{tmp_path}/checkpoints/test/snapshot-000000000016.pt",
    ]
    assert [e["nimg"] for e in events if e["event"] == "checkpoint"] == [16, 32]
    assert (
        events[-1]["event"] == "exported"
        and events[-1]["weights_sha256"] == second["weights_sha256"]
    )


def test_second_stage_starts_from_first_stage_ema(prepared, tmp_path, monkeypatch):
    """Stage 2's G equals stage 1's EMA generator (at the same coordinates) before its step."""
    monkeypatch.chdir(tmp_path)
    stages = "[{resolution: 16, kimg: 0.016}, {resolution: 24, kimg: 0.008}]"
    cfg = run_cfg(prepared, tmp_path, stages=stages)
    captured = {}
    original = run._stage_models

    def spy(cfg_, stage, num_classes, device, g_ema_prev, d_prev=None):
        out = original(cfg_, stage, num_classes, device, g_ema_prev, d_prev)
        if g_ema_prev is not None:
            captured["g"] = copy.deepcopy(out[0])
        return out

    monkeypatch.setattr(run, "_stage_models", spy)
    result = train(cfg, torch.device("cpu"), "run", progress=False)
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


@pytest.mark.parametrize("carry", [True, False])
def test_carry_d_starts_the_next_stage_from_the_last_d_else_a_fresh_one(
    prepared, tmp_path, monkeypatch, carry
):
    """train.carry_d: stage 2's D is stage 1's last D (weights); false: the reference's fresh D,
    the one a stage builds from the seed."""
    monkeypatch.chdir(tmp_path)
    stages = "[{resolution: 16, kimg: 0.016}, {resolution: 24, kimg: 0.008}]"
    cfg = run_cfg(prepared, tmp_path, stages=stages)
    cfg = dataclasses.replace(
        cfg,  # D's input 24 px at both stages: the same shapes
        train=dataclasses.replace(cfg.train, carry_d=carry),
        discriminator=dataclasses.replace(cfg.discriminator, input_size=24),
    )
    built, original = [], run._stage_models

    def spy(cfg_, stage, num_classes, device, g_ema_prev, d_prev=None):
        out = original(cfg_, stage, num_classes, device, g_ema_prev, d_prev)
        built.append(copy.deepcopy(out[2].state_dict()))
        return out

    monkeypatch.setattr(run, "_stage_models", spy)
    train(cfg, torch.device("cpu"), "run", progress=False)
    last = torch.load(tmp_path / "checkpoints/test/snapshot-000000000016.pt", weights_only=True)
    trained = [k for k, v in last["D"].items() if not torch.equal(built[0][k], v)]
    assert trained  # stage 1 moved D, so the two cases differ
    same = [torch.equal(built[1][k], last["D"][k]) for k in trained]
    assert all(same) if carry else not any(same)


def test_carry_d_starts_a_fresh_d_where_the_stage_changes_its_shapes(capsys):
    """Where a stage's D input grows (the resolution above discriminator.input_size), its maps
    and heads change shape: that stage starts a fresh D and says so."""
    d, d_prev = torch.nn.Linear(2, 4), torch.nn.Linear(2, 3)
    fresh = copy.deepcopy(d.state_dict())
    assert not run._carry_weights(d, d_prev)
    assert all(torch.equal(v, fresh[k]) for k, v in d.state_dict().items())
    assert run._carry_weights(d, torch.nn.Linear(2, 4))


def test_stage_by_stage_equals_the_whole_schedule(prepared, tmp_path, monkeypatch, capsys):
    """`--until-stage 0`, again (nothing to do), then the rest: the same weights and one MLflow
    run as one uninterrupted call; the generator is exported only at the end."""
    stages = "[{resolution: 16, kimg: 0.016}, {resolution: 24, kimg: 0.008}]"
    cpu = torch.device("cpu")
    whole_dir, staged_dir = tmp_path / "whole", tmp_path / "staged"
    for d in (whole_dir, staged_dir):
        d.mkdir()
    monkeypatch.chdir(whole_dir)
    whole = train(run_cfg(prepared, whole_dir, stages=stages), cpu, "run", progress=False)

    monkeypatch.chdir(staged_dir)
    cfg = run_cfg(prepared, staged_dir, stages=stages)
    first = train(cfg, cpu, "run", progress=False, until_stage=0)
    assert first["cur_nimg"] == 16 and first["stage"] == 0
    assert not (staged_dir / "run/generator.pt").exists()
    capsys.readouterr()
    again = train(cfg, cpu, "run", progress=False, until_stage=0)
    assert again == {"cur_nimg": 16, "stage": 0, "already_complete": True}
    assert "stage 0 (16px) is already complete" in capsys.readouterr().err
    rest = train(cfg, cpu, "run", progress=False)
    assert rest["cur_nimg"] == 24 and rest["mlflow_run_id"] == first["mlflow_run_id"]
    assert rest["weights_sha256"] == whole["weights_sha256"]
    _, meta = load_generator(staged_dir / "run/generator.pt")
    assert meta["resolution"] == 24
    with pytest.raises(ValueError, match="stages 0 to 1 \\(16px, 24px\\)"):
        train(cfg, cpu, "run", progress=False, until_stage=2)


def test_stages_run_whole_batches_and_the_next_starts_at_its_image_zero(
    prepared, tmp_path, monkeypatch
):
    """12 images at batch 8 round up to 16; stage 1 then starts at image 16 (its blur at full
    strength), not mid-way at 12 (a quarter of its 16-image blur fade already gone)."""
    monkeypatch.chdir(tmp_path)
    stages = "[{resolution: 16, kimg: 0.012}, {resolution: 24, kimg: 0.008}]"
    cfg = run_cfg(prepared, tmp_path, stages=stages)
    result = train(cfg, torch.device("cpu"), "run", progress=False)
    assert result["cur_nimg"] == 24
    history = torch.load(tmp_path / "checkpoints/test/snapshot-000000000024.pt", weights_only=True)[
        "history"
    ]
    assert [(row["kimg"], row["stage"]) for row in history] == [(0.016, 0), (0.024, 1)]
    assert history[-1]["blur_sigma"] == cfg.discriminator.blur_sigma  # stage 1's first step


def test_fid_during_training_marks_each_stage_best_and_the_next_stage_starts_from_it(
    prepared, tmp_path, monkeypatch
):
    """With eval.every_kimg on, the FID is measured at each boundary and at a stage's end; it
    goes to the curve, the event log and MLflow; each stage's best snapshot is marked in
    storage and survives pruning; stage 1 starts from stage 0's best, not its last EMA."""
    import mlflow

    from polyinr.evaluation import metrics
    from polyinr.training import tracking
    from polyinr.training.checkpoints import CheckpointStore
    from polyinr.training.rundir import RunDir

    monkeypatch.chdir(tmp_path)
    scripted = iter([3.0, 1.0, 2.0, 5.0])  # kimg 0.008, 0.016, 0.024 (stage 0's end), 0.032
    monkeypatch.setattr(metrics.TrainingFID, "__call__", lambda self, g, res: next(scripted))
    starts = []
    original = run._stage_models

    def spy(cfg_, stage, num_classes, device, g_ema_prev, d_prev=None):
        starts.append(None if g_ema_prev is None else copy.deepcopy(g_ema_prev.state_dict()))
        return original(cfg_, stage, num_classes, device, g_ema_prev, d_prev)

    monkeypatch.setattr(run, "_stage_models", spy)
    stages = "[{resolution: 16, kimg: 0.024}, {resolution: 24, kimg: 0.008}]"
    cfg = config.load(
        REPO / "params.yaml",
        [
            *tiny_overrides(prepared, stages=stages),
            f"storage.uri={tmp_path / 'checkpoints'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "storage.keep=1",
            "train.snapshot_kimg=0.008",
            "eval.every_kimg=0.008",
        ],
    )
    result = train(cfg, torch.device("cpu"), tmp_path / "run", progress=False)
    name = metrics.metric_name(cfg.eval.train_samples)
    events = RunDir(tmp_path / "run").read_events()
    fids = [(e["nimg"], e["value"], e["best"]) for e in events if e["event"] == "fid"]
    assert fids == [(8, 3.0, True), (16, 1.0, True), (24, 2.0, False), (32, 5.0, True)]
    store = CheckpointStore(cfg.storage, "test")
    best = store.best(0)
    assert best["name"] == "snapshot-000000000016.pt" and best["fid"] == 1.0
    assert (tmp_path / "checkpoints/test" / best["name"]).is_file()  # kept despite keep=1
    (stage1,) = [e for e in events if e["event"] == "stage_started" and e["stage"] == 1]
    assert "best-FID snapshot of stage 0 (16px): kimg 0.016" in stage1["start"]
    snapshot = store.load(best["name"])["G_ema"]
    assert all(torch.equal(starts[1][k], v) for k, v in snapshot.items())
    curve = (tmp_path / "run/fid.csv").read_text().splitlines()
    assert curve[0] == f"kimg,stage,resolution,{name}" and len(curve) == 5
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    history = client.get_metric_history(result["mlflow_run_id"], tracking.metric_key(name))
    assert sorted((m.step, m.value) for m in history) == [(8, 3.0), (16, 1.0), (24, 2.0), (32, 5.0)]
    # The pictures beside the CSVs, and `polyinr runs`' view of the same run.
    assert (tmp_path / "run/curves.png").is_file() and (tmp_path / "run/grid.png").is_file()
    from polyinr.commands import runs

    (listed,), problems = runs.collect(cfg)
    assert problems == [] and listed["name"] == "test"
    assert listed["tracking"]["status"] == "FINISHED" and listed["tracking"]["kimg"] == 0.032
    fid_metric = tracking.metric_key(name)
    assert listed["tracking"]["best_fid"] == {"metric": fid_metric, "value": 1.0, "kimg": 0.016}
    assert listed["storage"]["latest"]["kimg"] == 0.032
    assert listed["storage"]["best"] == {"stage": 1, "fid": 5.0, "kimg": 0.032}


def test_a_kill_between_a_commit_and_its_best_mark_changes_nothing(prepared, tmp_path, monkeypatch):
    """FID on, 2 stages: a run killed after the snapshot at kimg 0.016 is committed but before
    its FID is marked best, then rerun, still marks it (stage 1 starts from it) and ends with
    the uninterrupted run's weights."""
    from polyinr.evaluation import metrics
    from polyinr.training.checkpoints import CheckpointStore

    stages = "[{resolution: 16, kimg: 0.024}, {resolution: 24, kimg: 0.008}]"

    def cfg_in(where):
        where.mkdir()
        monkeypatch.chdir(where)
        return config.load(
            REPO / "params.yaml",
            [
                *(o for o in tiny_overrides(prepared, stages=stages) if "uri=" not in o),
                f"storage.uri={where / 'checkpoints'}",
                f"tracking.uri=sqlite:///{where / 'mlflow.db'}",
                "storage.keep=1",
                "train.snapshot_kimg=0.008",
                "eval.every_kimg=0.008",
            ],
        )

    fids = {8: 3.0, 16: 1.0, 24: 2.0, 32: 5.0}  # by the image count the FID is taken at
    measured = iter(sorted(fids))

    def scripted(self, g, res):
        return fids[next(measured)]

    monkeypatch.setattr(metrics.TrainingFID, "__call__", scripted)
    whole = train(cfg_in(tmp_path / "a"), torch.device("cpu"), "run", progress=False)

    measured = iter(sorted(fids))
    original = CheckpointStore.mark_best

    def killed_at_16(self, name, fid, stage=0):
        if name == "snapshot-000000000016.pt":
            raise KeyboardInterrupt("killed after the commit, before the mark")
        return original(self, name, fid, stage)

    monkeypatch.setattr(CheckpointStore, "mark_best", killed_at_16)
    cfg = cfg_in(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, torch.device("cpu"), "run", progress=False)
    monkeypatch.setattr(CheckpointStore, "mark_best", original)
    measured = iter(sorted(fids)[2:])  # the rerun measures from kimg 0.024 on
    resumed = train(cfg, torch.device("cpu"), "run", progress=False)
    best = CheckpointStore(cfg.storage, "test").best(0)
    assert best["name"] == "snapshot-000000000016.pt" and best["fid"] == 1.0
    events = RunDir(Path("run")).read_events()
    (stage1,) = [e for e in events if e["event"] == "stage_started" and e["stage"] == 1]
    assert "best-FID snapshot of stage 0 (16px): kimg 0.016" in stage1["start"]
    assert resumed["weights_sha256"] == whole["weights_sha256"]


def test_schedule_with_a_repeated_resolution_is_refused(prepared):
    stages = "[{resolution: 16, kimg: 0.016}, {resolution: 16, kimg: 0.008}]"
    with pytest.raises(config.ConfigError, match="distinct resolutions"):
        config.load(REPO / "params.yaml", tiny_overrides(prepared, stages=stages))


def test_resumed_run_sees_the_batches_an_uninterrupted_run_sees(prepared, tmp_path, monkeypatch):
    """Stopped mid-epoch and rerun, training gets the same real batches (order and flips) as
    one uninterrupted run; the checkpoint stores the loader position (epoch, batch)."""
    seen = {}
    original = loop.training_step

    def spy(g, d, opt_g, opt_d, reals, *a, **k):
        seen.setdefault(Path.cwd().name, []).append([(x.clone(), c.clone()) for x, c in reals])
        return original(g, d, opt_g, opt_d, reals, *a, **k)

    monkeypatch.setattr(loop, "training_step", spy)
    for name, schedule in (("straight", [0.024]), ("resumed", [0.008, 0.024])):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        for kimg in schedule:  # 16 images, batch 8: 2 batches per epoch, 3 steps in all
            cfg = run_cfg(prepared, tmp_path / name, kimg=kimg)
            cfg = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, snapshot_kimg=0.008)
            )
            train(cfg, torch.device("cpu"), "run", progress=False)
            if kimg == 0.008:
                ckpt = torch.load("checkpoints/test/snapshot-000000000008.pt", weights_only=True)
                assert ckpt["data_position"] == [0, 1]
    straight, resumed = seen["straight"], seen["resumed"]
    assert len(straight) == len(resumed) == 3
    for a, b in zip(straight, resumed, strict=True):
        (xa, ca), (xb, cb) = a[0], b[0]
        assert torch.equal(xa, xb) and torch.equal(ca, cb)


def _rank_worker(rank, world, init_file, overrides, workdir, out):
    """One torchrun-like rank: join a gloo group, train, save this rank's final weights."""
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    folder = Path(workdir) / f"rank{rank}"  # each rank its own folder: only rank 0 writes
    folder.mkdir()
    os.chdir(folder)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    captured = {}
    step = loop.training_step

    def spy(g, d, *args, **kwargs):
        captured.update(g=g, d=d)
        return step(g, d, *args, **kwargs)

    loop.training_step = spy
    try:
        cfg = config.load(REPO / "params.yaml", overrides)
        summary = train(cfg, torch.device("cpu"), "run", progress=False)
        torch.save(
            {
                "G": captured["g"].state_dict(),
                "D": captured["d"].trainable_state_dict(),
                "summary": summary,
            },
            f"{out}-rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _launch(groups: dict[str, tuple[int, list[str]]], root: Path) -> dict[str, list[dict]]:
    """Run process groups {name: (world, overrides)} side by side, each rank a spawned
    process (as torchrun would start them); returns each group's final states by rank."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = []
    for name, (world, overrides) in groups.items():
        where = root / name
        where.mkdir(parents=True)
        args = (world, where / "rendezvous", overrides, where, where / "final")
        procs += [ctx.Process(target=_rank_worker, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return {
        name: [torch.load(root / name / f"final-rank{r}.pt", weights_only=True) for r in range(w)]
        for name, (w, _) in groups.items()
    }


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(prepared, tmp_path):
    """2 ranks x 2 accumulation rounds of 2 images end bit-identical to each other and equal
    (float tolerance) to 1 process taking the global batch of 8 as 2 rounds of 4.

    Latents (per global sample), the data order and flips (per image and epoch) do not
    depend on the split. Conditions for equality: (1) DiffAugment off: its draws come from each
    rank's RNG stream, so with it on the runs agree in distribution only; (2) the same
    number of accumulation rounds: spectral norm runs one power iteration per D forward;
    (3) no BatchNorm in D's heads (true at a 16 px input: maps of 8 px or less): it
    normalises over each rank's share of a round.
    """
    common = tiny_overrides(prepared, kimg=0.032) + [
        "discriminator.diffaugment=''",
        "train.mirror=true",
        "train.snapshot_kimg=0.016",
    ]

    def run(name, extra):
        where = tmp_path / name
        return common + [
            f"storage.uri={where / 'checkpoints'}",
            f"tracking.uri=sqlite:///{where / 'mlflow.db'}",
            f"tracking.artifact_location={where / 'mlartifacts'}",
            *extra,
        ]

    runs = _launch(
        {
            "two": (2, run("two", ["train.batch_gpu=2"])),
            "one": (1, run("one", ["train.batch_gpu=4"])),
        },
        tmp_path,
    )
    two, (one,) = runs["two"], runs["one"]
    for key in ("G", "D"):
        for name, t in two[0][key].items():
            assert torch.equal(t, two[1][key][name]), f"ranks differ in {key}.{name}"
    assert two[0]["summary"]["weights_sha256"] == two[1]["summary"]["weights_sha256"]
    assert two[0]["summary"]["cur_nimg"] == one["summary"]["cur_nimg"] == 32
    for key in ("G", "D"):
        for name, t in one[key].items():
            if t.is_floating_point():
                assert torch.allclose(two[0][key][name], t, rtol=1e-4, atol=1e-5), name
    ckpt = torch.load(tmp_path / "one/checkpoints/test/snapshot-000000000032.pt", weights_only=True)
    first = torch.load(
        tmp_path / "one/checkpoints/test/snapshot-000000000016.pt", weights_only=True
    )
    moved = sum(not torch.equal(ckpt["G"][k], first["G"][k]) for k in ckpt["G"])
    assert moved > 0  # the comparison is between runs that trained
    # Only rank 0 writes (each rank ran in its own folder; the checkpoint store is shared).
    assert (tmp_path / "two/rank0/run/generator.pt").is_file()
    assert not any((tmp_path / "two/rank1").iterdir())


def test_resume_after_a_crash_equals_an_uninterrupted_run(prepared, tmp_path, monkeypatch):
    """Crash mid-epoch after a checkpoint, rerun: the final G_ema is bit-identical to an
    uninterrupted run's, and only the work since the checkpoint is redone."""
    overrides = ["train.snapshot_kimg=0.024", "train.mirror=true"]

    def cfg_in(where):
        monkeypatch.chdir(where)
        return config.load(
            REPO / "params.yaml",
            [
                *(o for o in tiny_overrides(prepared, kimg=0.048) if not o.startswith("storage.")),
                f"storage.uri={where / 'checkpoints'}",
                f"tracking.uri=sqlite:///{where / 'mlflow.db'}",
                f"tracking.artifact_location={where / 'mlartifacts'}",
                *overrides,
            ],
        )

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = train(cfg_in(tmp_path / "a"), torch.device("cpu"), "run", progress=False)

    calls = []
    original = loop.training_step

    def crash_on_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "training_step", crash_on_fifth)
    cfg_b = cfg_in(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(cfg_b, torch.device("cpu"), "run", progress=False)
    calls.clear()
    resumed = train(cfg_b, torch.device("cpu"), "run", progress=False)
    assert len(calls) == 3  # from the 24-image checkpoint: 3 of the 6 batches redone
    assert resumed["cur_nimg"] == whole["cur_nimg"] == 48
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    a = torch.load(tmp_path / "a/checkpoints/test/snapshot-000000000048.pt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoints/test/snapshot-000000000048.pt", weights_only=True)
    for key in ("G_ema", "G", "D"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    crashed = torch.load(
        tmp_path / "b/checkpoints/test/snapshot-000000000024.pt", weights_only=True
    )
    assert resumed["mlflow_run_id"] == crashed["mlflow_run_id"]  # the same MLflow run goes on


@pytest.mark.slow
def test_sigterm_and_sigkill_lose_nothing_committed(prepared, tmp_path, s3_bucket, s3_env):
    """`polyinr train` on S3: SIGTERM checkpoints and exits 143; SIGKILL at a random moment
    (often mid-step or mid-upload) loses no committed checkpoint; reruns resume and finish;
    `polyinr checkpoints list` shows every checkpoint, each matching its checksum."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    import boto3

    from polyinr.training.checkpoints import CheckpointStore

    overrides = [
        o for o in tiny_overrides(prepared, kimg=0.064) if not o.startswith("storage.uri")
    ] + [
        f"storage.uri=s3://{s3_bucket}/runs",
        f"storage.endpoint_url={s3_env}",
        f"storage.staging_dir={tmp_path / 'staging'}",
        "storage.keep=20",
        "train.snapshot_kimg=0.008",
        "train.sample_kimg=1.0",
    ]
    cmd = [
        sys.executable,
        "-m",
        "polyinr",
        "train",
        "--quiet",
        "--params",
        str(REPO / "params.yaml"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    client = boto3.session.Session().client("s3", endpoint_url=s3_env)

    def committed() -> int:
        listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/test/")
        return sum(o["Key"].endswith(".json") for o in listed.get("Contents", []))

    def run_until(records: int, sig) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(cmd + overrides, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
        while committed() < records and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(random.Random(records).uniform(0.0, 0.5))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, None, err.decode())

    term = run_until(2, signal.SIGTERM)  # records: latest.json + a snapshot record
    assert term.returncode == 143, term.stderr
    assert "stopped by SIGTERM at kimg" in term.stderr
    killed = run_until(committed() + 2, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert "resuming from" in killed.stderr
    store = CheckpointStore(config.load(REPO / "params.yaml", overrides).storage, "test")
    before = store.records()
    final = subprocess.run(cmd + overrides, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    resumed_at = float(final.stderr.split("resuming from ")[1].split("at kimg ")[1].split()[0])
    assert resumed_at == before[-1]["kimg"]  # from the last committed checkpoint
    assert json.loads(final.stdout.strip().splitlines()[-1])["cur_nimg"] == 64

    listed = subprocess.run(
        [sys.executable, "-m", "polyinr", "checkpoints", "list", "--params"]
        + [str(REPO / "params.yaml"), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, listed.stderr
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["kimg"] for r in records] == [k / 1000 for k in range(8, 65, 8)]
    assert {r["name"] for r in before} <= {r["name"] for r in records}
    assert records[-1]["latest"] and records[-1]["uri"].startswith(f"s3://{s3_bucket}/runs/test/")
    for r in records:
        assert {"stage", "kimg", "uri", "size", "sha256", "weights_sha256"} <= set(r)
        state = store.load(r["name"])
        assert state is not None and state["cur_nimg"] == round(r["kimg"] * 1000)


@pytest.mark.slow
def test_missing_bucket_stops_before_any_compute(prepared, tmp_path, s3_env, monkeypatch):
    """A bucket that does not exist is one StorageError naming it, before models are built."""
    from polyinr.core.storage import StorageError

    monkeypatch.chdir(tmp_path)
    cfg = config.load(
        REPO / "params.yaml",
        [
            *(
                o
                for o in tiny_overrides(prepared)
                if not o.startswith(("storage.uri", "tracking.uri"))
            ),
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "storage.uri=s3://no-such-bucket-for-polyinr/runs",
            f"storage.endpoint_url={s3_env}",
            "storage.retries=1",
        ],
    )
    built = []
    monkeypatch.setattr(run, "_stage_models", lambda *a: built.append(1))
    with pytest.raises(StorageError, match="no-such-bucket-for-polyinr"):
        train(cfg, torch.device("cpu"), "run", progress=False)
    assert not built and not (tmp_path / "mlflow.db").exists()


def test_level_checkpointing_gives_the_same_gradients(prepared):
    """train.checkpoint_levels trades memory for compute: identical loss and gradients."""
    cfg = config.load(REPO / "params.yaml", tiny_overrides(prepared))
    g, *_ = run._stage_models(cfg, cfg.train.stages[0], 2, torch.device("cpu"), None)
    z, c = torch.randn(4, cfg.generator.z_dim), torch.tensor([0, 1, 0, 1])
    grads = []
    for checkpoint in (False, True):
        g.zero_grad()
        g.synthesis.checkpoint_levels = checkpoint
        g(z, c).square().mean().backward()
        grads.append([p.grad.clone() for p in g.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    cfg = config.load(
        REPO / "params.yaml", [*tiny_overrides(prepared), "train.checkpoint_levels=true"]
    )
    g, *_ = run._stage_models(cfg, cfg.train.stages[0], 2, torch.device("cpu"), None)
    assert g.synthesis.checkpoint_levels


def test_bf16_training_step_moves_the_models_with_finite_losses(prepared):
    """train.precision=bf16 autocasts the forward passes; losses stay float32 and finite."""
    cfg = config.load(REPO / "params.yaml", [*tiny_overrides(prepared), "train.precision=bf16"])
    torch.manual_seed(0)
    g, _, d, opt_g, opt_d = run._stage_models(
        cfg, cfg.train.stages[0], 2, torch.device("cpu"), None
    )
    g0 = copy.deepcopy(g.state_dict())
    x, c = torch.rand(8, 3, 16, 16) * 2 - 1, torch.randint(0, 2, (8,))
    z = [torch.randn(8, cfg.generator.z_dim)]
    stats = loop.training_step(
        g, d, opt_g, opt_d, [(x, c)], z, z, sigma=1.0, precision=cfg.train.precision
    )
    assert all(map(math.isfinite, (stats["loss_g"], stats["loss_d"])))
    assert all(0 <= a <= 1 for a in torch.cat([stats["acc_real"], stats["acc_fake"]]))
    assert all(p.dtype == torch.float32 for p in g.parameters())
    assert any(not torch.equal(v, g.state_dict()[k]) for k, v in g0.items())


def test_unknown_precision_names_the_valid_ones(prepared):
    with pytest.raises(config.ConfigError, match=r"precision must be one of \['bf16', 'fp32'\]"):
        config.load(REPO / "params.yaml", [*tiny_overrides(prepared), "train.precision=fp16"])


def test_non_finite_gradients_become_zero_or_1e5():
    """As the reference: NaN gradients become 0 and +-inf become +-1e5 before the step."""
    from polyinr.core import distributed

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0])
    distributed.all_reduce_grads([p], world=1)
    assert p.grad.tolist() == [0.0, 1e5, -1e5, 2.0]


def test_data_that_disagree_with_the_config_stop_training_before_any_compute(
    prepared, tmp_path, monkeypatch
):
    """A class count other than the data's, or a stage without its FFCV file, is one line
    naming both values before models, storage or MLflow are touched."""
    monkeypatch.chdir(tmp_path)
    built = []
    monkeypatch.setattr(run, "_stage_models", lambda *a: built.append(1))
    cfg = run_cfg(prepared, tmp_path)
    wrong_classes = dataclasses.replace(
        cfg, generator=dataclasses.replace(cfg.generator, num_classes=1000)
    )
    with pytest.raises(data.DataError, match="num_classes=1000 but .* lists 2 classes"):
        train(wrong_classes, torch.device("cpu"), "run", progress=False)
    stages = "[{resolution: 16, kimg: 0.016}, {resolution: 32, kimg: 0.016}]"
    unprepared = run_cfg(prepared, tmp_path, stages=stages)
    with pytest.raises(data.DataError, match="train_32.beton; run `polyinr prepare` first"):
        train(unprepared, torch.device("cpu"), "run", progress=False)
    assert not built and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "checkpoints").exists()


def test_resuming_with_another_generator_section_is_refused(prepared, tmp_path, monkeypatch):
    """A run's checkpoint made with other generator params is not resumed with these: one
    error naming the checkpoint and the section, before any model is built."""
    monkeypatch.chdir(tmp_path)
    train(run_cfg(prepared, tmp_path, kimg=0.008), torch.device("cpu"), "run", progress=False)
    built = []
    monkeypatch.setattr(run, "_stage_models", lambda *a: built.append(1))
    cfg = run_cfg(prepared, tmp_path, kimg=0.016)
    other = dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, hidden=24))
    with pytest.raises(ValueError, match=r"other params \(generator\.hidden: 16 -> 24\)"):
        train(other, torch.device("cpu"), "run", progress=False)
    assert not built


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(prepared, tmp_path):
    """train.batch must be a multiple of batch_gpu x world size: one line naming them."""
    cfg = run_cfg(prepared, tmp_path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch=8, batch_gpu=3))
    with pytest.raises(ValueError, match=r"train.batch=8 is not a multiple of batch_gpu \(3\)"):
        train(cfg, torch.device("cpu"), "run", progress=False)


def test_resume_refuses_other_params_and_a_shorter_schedule_leaves_the_run_finished(
    prepared, tmp_path, monkeypatch
):
    """A fixed run name with a checkpoint made with other result-affecting params is refused,
    naming them; a schedule shorter than the finished run's checkpoints is refused before
    MLflow is touched, so the finished MLflow run stays FINISHED (not FAILED)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    cpu = torch.device("cpu")
    done = train(run_cfg(prepared, tmp_path, kimg=0.016), cpu, "run", progress=False)
    other = config.load(
        REPO / "params.yaml",
        [*tiny_overrides(prepared, kimg=0.016), "train.lr_g=2.0e-4", "generator.levels=2"],
    )
    other = dataclasses.replace(other, storage=run_cfg(prepared, tmp_path).storage)
    with pytest.raises(ValueError, match=r"generator\.levels: 3 -> 2; train\.lr_g: 0\.00025 ->"):
        train(other, cpu, "run", progress=False)

    shorter = run_cfg(prepared, tmp_path, kimg=0.008)
    with pytest.raises(ValueError, match="past the end of train.stages"):
        train(shorter, cpu, "run", progress=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.get_run(done["mlflow_run_id"]).info.status == "FINISHED"


def test_progress_bar_redraws_every_mininterval_not_every_step(prepared, tmp_path):
    """`polyinr train` with TQDM_MININTERVAL=60 (the flow sets 5 s): six steps draw the bar
    at its start and end only, so the Prefect log gets a line every few seconds, not per step."""
    import os
    import subprocess
    import sys

    overrides = [o for o in tiny_overrides(prepared, kimg=0.048) if "storage.uri" not in o]
    overrides += [f"storage.uri={tmp_path / 'checkpoints'}", "train.snapshot_kimg=1.0"]
    cmd = [sys.executable, "-m", "polyinr", "train", "--params", str(REPO / "params.yaml")]
    env = {**os.environ, "TQDM_MININTERVAL": "60", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd + overrides, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    draws = [p for p in proc.stderr.replace("\n", "\r").split("\r") if "stage 0 (16px)" in p]
    assert 2 <= len(draws) <= 4, draws  # start, end (and its redraw around the last log line)
    assert "48.0/48.0" in draws[-1] and "0.00/48.0" in draws[0], draws
