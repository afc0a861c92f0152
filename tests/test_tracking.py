"""MLflow helpers: registering the final generator is idempotent per run and metrics, and a
run's link says where to look."""

from polyinr import tracking


def test_register_model_adds_a_version_only_when_run_or_metrics_change(tmp_path):
    """The same run with the same tags returns its existing version; new metrics (a longer
    training of the same run) make a new version holding the file."""
    import mlflow

    cfg = tracking.TrackingConfig(
        uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="e",
        artifact_location=str(tmp_path / "artifacts"),
        run_name="r",
    )
    run_id = tracking.start_run(cfg).info.run_id
    tracking.end_run()
    generator = tmp_path / "generator.pt"
    generator.write_bytes(b"weights")

    first = tracking.register_model(cfg, run_id, generator, "g", {"eval.fid": "3.5"})
    again = tracking.register_model(cfg, run_id, generator, "g", {"eval.fid": "3.5"})
    longer = tracking.register_model(cfg, run_id, generator, "g", {"eval.fid": "2.5"})
    assert (first, again, longer) == ("1", "1", "2")
    version = mlflow.MlflowClient().get_model_version("g", longer)
    assert version.run_id == run_id and version.tags["eval.fid"] == "2.5"
    assert version.source == f"runs:/{run_id}/model"
    files = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "model")]
    assert files == ["model/generator.pt"]

    link = tracking.run_url(cfg, run_id)
    assert cfg.uri in link and run_id in link  # a local store: where and which run
