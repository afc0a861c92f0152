"""MLflow runs: one run per training, continued on resume and by evaluation (mlflow lives here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from polyinr.core.config import TrackingConfig
from polyinr.core.storage import write_atomic


def _connect(cfg: TrackingConfig):
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if cfg.uri.startswith("sqlite:///"):
        _create_sqlite_store(Path(cfg.uri[len("sqlite:///") :]))
    mlflow.set_tracking_uri(cfg.uri)
    return mlflow


def _create_sqlite_store(path: Path) -> None:
    """Create a missing SQLite store under a temporary name, then rename it into place.

    MLflow builds a new store in a series of migrations; a process killed in the middle left
    a store that no later run could open ("duplicate column name"), found by a fault campaign.
    One process builds it, under an exclusive lock on `.<name>.lock` beside it: another first
    run waits, then finds the store. So a temporary file seen while holding the lock is a
    killed builder's, never a live one's, and only then is it removed.
    """
    if path.exists():
        return
    import fcntl

    import mlflow

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if path.exists():  # built by the process that held the lock before us
            return
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # from a process killed here
            stale.unlink(missing_ok=True)
        with write_atomic(path) as tmp:
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # migrates


def _experiment_id(mlflow, cfg: TrackingConfig) -> str:
    """The id of experiment cfg.experiment, created if missing (by us or a concurrent run)."""
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    # A local artifact folder beside a local database; servers choose their own.
    local = not cfg.uri.startswith(("http://", "https://", "databricks"))
    location = Path(cfg.artifact_location).resolve().as_uri() if local else None
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=location)
    except MlflowException:
        experiment = mlflow.get_experiment_by_name(cfg.experiment)  # another run made it first
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(cfg: TrackingConfig, run_id: str | None = None, params: dict | None = None):
    """Start (or, given run_id, continue) a run; returns the active run to use as a context."""
    mlflow = _connect(cfg)
    if run_id is not None:
        return mlflow.start_run(run_id=run_id)
    run = mlflow.start_run(experiment_id=_experiment_id(mlflow, cfg), run_name=cfg.run_name)
    if params:
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
    return run


PREVIOUS_RUN_TAG = "polyinr.previous_run_id"


def continue_run(cfg: TrackingConfig, run_id: str, params: dict | None = None):
    """Continue run `run_id`; if this tracking store never saw it (a checkpoint resumed on
    another host), start a new run tagged with the old id and say so in one line."""
    mlflow = _connect(cfg)
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = start_run(cfg, params=params)
        mlflow.set_tag(PREVIOUS_RUN_TAG, run_id)
        print(
            f"MLflow run {run_id} of the checkpoint is not in {cfg.uri}: logging to new run "
            f"{run.info.run_id} (tag {PREVIOUS_RUN_TAG}={run_id})",
            file=sys.stderr,
        )
        return run
    return mlflow.start_run(run_id=run_id)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Numbers of the active run at `step` (cur_nimg, images seen, for training curves)."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_event(record: dict) -> None:
    """What MLflow keeps of a training event (polyinr/training/rundir.py): a checkpoint's curve
    row and
    a FID as metrics at step = images seen, a stage's starting point as a tag."""
    event = record["event"]
    if event == "checkpoint":
        log_metrics(record["metrics"], step=record["nimg"])
    elif event == "fid":
        log_metrics({record["metric"]: record["value"]}, step=record["nimg"])
    elif event == "stage_started" and record["stage"] > 0:
        set_tags({f"stage{record['stage']}.start": record["start"]})


def log_image(image: np.ndarray, key: str, step: int) -> None:
    """A uint8 (H, W, 3) image, step-indexed so the MLflow UI can page through it."""
    import mlflow

    mlflow.log_image(image, key=key, step=step)


def log_artifact(path: str | Path, folder: str | None = None) -> None:
    """A file (a sample grid, a metrics file) or a folder of files of the active run."""
    import mlflow

    if Path(path).is_dir():
        mlflow.log_artifacts(
            str(path), artifact_path="/".join(filter(None, [folder, Path(path).name]))
        )
    else:
        mlflow.log_artifact(str(path), artifact_path=folder)


def set_tags(tags: dict[str, str]) -> None:
    """Labels of the active run, e.g. whether weights were random."""
    import mlflow

    mlflow.set_tags(tags)


def end_run(status: str = "FINISHED") -> None:
    """Close the active run, if any, as FINISHED, FAILED or KILLED (it can be continued later)."""
    import mlflow

    mlflow.end_run(status=status)


def run_url(cfg: TrackingConfig, run_id: str) -> str:
    """Where a person looks at the run: the UI page on a server, else the store and run id."""
    import mlflow

    _connect(cfg)
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    if cfg.uri.startswith(("http://", "https://")):
        return f"{cfg.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{cfg.uri} experiment {experiment_id} run {run_id} (`mlflow ui --backend-store-uri`)"
