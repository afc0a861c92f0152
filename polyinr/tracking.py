"""MLflow runs: one run per training, continued on resume and by evaluation (mlflow lives here)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where runs are logged: a tracking URI (SQLite file or server), experiment, run name."""

    uri: str
    experiment: str
    artifact_location: str
    run_name: str


def _connect(cfg: TrackingConfig):
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(cfg.uri)
    return mlflow


def start_run(cfg: TrackingConfig, run_id: str | None = None, params: dict | None = None):
    """Start (or, given run_id, continue) a run; returns the active run to use as a context."""
    mlflow = _connect(cfg)
    if run_id is not None:
        return mlflow.start_run(run_id=run_id)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        # A local artifact folder beside a local database; servers choose their own.
        local = not cfg.uri.startswith(("http://", "https://", "databricks"))
        location = Path(cfg.artifact_location).resolve().as_uri() if local else None
        experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = mlflow.start_run(experiment_id=experiment_id, run_name=cfg.run_name)
    if params:
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
    return run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Numbers of the active run at `step` (cur_nimg, images seen, for training curves)."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


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
