"""The servers scripts/ui_check.py looks at, on 127.0.0.1: an MLflow server, a Prefect server,
its `local` work pool, deployment and worker, and one deployment run of train-poly-inr/local."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's mlflow and prefect
# The Prefect part: one run of the deployment train-poly-inr/local, the whole pipeline with
# tests/test_flow.py's tiny overrides (8 images a class, 64 trained at 16 px, 16 evaluated).
FLOW_TINY = [
    "train.stages=[{resolution: 16, kimg: 0.064}]",
    "data.demo_per_class=8",
    "eval.num_samples=16",
    "eval.every_kimg=0.0",
]
FLOW_EXPERIMENT = "ui-check-flow"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


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


def start_prefect(root: Path) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """A Prefect server on 127.0.0.1 (its state under root); its URL and the environment
    that speaks to it (prefect_env)."""
    port = free_port()
    env = prefect_env(root, port)
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    ui = f"http://127.0.0.1:{port}"
    return serve(cmd, root / "prefect-server.log", f"{ui}/api/health", env), ui, env


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
