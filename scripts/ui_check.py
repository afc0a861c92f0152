"""The MLflow UI as users look at it: two tiny finished runs (different train.lr_g) on a local
MLflow server, its experiment, compare-runs and run pages rendered by headless Chromium, and
their content checked against what the REST API says they should show.

    python scripts/ui_check.py [--shots docs] [--keep DIR]      (`make ui-check`)

Exits 0 when every check passes, else prints one line per failed check and exits 1.
--shots writes mlflow-experiment.png and mlflow-compare.png there (docs/ holds the README's).
"""

from __future__ import annotations

import argparse
import html.parser
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--run-all-compositor-stages-before-draw",  # else the DOM is dumped before charts draw
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    """An MLflow server on 127.0.0.1 (SQLite store, proxied artifacts under root); its URL."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    log = (root / "mlflow-server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # ~15 s idle, minutes on busy shared cores
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'mlflow-server.log').read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"mlflow server not healthy at {url} after 300 s")


def stop(server: subprocess.Popen) -> None:
    """Stop the server and its workers (its process group): SIGTERM, SIGKILL after 60 s."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


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


class _Text(html.parser.HTMLParser):
    """The visible text of a DOM, one string per text node, and the sources of its images."""

    def __init__(self):
        super().__init__()
        self.text, self.images, self._skip = [], [], 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")
        if tag == "img":
            attrs = dict(attrs)
            self.images.append((attrs.get("alt") or "", attrs.get("src") or ""))

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.text.append(data.strip())


def chromium(url: str, *args: str, size: str = "1400,900") -> str:
    """Run headless Chromium on `url` with a fresh profile; returns its stdout."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS]
        cmd += [f"--user-data-dir={profile}", f"--window-size={size}"]
        cmd += ["--virtual-time-budget=20000", *args, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed on {url}: {proc.stderr[-2000:]}")
    return proc.stdout


def render(url: str, size: str = "1400,900") -> _Text:
    """The page at `url` as Chromium renders it (its DOM after 20 s of virtual time) in a
    window of `size` (charts below the window are not drawn)."""
    page = _Text()
    page.feed(chromium(url, "--dump-dom", size=size))
    return page


def screenshot(url: str, path: Path, size: str = "1400,900") -> None:
    chromium(url, f"--screenshot={path}", size=size)


def _shown(value: float, page: _Text) -> bool:
    """Whether a metric value is on the page, in full (runs table) or to 3 decimals (compare)."""
    return repr(value) in page.text or f"{value:.3f}" in page.text


def check_runs_table(page: _Text, want: dict) -> list[str]:
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


def check_compare(page: _Text, want: dict) -> list[str]:
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


def check_curves(page: _Text, run: dict) -> list[str]:
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


def check_artifact(page: _Text, path: str) -> list[str]:
    """The artifact viewer on a sample grid PNG shows it as an image, not a download."""
    if any(alt == path and src.startswith("blob:") for alt, src in page.images):
        return []
    return [f"artifact: {path} not previewed as an image"]


def run_check(root: Path | None, shots: Path | None) -> list[str]:
    """Start the server, train the runs, render and check the pages; the failed checks."""
    from polyinr.training import tracking

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(root or tmp)
        root.mkdir(parents=True, exist_ok=True)
        server, url = start_mlflow(root)
        try:
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
                shots.mkdir(parents=True, exist_ok=True)
                # Wide enough for the key columns beside the MLflow Assistant panel.
                screenshot(table, shots / "mlflow-experiment.png", "2000,700")
                screenshot(compare, shots / "mlflow-compare.png")
            return failures
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
