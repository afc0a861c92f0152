"""The generator in a real MLflow Model Registry (SQLite backend): publish, load, predict."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import TINY_GENERATOR

from polyinr.commands import cli
from polyinr.core import config
from polyinr.model.generator import Generator, save_generator

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_GENERATOR


@pytest.mark.slow
def test_registered_model_returns_the_images_of_generate(tmp_path, monkeypatch, single_thread):
    """`polyinr publish` registers a pyfunc model whose predictions equal `polyinr generate`'s
    images for the same classes, seeds, psi and resolution; --mlflow-run logs outputs."""
    import mlflow
    from mlflow import MlflowClient

    from polyinr.commands import registry

    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    g = Generator(TINY, 8)
    g.mapping.w_avg.normal_()  # psi must matter
    gen = tmp_path / "generator.pt"
    save_generator(g, gen, {"resolution": 8, "cur_nimg": 0})
    overrides = [
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/mlartifacts",
        "tracking.experiment=registry-test",
    ]
    assert cli.main(["publish", "--generator", str(gen), "--name", "tiny", *overrides]) == 0

    model = mlflow.pyfunc.load_model("models:/tiny/1")
    shape = MlflowClient().get_model_version("tiny", "1").tags
    assert shape == {
        "generator.conditional": "True",
        "generator.num_classes": "3",
        "resolution": "8",
    }
    request = pd.DataFrame({"class_id": [0, 0, 2, 2], "seed": [3, 4, 3, 4]})
    images = model.predict(request, params={"psi": 0.6, "resolution": 12})
    assert images.shape == (4, 12, 12, 3) and images.dtype == np.uint8

    run_id = MlflowClient().get_model_version("tiny", "1").run_id
    out = tmp_path / "samples.npz"
    argv = ["generate", "--generator", str(gen), "--classes", "0", "2", "--seeds", "3-4"]
    argv += ["--psi", "0.6", "--resolution", "12", "--out", str(out), "--device", "cpu"]
    assert cli.main([*argv, "--quiet", "--mlflow-run", run_id, *overrides]) == 0
    assert np.array_equal(images, np.load(out)["arr_0"])
    assert not np.array_equal(images[0], images[1])  # different seeds, different images

    folder = tmp_path / "pngs"
    argv[argv.index(str(out))] = str(folder)
    assert cli.main([*argv, "--quiet", "--mlflow-run", run_id, *overrides]) == 0
    logged = [a.path for a in MlflowClient().list_artifacts(run_id, "generate")]
    assert logged == ["generate/pngs", "generate/samples.npz"]
    assert len(MlflowClient().list_artifacts(run_id, "generate/pngs")) == 4
    default = model.predict(request.iloc[:1])  # params default to psi 1, trained resolution
    assert default.shape == (1, 8, 8, 3)

    # Publishing into a run with tags is idempotent: the same run and tags, the same version.
    cfg = config.load(ROOT / "params.yaml", overrides).tracking
    tags = {"eval.fid": "12.5"}
    uri = registry.publish(gen, 8, cfg, "tiny", run_id=run_id, tags=tags)
    assert uri == "models:/tiny/2"
    assert registry.publish(gen, 8, cfg, "tiny", run_id=run_id, tags=tags) == uri
    assert MlflowClient().get_model_version("tiny", "2").tags == tags


def test_served_model_refuses_classes_the_generator_does_not_have(tmp_path, single_thread):
    """The pyfunc model's shape is the file's: class 7 of a 3-class generator is one error
    naming both values."""
    from types import SimpleNamespace

    from polyinr.commands import registry

    torch.manual_seed(0)
    save_generator(Generator(TINY, 8), tmp_path / "g.pt", {"resolution": 8, "cur_nimg": 0})
    model = registry.GeneratorModel()
    model.load_context(SimpleNamespace(artifacts={"generator": str(tmp_path / "g.pt")}))
    assert model.predict(None, pd.DataFrame({"class_id": [2], "seed": [0]})).shape == (1, 8, 8, 3)
    with pytest.raises(ValueError, match="class 7 requested, but the generator has 3 classes"):
        model.predict(None, pd.DataFrame({"class_id": [7], "seed": [0]}))


@pytest.mark.slow
def test_publish_registers_under_the_run_that_trained_the_generator(tmp_path, single_thread):
    """Without --mlflow-run, `polyinr publish` logs the model in the training run recorded in
    the exported generator, not in a new empty run."""
    import mlflow
    from mlflow import MlflowClient

    from polyinr.training import tracking

    overrides = [
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/mlartifacts",
        "tracking.experiment=registry-test",
    ]
    cfg = config.load(ROOT / "params.yaml", overrides).tracking
    with tracking.start_run(cfg) as run:  # what training does
        tracking.log_metrics({"loss/g": 1.0}, step=32)
    torch.manual_seed(0)
    gen = tmp_path / "generator.pt"
    meta = {"resolution": 8, "cur_nimg": 32, "mlflow_run_id": run.info.run_id}
    save_generator(Generator(TINY, 8), gen, meta)
    argv = ["publish", "--generator", str(gen), "--name", "tiny", "--params"]
    assert cli.main([*argv, str(ROOT / "params.yaml"), *overrides]) == 0
    version = MlflowClient().get_model_version("tiny", "1")
    assert version.run_id == run.info.run_id
    runs = mlflow.search_runs(experiment_names=["registry-test"], output_format="list")
    assert [r.info.run_id for r in runs] == [run.info.run_id]  # no second, empty run
