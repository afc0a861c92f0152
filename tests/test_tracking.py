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


RACER = """
import sys, time
from pathlib import Path
from polyinr.training import tracking
from polyinr.core.config import TrackingConfig
cfg = TrackingConfig(sys.argv[1], "e", sys.argv[2], sys.argv[3])
print("ready", flush=True)
go = Path(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
time.sleep(float(sys.argv[5]))
run = tracking.start_run(cfg, params={"who": sys.argv[3]})
tracking.end_run()
print(run.info.run_id, flush=True)
"""


def test_two_first_runs_on_a_fresh_sqlite_store_both_keep_their_run(tmp_path):
    """Two processes start their first run on one fresh SQLite store, 0.4 s apart: both
    finish, and the store holds both runs (one built the store, the other waited for it)."""
    import subprocess
    import sys

    import mlflow

    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, uri, str(tmp_path / "art"), name, str(go), delay],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, delay in (("first", "0"), ("second", "0.4"))
    ]
    for proc in procs:  # both have imported MLflow: the race is the store's creation alone
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    go.touch()
    run_ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        run_ids.append(out.split()[-1])
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = {r.info.run_id: r.data.params["who"] for r in client.search_runs(["0", "1"])}
    assert runs == {run_ids[0]: "first", run_ids[1]: "second"}
