"""`polyinr runs`: every run in storage.uri and in the tracking store, one line each.

A run's checkpoint folder and its MLflow run share a name (tracking.run_name), so the two
listings join on it: status from MLflow, progress and the best FID from the checkpoints' JSON
records (what a resume would start from), MLflow's numbers where there are no checkpoints.
"""

from __future__ import annotations

import datetime
import json
import sys

from polyinr.core.errors import StorageError
from polyinr.core.storage import Folder
from polyinr.training import tracking
from polyinr.training.checkpoints import CheckpointStore

COLUMNS = ("run", "status", "started", "kimg", "best fid", "eval fid", "checkpoints")


def collect(cfg) -> tuple[list[dict], list[str]]:
    """(runs, problems): tracked runs newest first, each joined with its checkpoint folder
    (the newest run of a name gets it), then folders that no tracked run names. A source that
    cannot be read is a problem (one line), and the other is still listed."""
    problems, stored = [], {}
    try:
        for name in Folder(cfg.storage, "").subfolders():
            summary = CheckpointStore(cfg.storage, name).summary()
            if summary is not None:
                stored[name] = summary
    except StorageError as e:
        problems.append(f"storage.uri {cfg.storage.uri}: {e}")
    tracked = []
    try:
        tracked = tracking.list_runs(cfg.tracking)
    except Exception as e:  # MLflow raises many kinds (bad URI, server down, schema)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        problems.append(f"tracking.uri {cfg.tracking.uri}: {type(e).__name__}: {first}")
    runs, joined = [], set()
    for row in tracked:
        name = row["run_name"]
        store = stored.get(name) if name not in joined else None
        joined.add(name)
        runs.append({"name": name, "tracking": row, "storage": store})
    runs += [
        {"name": name, "tracking": None, "storage": store}
        for name, store in sorted(stored.items())
        if name not in joined
    ]
    return runs, problems


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_row(run: dict) -> dict[str, str]:
    """The printed cells of one run (see COLUMNS)."""
    tracked, store = run["tracking"] or {}, run["storage"]
    started = tracked.get("start")
    cells = {
        "run": run["name"] or "-",
        "status": tracked.get("status", "untracked").lower(),
        "started": datetime.datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M")
        if started
        else "-",
        "kimg": _number(store["latest"]["kimg"] if store else tracked.get("kimg"), 3),
        "best fid": "-",
        "eval fid": _number(tracked.get("eval_fid"), 2),
        "checkpoints": "-",
    }
    if store and "best" in store:
        best = store["best"]
        cells["best fid"] = f"{best['fid']:.2f} (stage {best['stage']}, kimg {best['kimg']:g})"
    elif tracked.get("best_fid"):
        best = tracked["best_fid"]
        cells["best fid"] = f"{best['value']:.2f} ({best['metric']}, kimg {best['kimg']:g})"
    if store:
        latest = store["latest"]
        where = f"stage {latest['stage']}, " if "stage" in latest else ""
        cells["checkpoints"] = (
            f"{store['uri']} ({store['checkpoints']}, {where}latest {latest['name']})"
        )
    return cells


def format_table(runs: list[dict]) -> str:
    """A header and one aligned line per run; the last column is not padded."""
    rows = [{c: c.upper() for c in COLUMNS}] + [table_row(r) for r in runs]
    widths = {c: max(len(row[c]) for row in rows) for c in COLUMNS[:-1]}
    return "\n".join(
        "  ".join([*(row[c].ljust(widths[c]) for c in COLUMNS[:-1]), row[COLUMNS[-1]]])
        for row in rows
    )


def main(cfg, as_json: bool = False) -> int:
    """Print the runs (a table, or one JSON object a line); problems go to stderr, one line
    each. Returns 1 when neither source could be read, else 0."""
    runs, problems = collect(cfg)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if as_json:
        for run in runs:
            print(json.dumps(run))
    elif runs:
        print(format_table(runs))
    else:
        print(
            f"no runs in {cfg.storage.uri} nor in {cfg.tracking.uri} (experiment "
            f"{cfg.tracking.experiment})",
            file=sys.stderr,
        )
    return 1 if len(problems) == 2 else 0
