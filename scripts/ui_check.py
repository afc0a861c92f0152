"""The MLflow and Prefect UIs as users look at them: two tiny finished runs (different
train.lr_g) on a local MLflow server, its experiment, compare-runs and run pages; then a local
Prefect server and worker, one run of the deployment train-poly-inr/local logging to that
MLflow server, and its flow-run page (stages, logs, the MLflow run's link). Pages are rendered
by headless Chromium and their content checked against what the REST APIs say they should show.

    python scripts/ui_check.py [--shots docs] [--keep DIR]      (`make ui-check`)

Exits 0 when every check passes, else prints one line per failed check and exits 1.
--shots writes mlflow-experiment.png, mlflow-compare.png and prefect-flow-run.png there
(docs/ holds the README's).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html.parser
import itertools
import json
import os
import re
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
BIN = Path(sys.executable).parent  # the venv's mlflow and prefect
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
# The Prefect part: one run of the deployment train-poly-inr/local, the whole pipeline with
# tests/test_flow.py's tiny overrides (8 images a class, 64 trained at 16 px, 16 evaluated).
FLOW_TINY = [
    "train.stages=[{resolution: 16, kimg: 0.064}]",
    "data.demo_per_class=8",
    "eval.num_samples=16",
    "eval.every_kimg=0.0",
]
FLOW_EXPERIMENT = "ui-check-flow"
STAGES = ("workspace", "demo_data", "class_embeddings", "prepare@0", "train@0 (16px)")
STAGES += ("evaluate", "publish")
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
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


def serve(cmd: list[str], log: Path, health: str, env=None) -> subprocess.Popen:
    """Start a server in a process group of its own, its output in `log`; return once
    `health` answers 200."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + 300  # ~15 s idle, minutes on busy shared cores
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{health} did not answer after 300 s")


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    """An MLflow server on 127.0.0.1 (SQLite store, proxied artifacts under root); its URL."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    return serve(cmd, root / "mlflow-server.log", f"{url}/health"), url


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
    """The visible text of a DOM, one string per text node, the sources of its images and the
    targets of its links."""

    def __init__(self):
        super().__init__()
        self.text, self.images, self.links, self._skip = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")
        if tag == "a":
            self.links.append(dict(attrs).get("href") or "")
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


@contextlib.contextmanager
def devtools(size: str):
    """Headless Chromium with a fresh profile, driven over the DevTools protocol; yields
    `send(method, **params)`, which returns the command's result."""
    from websockets.sync.client import connect  # a dependency of Prefect's

    port = free_port()
    with tempfile.TemporaryDirectory() as profile:
        cmd = [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS]
        cmd += [f"--user-data-dir={profile}", f"--window-size={size}"]
        cmd += [f"--remote-debugging-port={port}", "about:blank"]
        browser = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            targets = json.loads(_get(f"http://127.0.0.1:{port}/json/list", 120))
            (page,) = [t for t in targets if t["type"] == "page"]
            with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                ids = itertools.count()

                def send(method: str, **params):
                    i = next(ids)
                    ws.send(json.dumps({"id": i, "method": method, "params": params}))
                    while (answer := json.loads(ws.recv(timeout=180))).get("id") != i:
                        pass  # an event
                    if "error" in answer:
                        raise RuntimeError(f"chromium: {method}: {answer['error']}")
                    return answer["result"]

                yield send
        finally:
            browser.kill()
            browser.wait()


def _get(url: str, timeout: float) -> bytes:
    """GET `url`, retried until it answers or `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def settled_dom(send, timeout: float = 120) -> str:
    """The page's DOM once its text has not changed for 5 s (the app fetched and drew)."""
    text, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline and time.monotonic() - since < 5:
        time.sleep(0.5)
        now = evaluate(send, "document.body?.innerText")
        if now != text:
            text, since = now, time.monotonic()
    return evaluate(send, "document.documentElement.outerHTML")


def evaluate(send, expression: str):
    """The value of a JavaScript expression in the page."""
    return send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get(
        "value"
    )


def render_tabs(url: str, tabs: list[str], shot: Path | None, size: str) -> dict[str, _Text]:
    """The Prefect UI page at `url` with each of `tabs` (element ids) clicked in turn (a
    `?tab=` in the URL is dropped while the run loads): tab -> the page it shows. `shot`: a
    screenshot of the page as it opens, before any click."""
    pages = {}
    with devtools(size) as send:
        send("Page.navigate", url=url)
        deadline = time.monotonic() + 120  # the tabs are drawn once the run has loaded
        while not evaluate(send, f"!!document.getElementById({json.dumps(tabs[0])})"):
            if time.monotonic() > deadline:
                break  # the checks say what is missing
            time.sleep(0.5)
        settled_dom(send)
        if shot:
            png = send("Page.captureScreenshot", format="png")["data"]
            shot.write_bytes(base64.b64decode(png))
        for tab in tabs:
            evaluate(send, f"document.getElementById({json.dumps(tab)})?.click()")
            pages[tab] = _Text()
            pages[tab].feed(settled_dom(send))
    return pages


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


def prefect_env(root: Path, port: int) -> dict[str, str]:
    """The environment of the Prefect server, CLI and worker (so of the flow run): the
    server's API, Prefect's and the flow runs' state under root, no outside settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "POLYINR_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        POLYINR_WORKSPACES=str(root / "workspaces"),
        POLYINR_DVC_CACHE=str(root / "dvc-cache"),
        PWD=str(ROOT),  # prefect.yaml's pull step runs the flow in {{ $PWD }}: this checkout
    )
    return env


def prefect(env: dict[str, str], *args: str) -> str:
    """Run the Prefect CLI in the checkout; its stdout."""
    cmd = [str(BIN / "prefect"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(
            f"prefect {' '.join(args)} failed: {(proc.stdout + proc.stderr)[-4000:]}"
        )
    return proc.stdout


def api(server: str, endpoint: str, body: dict | None = None):
    """GET (or with a body POST) one Prefect REST endpoint (server/api/...)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{server}/api/{endpoint}", data, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def deployment_run(root: Path, env: dict[str, str], server: str, mlflow: str) -> str:
    """The `local` work pool, deployment and a worker for it, as `scripts/stack.sh up` makes
    them; one run of train-poly-inr/local with the tiny overrides, waited for; its id."""
    overrides = [*FLOW_TINY, f"storage.uri={root / 'checkpoints'}", f"tracking.uri={mlflow}"]
    overrides.append(f"tracking.experiment={FLOW_EXPERIMENT}")
    prefect(env, "work-pool", "create", "local", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--name", "local")
    with (root / "prefect-worker.log").open("w") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "local"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        params = json.dumps({"overrides": overrides, "push": False, "register_as": None})
        out = prefect(env, "deployment", "run", "train-poly-inr/local", "--params", params)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", out)[1]
        deadline = time.monotonic() + 1800  # ~3 min idle; 2 busy shared cores can take 15
        while api(server, f"flow_runs/{run_id}")["state"]["type"] not in FINAL:
            if time.monotonic() > deadline:
                raise RuntimeError(f"flow run {run_id} not finished after 1800 s")
            time.sleep(2)
        return run_id
    finally:
        stop(worker)


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


def check_stages(page: _Text, want: dict) -> list[str]:
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


def check_logs(page: _Text, want: dict) -> list[str]:
    """The Logs tab: the run's first 20 log lines (the tab loads more as it scrolls), as the
    REST API has them: the worker's, the workspace's, the first stages' output."""
    first = [m.split("\n")[0].strip() for m in want["logs"][:20]]
    if len(first) < 20:
        return [f"logs: {len(first)} log lines only"]
    shown = " ".join(page.text)
    return [f"logs: {m[:60]!r} not shown" for m in first if m not in shown]


def check_mlflow_link(page: _Text, want: dict) -> list[str]:
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
    port = free_port()
    env = prefect_env(root, port)
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    ui = f"http://127.0.0.1:{port}"
    server = serve(cmd, root / "prefect-server.log", f"{ui}/api/health", env)
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
