"""Tests for polyinr.commands.evaluate, the evaluate stage: its files and its MLflow record (the
scores themselves are tested in test_metrics)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_GENERATOR

from polyinr.commands import evaluate
from polyinr.core import config
from polyinr.evaluation import metrics
from polyinr.model import sampling
from polyinr.model.generator import Generator, load_generator, save_generator
from polyinr.training import tracking

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
SCORES = {"fid": 12.5, "protocol": "adm", "inception_weights": "w", "label": "FID 12.5"}


@pytest.fixture
def stage(tmp_path, monkeypatch):
    """params.yaml with a 2 x 3 grid and a local MLflow store; scoring replaced by SCORES."""
    monkeypatch.setattr(metrics, "evaluate_generator", lambda *args: (dict(SCORES), {"total": 1.0}))
    return config.load(
        ROOT / "params.yaml",
        [
            "eval.grid_classes=2",
            "eval.grid_seeds=3",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_location={tmp_path / 'artifacts'}",
        ],
    )


def export(path, **meta):
    """A tiny 3-class generator at 8 px, 2.5 kimg, saved with `meta`; its path."""
    torch.manual_seed(0)
    meta = {"resolution": 8, "cur_nimg": 2500, "discriminator_pretrained": False, **meta}
    save_generator(Generator(TINY_GENERATOR, 8), path, meta)
    return path


def test_the_stage_writes_the_scores_with_the_generators_provenance_and_a_grid(
    stage, tmp_path, capsys
):
    """eval.json is the scores plus where the generator came from; the grid holds
    grid_seeds seeds of each of grid_classes classes; params that disagree with the file
    are named (the file wins)."""
    path = export(tmp_path / "generator.pt")
    out, grid = tmp_path / "metrics" / "eval.json", tmp_path / "samples" / "grid.png"
    result, seconds = evaluate.run(stage, path, out, grid, "cpu", progress=False)
    assert json.loads(out.read_text()) == result
    assert result == SCORES | {
        "resolution": 8,
        "kimg": 2.5,
        "discriminator_pretrained": False,
        "discriminator_weights": "unrecorded",
    }
    assert seconds == {"total": 1.0}
    g, _ = load_generator(path)
    expected = sampling.grid(g, [0, 0, 0, 1, 1, 1], [0, 1, 2] * 2, stage.eval.grid_psi, rows=2)
    assert np.array_equal(np.asarray(Image.open(grid)), expected)
    assert expected.shape == (2 * 8, 3 * 8, 3)
    err = capsys.readouterr().err
    assert f"shape comes from {path}" in err and "hidden=16 (params: 128)" in err


def test_the_stage_logs_to_the_run_that_trained_the_generator(stage, tmp_path):
    """A generator that names its MLflow run gets the scores (eval/...), the label tag and
    both files in that run."""
    import mlflow

    with tracking.start_run(stage.tracking) as run:
        run_id = run.info.run_id
    path = export(tmp_path / "generator.pt", mlflow_run_id=run_id)
    out, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    evaluate.run(stage, path, out, grid, "cpu", progress=False)
    client = mlflow.MlflowClient(stage.tracking.uri)
    logged = client.get_run(run_id).data
    assert logged.metrics["eval/fid"] == 12.5 and logged.metrics["eval/kimg"] == 2.5
    assert logged.metrics["eval_seconds/total"] == 1.0
    assert logged.tags["eval.label"] == "FID 12.5"
    assert {a.path for a in client.list_artifacts(run_id)} == {"eval.json", "grid.png"}
