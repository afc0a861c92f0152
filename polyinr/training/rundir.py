"""A training run's local folder: the exported generator, the curves and the event log.

The checkpoints live in `<storage.uri>/<run_name>` (polyinr/training/checkpoints.py); this folder
holds what training writes for people and for the tools that follow it: the curves as CSV and
as `curves.png`, the latest sample grid as `grid.png` (no UI needed to look), and
`events.jsonl`, the run's history, one JSON object a line, appended by every session: the
Prefect flow and MLflow read it instead of the log's text.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np

from polyinr.core.storage import write_atomic

DEFAULT = Path("run")  # `polyinr train --run-dir`'s default; dvc.yaml's `train` outs live here
# What training says, in order: run_started, stage_started, [fid], checkpoint, ..., stage_done,
# then exported (the whole schedule) or already_complete / preempted.
EVENTS = (
    "run_started",
    "stage_started",
    "fid",
    "checkpoint",
    "stage_done",
    "already_complete",
    "preempted",
    "exported",
)


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run folder, and its event log."""

    path: Path

    @property
    def generator(self) -> Path:
        """The final EMA generator (load with generator.load_generator)."""
        return self.path / "generator.pt"

    @property
    def train_curve(self) -> Path:
        """Losses and D's accuracy per snapshot (a DVC plot)."""
        return self.path / "train.csv"

    @property
    def fid_curve(self) -> Path:
        """The FID during training (eval.every_kimg), a DVC plot."""
        return self.path / "fid.csv"

    @property
    def curves_png(self) -> Path:
        """Losses, D's accuracy and the FID against kimg, as a picture."""
        return self.path / "curves.png"

    @property
    def grid_png(self) -> Path:
        """The latest sample grid of training (train.sample_kimg)."""
        return self.path / "grid.png"

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    def write_grid(self, image: np.ndarray) -> None:
        """Replace grid.png with a uint8 (H, W, 3) image."""
        from PIL import Image

        self.path.mkdir(parents=True, exist_ok=True)
        with write_atomic(self.grid_png) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")

    def write_curves_png(self, history: list[dict]) -> None:
        """Replace curves.png with the curve rows `history` (train.csv's, FIDs included):
        losses, D's accuracy on reals and fakes and, when measured, the FID, against kimg;
        dotted lines where a progressive stage starts."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no display

        fid_keys = sorted({k for row in history for k in row if k.startswith("fid")})
        panels = [("loss", ("loss_g", "loss_d")), ("D accuracy", ("acc_real", "acc_fake"))]
        panels += [("FID", tuple(fid_keys))] if fid_keys else []
        fig = Figure(figsize=(6, 2.2 * len(panels)), layout="constrained")
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        starts = [b["kimg"] for a, b in itertools.pairwise(history) if b["stage"] != a["stage"]]
        for ax, (title, keys) in zip(axes, panels, strict=True):
            for key in keys:
                rows = [r for r in history if r.get(key) is not None]
                if rows:
                    x, y = [r["kimg"] for r in rows], [r[key] for r in rows]
                    ax.plot(x, y, marker="." if len(rows) < 50 else None, label=key)
            for kimg in starts:
                ax.axvline(kimg, color="grey", linestyle=":", linewidth=1)
            ax.set_ylabel(title)
            ax.legend(loc="best", fontsize="small")
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("kimg")
        self.path.mkdir(parents=True, exist_ok=True)
        with write_atomic(self.curves_png) as tmp:
            fig.savefig(tmp, format="png", dpi=100)

    def emit(self, event: str, **fields) -> dict:
        """Append one event (with its wall-clock time) to events.jsonl; returns the record."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; events are {EVENTS}")
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self.path.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, allow_nan=False) + "\n"
        # One write of one line in append mode: a reader sees whole lines, a crash loses at
        # most the last one.
        if self.offset():
            with self.events.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line  # end the line a killed process left half-written
        with self.events.open("ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        return record

    def offset(self) -> int:
        """Where the next event will start: read_events(offset) then gives only the new ones."""
        return self.events.stat().st_size if self.events.is_file() else 0

    def read_events(self, offset: int = 0) -> list[dict]:
        """The events from byte `offset` on, oldest first; a torn last line is left out."""
        if not self.events.is_file():
            return []
        with self.events.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode().split("\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the empty tail, or a line a killed process left half-written
        return out
