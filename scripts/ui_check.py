"""The MLflow and Prefect UIs as users look at them: two tiny finished runs (different
train.lr_g) on a local MLflow server, its experiment, compare-runs and run pages; then a local
Prefect server and worker, one run of the deployment train-poly-inr/local logging to that
MLflow server, and its flow-run page (stages, logs, the MLflow run's link). Pages are rendered
by headless Chromium and their content checked against what the REST APIs say they should show.

    python scripts/ui_check.py [--shots docs] [--keep DIR]      (`make ui-check`)

Exits 0 when every check passes, else prints one line per failed check and exits 1.
--shots writes mlflow-experiment.png, mlflow-compare.png and prefect-flow-run.png there
(docs/ holds the README's). Chromium is driven by scripts/browser.py; the servers are started
by scripts/ui_servers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from browser import PageText, render, render_tabs, screenshot
from ui_servers import ROOT, api, deployment_run, start_mlflow, start_prefect, stop

LEARNING_RATES = ("0.0002", "0.002")  # train.lr_g of the two runs
EXPERIMENT = "ui-check"
# A demo of a few dozen images: 2 classes x 16 at 24 px, trained 64 images at 16 px.
TINY = [
    "data.demo_classes=2",
    "data.demo_per_class=16",
    "data.demo_size=24",
    "data.workers=1",
    "generator.num_classes=2",
    "generator.hidden=16",
    "generator.w_dim=16",
    "generator.z_dim=8",
    "generator.levels=3",
    "discriminator.proj_channels=4",
    "discriminator.head_channels=8",
    "discriminator.cmap_dim=8",
    "discriminator.input_size=16",
    "train.embed_init=null",
    "train.stages=[{resolution: 16, kimg: 0.064}]",
    "train.batch=8",
    "train.snapshot_kimg=0.016",
    "train.sample_kimg=0.032",
    "train.workers=1",
    "eval.every_kimg=0.0",
]
STAGES = ("workspace", "demo_data", "class_embeddings", "prepare@0", "train@0 (16px)")
STAGES += ("evaluate", "publish")


def train_runs(root: Path, server: str) -> None:
    """Prepare the tiny demo data and train one run per learning rate, logging to `server`."""
    import torch

    from polyinr import data
    from polyinr.core import config
    from polyinr.training.run import train

    torch.set_num_threads(1)
    base = [*TINY, f"data.source={root / 'demo'}", f"data.out_dir={root / 'ffcv'}"]
    base += [f"storage.uri={root / 'checkpoints'}", f"tracking.uri={server}"]
    base += [f"tracking.experiment={EXPERIMENT}"]
    cfg = config.load(ROOT / "params.yaml", base)
    d = cfg.data
    data.make_demo_dataset(Path(d.source), d.demo_classes, d.demo_per_class, d.demo_size, 0)
    data.prepare(d, [16], progress=False)
    for lr in LEARNING_RATES:
        overrides = [*base, f"train.lr_g={lr}", f"tracking.run_name=lr_g-{lr}"]
        cfg = config.load(ROOT / "params.yaml", overrides)
        train(cfg, torch.device("cpu"), root / f"run-{lr}", progress=False)


def rest(server: str, endpoint: str, **query) -> dict:
    """GET one MLflow REST endpoint (api/2.0/mlflow/...)."""
    url = f"{server}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def expected(server: str) -> dict:
    """What the pages should show, from the REST API: the experiment id and, per run, its
    name, params, final metrics, metric steps and artifact files."""
    experiment = rest(server, "experiments/get-by-name", experiment_name=EXPERIMENT)
    experiment_id = experiment["experiment"]["experiment_id"]
    body = json.dumps({"experiment_ids": [experiment_id]}).encode()
    request = urllib.request.Request(
        f"{server}/api/2.0/mlflow/runs/search", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        found = json.loads(r.read())["runs"]
    runs = []
    for run in found:
        run_id = run["info"]["run_id"]
        history = rest(server, "metrics/get-history", run_id=run_id, metric_key="loss/g")
        images = rest(server, "artifacts/list", run_id=run_id, path="images")
        runs.append(
            {
                "id": run_id,
                "name": run["info"]["run_name"],
                "status": run["info"]["status"],
                "params": {p["key"]: p["value"] for p in run["data"]["params"]},
                "metrics": {m["key"]: m["value"] for m in run["data"]["metrics"]},
                "loss_steps": sorted(m["step"] for m in history["metrics"]),
                "images": [f["path"] for f in images.get("files", [])],
            }
        )
    return {"experiment_id": experiment_id, "runs": runs}


def _shown(value: float, page: PageText) -> bool:
    """Whether a metric value is on the page, in full (runs table) or to 3 decimals (compare)."""
    return repr(value) in page.text or f"{value:.3f}" in page.text


def check_runs_table(page: PageText, want: dict) -> list[str]:
    """The experiment's runs table, opened by tracking.view_url: each run with its dataset
    input and the key metrics as columns, with the run's final values."""
    failures = []
    if "Training runs" not in page.text and "Runs" not in page.text:
        failures.append("runs table: the page is not the runs table (GenAI overview?)")
    for key in ("loss/g", "loss/d"):
        if key not in page.text:
            failures.append(f"runs table: no {key} column")
    for run in want["runs"]:
        if run["name"] not in page.text:
            failures.append(f"runs table: run {run['name']} not listed")
        for key in ("loss/g", "loss/d"):
            if not _shown(run["metrics"][key], page):
                failures.append(f"runs table: {run['name']}'s final {key} not shown")
    if not any(t.startswith("demo-16px (") for t in page.text):
        failures.append("runs table: no dataset input demo-16px (digest) in the Dataset column")
    return failures


def check_compare(page: PageText, want: dict) -> list[str]:
    """The compare-runs page: both runs, train.lr_g with each run's value, the final losses."""
    failures = []
    text = page.text
    for run in want["runs"]:
        if run["name"] not in text:
            failures.append(f"compare: run {run['name']} not listed")
        if not _shown(run["metrics"]["loss/g"], page):
            failures.append(f"compare: {run['name']}'s final loss/g not shown")
    values = [run["params"]["train.lr_g"] for run in want["runs"]]
    rows = [i for i, t in enumerate(text) if t == "train.lr_g"]
    if not any(text[i + 1 : i + 1 + len(values)] == values for i in rows):
        failures.append(f"compare: no parameter row train.lr_g | {' | '.join(values)}")
    if "Parallel Coordinates Plot" not in text:
        failures.append("compare: no parallel coordinates plot")
    return failures


def check_curves(page: PageText, run: dict) -> list[str]:
    """A run's model-metrics tab: the losses charted against steps (images seen) in their
    own group, where the REST API holds several steps."""
    failures = []
    if len(run["loss_steps"]) < 2:
        failures.append(f"curves: {run['name']} has loss/g at steps {run['loss_steps']} only")
    if "loss" not in page.text or f"{run['name']} (loss/g)" not in page.text:
        failures.append(f"curves: {run['name']}: no loss/g chart in a loss group")
    if "Step" not in page.text:
        failures.append(f"curves: {run['name']}: no chart against Step")
    return failures


def check_artifact(page: PageText, path: str) -> list[str]:
    """The artifact viewer on a sample grid PNG shows it as an image, not a download."""
    if any(alt == path and src.startswith("blob:") for alt, src in page.images):
        return []
    return [f"artifact: {path} not previewed as an image"]


def flow_run_expected(server: str, run_id: str, mlflow: str) -> dict:
    """What the flow-run page should show, from the REST APIs: the run's state, its task runs'
    names and states, its log messages, the MLflow run its `mlflow-run` artifact links to."""
    run = {"flow_runs": {"id": {"any_": [run_id]}}}
    tasks = api(server, "task_runs/filter", run)
    logs = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    artifacts = api(server, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    link = next((a["data"] for a in artifacts if a["key"] == "mlflow-run"), "")
    url = re.search(r"\]\((http[^)]+)\)$", link)
    mlflow_run = re.search(r"/runs/([0-9a-f]{32})", url[1]) if url else None
    status = None
    if mlflow_run and url[1].startswith(mlflow):
        status = rest(mlflow, "runs/get", run_id=mlflow_run[1])["run"]["info"]["status"]
    return {
        "id": run_id,
        "state": api(server, f"flow_runs/{run_id}")["state"]["type"],
        "tasks": {t["name"]: t["state"]["name"] for t in tasks},
        "logs": [log["message"] for log in api(server, "logs/filter", logs)],
        "mlflow_link": url[1] if url else None,
        "mlflow_status": status,
    }


def check_stages(page: PageText, want: dict) -> list[str]:
    """The Task Runs tab: every stage of the pipeline listed with its state, Completed."""
    failures = [] if want["state"] == "COMPLETED" else [f"flow run: {want['state']}"]
    for stage in STAGES:  # workspace and publish are named by Prefect: workspace-c0d
        name = next((n for n in want["tasks"] if n == stage or n.startswith(f"{stage}-")), None)
        if name is None:
            failures.append(f"task runs: no task run {stage}")
            continue
        if want["tasks"][name] != "Completed":
            failures.append(f"task runs: {name} is {want['tasks'][name]}")
        rows = [i for i, t in enumerate(page.text) if t == name]
        if not any("Completed" in page.text[i + 1 : i + 4] for i in rows):
            failures.append(f"task runs: {name} not listed as Completed")
    return failures


def check_logs(page: PageText, want: dict) -> list[str]:
    """The Logs tab: the run's first 20 log lines (the tab loads more as it scrolls), as the
    REST API has them: the worker's, the workspace's, the first stages' output."""
    first = [m.split("\n")[0].strip() for m in want["logs"][:20]]
    if len(first) < 20:
        return [f"logs: {len(first)} log lines only"]
    shown = " ".join(page.text)
    return [f"logs: {m[:60]!r} not shown" for m in first if m not in shown]


def check_mlflow_link(page: PageText, want: dict) -> list[str]:
    """The Artifacts tab: the `mlflow-run` link to the MLflow run's page, whose run finished."""
    link = want["mlflow_link"]
    if link is None:
        return ["artifacts: no mlflow-run link artifact to an MLflow server page"]
    failures = [] if link in page.links else [f"artifacts: no link to {link}"]
    if want["mlflow_status"] != "FINISHED":
        failures.append(f"artifacts: the linked MLflow run is {want['mlflow_status']}")
    return failures


def prefect_check(root: Path, mlflow: str, shots: Path | None) -> list[str]:
    """A Prefect server and worker, one deployment run to its end; its flow-run page rendered
    (Logs, Task Runs, Artifacts tabs) and checked; the failed checks."""
    server, ui, env = start_prefect(root)
    try:
        run_id = deployment_run(root, env, ui, mlflow)
        want = flow_run_expected(ui, run_id, mlflow)
        shot = shots / "prefect-flow-run.png" if shots else None
        tabs = ["logs", "task-runs", "artifacts"]
        pages = render_tabs(f"{ui}/runs/flow-run/{run_id}", tabs, shot, "1400,1100")
        failures = check_logs(pages["logs"], want)
        failures += check_stages(pages["task-runs"], want)
        failures += check_mlflow_link(pages["artifacts"], want)
        return failures
    finally:
        stop(server)


def mlflow_check(root: Path, url: str, shots: Path | None) -> list[str]:
    """Train the two runs, render and check the MLflow pages; the failed checks."""
    from polyinr.training import tracking

    train_runs(root, url)
    want = expected(url)
    done = [r for r in want["runs"] if r["status"] == "FINISHED"]
    failures = [f"run {r['name']} is {r['status']}" for r in want["runs"] if r not in done]
    if len(want["runs"]) != len(LEARNING_RATES):
        return [f"{len(want['runs'])} runs in {EXPERIMENT}, not {len(LEARNING_RATES)}"]
    eid = want["experiment_id"]
    table = tracking.view_url(url, eid)
    ids = json.dumps([r["id"] for r in want["runs"]])
    compare = f"{url}/#/compare-runs?runs={urllib.parse.quote(ids)}"
    compare += f"&experiments={urllib.parse.quote(json.dumps([eid]))}"
    failures += check_runs_table(render(table), want)
    failures += check_compare(render(compare), want)
    for run in want["runs"]:
        page = f"{url}/#/experiments/{eid}/runs/{run['id']}"
        curves = render(f"{page}/model-metrics?{tracking.ML_WORKFLOW}", "1400,4000")
        failures += check_curves(curves, run)
        png = next((p for p in run["images"] if p.endswith(".png")), None)
        if png is None:
            failures.append(f"artifact: {run['name']} logged no sample grid PNG")
            continue
        viewer = render(f"{page}/artifacts/{png}?{tracking.ML_WORKFLOW}")
        failures += check_artifact(viewer, png)
    if shots:
        # Wide enough for the key columns beside the MLflow Assistant panel.
        screenshot(table, shots / "mlflow-experiment.png", "2000,700")
        screenshot(compare, shots / "mlflow-compare.png")
    return failures


def run_check(root: Path | None, shots: Path | None) -> list[str]:
    """Start the MLflow server, check its pages, then Prefect's flow-run page of a deployment
    run logging to it; the failed checks."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(root or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if shots:
            shots.mkdir(parents=True, exist_ok=True)
        server, url = start_mlflow(root)
        try:
            return mlflow_check(root, url, shots) + prefect_check(root, url, shots)
        finally:
            stop(server)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=Path, help="write the pages' screenshots here")
    parser.add_argument("--keep", type=Path, help="keep the server's data in this folder")
    args = parser.parse_args(argv)
    failures = run_check(args.keep, args.shots)
    for line in failures:
        print(f"ui-check: FAILED {line}")
    print("ui-check: " + (f"{len(failures)} checks failed" if failures else "all checks passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    sys.exit(main())
