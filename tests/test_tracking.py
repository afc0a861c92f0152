"""MLflow helpers: a run's link says where to look. (Registering the generator is
polyinr.registry's, tested in tests/test_registry.py.)"""

from polyinr import tracking


def test_run_url_names_the_store_and_the_run(tmp_path):
    cfg = tracking.TrackingConfig(
        uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="e",
        artifact_location=str(tmp_path / "artifacts"),
        run_name="r",
    )
    run_id = tracking.start_run(cfg).info.run_id
    tracking.end_run()
    link = tracking.run_url(cfg, run_id)
    assert cfg.uri in link and run_id in link  # a local store: where and which run
