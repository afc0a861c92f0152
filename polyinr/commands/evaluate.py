"""The evaluate stage: an exported generator -> metrics JSON, a sample grid, and both logged to
the MLflow run that trained it."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from PIL import Image

from polyinr.evaluation import metrics
from polyinr.model import sampling
from polyinr.model.generator import Generator, load_generator
from polyinr.training import tracking


def run(
    cfg, generator: str | Path, out: str | Path, grid: str | Path, device, progress: bool = True
) -> tuple[dict, dict] | None:
    """Score the generator file (cfg.eval), write the metrics to `out` and the sample grid to
    `grid`, and log them to the generator's MLflow run, if it names one.

    Under torchrun every rank renders and scores its share and rank 0 writes. Returns
    (result, seconds) on rank 0, where seconds says where the time went; None on the others.
    """
    g, meta = load_generator(generator, device)
    _note_shape(cfg.generator, g.cfg, generator)
    result, seconds = metrics.evaluate_generator(cfg, g, meta["resolution"], device, progress)
    if dist.is_initialized() and dist.get_rank() > 0:
        return None
    result["resolution"] = meta["resolution"]
    result["kimg"] = meta["cur_nimg"] / 1000
    result["discriminator_pretrained"] = meta["discriminator_pretrained"]
    result["discriminator_weights"] = meta.get("discriminator_weights", "unrecorded")
    out, grid = Path(out), Path(grid)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    grid.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample_grid(g, cfg.eval)).save(grid)

    if meta.get("mlflow_run_id"):
        with tracking.start_run(cfg.tracking, run_id=meta["mlflow_run_id"]):
            numbers = {k: v for k, v in result.items() if isinstance(v, float | int)}
            tracking.log_metrics({f"eval/{k}": v for k, v in numbers.items()})
            tracking.log_metrics({f"eval_seconds/{k}": v for k, v in seconds.items()})
            tracking.set_tags(
                {
                    "eval.protocol": result["protocol"],
                    "eval.inception_weights": result["inception_weights"],
                    "eval.label": result["label"],
                }
            )
            tracking.log_artifact(out)
            tracking.log_artifact(grid)
    return result, seconds


def sample_grid(g: Generator, eval_cfg: metrics.EvalConfig) -> np.ndarray:
    """The stage's picture: eval.grid_seeds seeds (columns) of each of the first
    eval.grid_classes classes (rows) at eval.grid_psi, as one uint8 (H, W, 3) image."""
    e = eval_cfg
    rows = min(e.grid_classes, g.cfg.num_classes)
    classes = [c for c in range(rows) for _ in range(e.grid_seeds)]
    seeds = list(range(e.grid_seeds)) * rows
    return sampling.grid(g, classes, seeds, e.grid_psi, rows=rows)


def _note_shape(params, stored, path) -> None:
    """Say so when params.yaml's generator section differs from the generator file's: the
    file wins (it is what was trained), and the log shows which values were ignored."""
    differ = [
        f"{f.name}={getattr(stored, f.name)} (params: {getattr(params, f.name)})"
        for f in dataclasses.fields(stored)
        if getattr(stored, f.name) != getattr(params, f.name)
    ]
    if differ:
        print(
            f"note: the generator's shape comes from {path}: {', '.join(differ)}", file=sys.stderr
        )
