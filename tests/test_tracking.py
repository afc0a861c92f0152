"""MLflow helpers: a run's link says where to look. (Registering the generator is
polyinr.commands.registry's, tested in tests/test_registry.py.)"""

from polyinr.core.config import TrackingConfig
from polyinr.training import tracking


def test_run_url_names_the_store_and_the_run(tmp_path):
    cfg = TrackingConfig(
        uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="e",
        artifact_location=str(tmp_path / "artifacts"),
        run_name="r",
    )
    run_id = tracking.start_run(cfg).info.run_id
    tracking.end_run()
    link = tracking.run_url(cfg, run_id)
    assert cfg.uri in link and run_id in link  # a local store: where and which run


def test_a_kill_while_the_sqlite_store_is_created_leaves_no_broken_store(tmp_path):
    """SIGKILL while MLflow creates a SQLite store leaves no half-migrated store."""
    import signal
    import subprocess
    import sys
    import time

    db = tmp_path / "mlflow.db"
    cfg = TrackingConfig(f"sqlite:///{db}", "e", str(tmp_path / "artifacts"), "r")
    code = f"from polyinr.training import tracking; tracking.start_run(tracking.{cfg!r})"
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".mlflow.db.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not db.exists()
    run_id = tracking.start_run(cfg).info.run_id
    tracking.end_run()
    assert run_id in tracking.run_url(cfg, run_id) and db.is_file()
    assert not list(tmp_path.glob(".mlflow.db.*.tmp"))
