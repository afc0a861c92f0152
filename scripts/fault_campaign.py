"""A seeded, randomised fault campaign against `polyinr train` with checkpoints on S3.

Each trial trains a tiny config (16 px, 48 images, a checkpoint every 8) through
scripts/fault_proxy.py in front of a real S3 server (moto on loopback). Every run but the
last is interrupted at a random moment (start-up, a step, an upload) by SIGKILL or SIGTERM;
every run, the last too, meets 1-3 random S3 faults (dropped connections, bodies cut in half,
503 SlowDown, slow answers) on random verbs and keys; now and then a rerun gets a fresh MLflow
store, as on another host. Reported per trial and in total:

  * commits lost: a rerun that resumed from an older checkpoint than the last one committed
    (latest.json when the previous run died), or started over although one was committed;
  * bit-identical: the final EMA generator's sha256 equals an uninterrupted, fault-free run's;
  * failures: a run that exited otherwise than 0, 143 (SIGTERM) or -9 (SIGKILL).

    python scripts/fault_campaign.py --trials 50 --seed 0 --out fault-campaign.json

Trials run one at a time. Each run is forked from a server process that has already imported
torch, MLflow, boto3 and polyinr (multiprocessing's forkserver), so its random moments fall in
start-up after the imports (tests/test_faults.py covers SIGTERM during the imports); on a busy
2-core machine the imports alone took minutes. NUMBA_DISABLE_JIT=1 skips ffcv's numba
compilation in every run; --jit keeps it.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fault_proxy import KINDS, Fault, FaultProxy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's polyinr, in the forked runs too

from polyinr.training.rundir import RunDir  # noqa: E402  (after the path above)

BUCKET = "campaign"
KIMG, SNAPSHOT_NIMG = 0.048, 8


def tiny_overrides(root: Path) -> list[str]:
    """The tiny Poly-INR schedule (as tests/test_train.py's) with checkpoints on S3."""
    return [
        f"data.source={root / 'demo'}",
        f"data.out_dir={root / 'ffcv'}",
        "data.workers=1",
        "generator.num_classes=2",
        "generator.hidden=16",
        "generator.w_dim=16",
        "generator.z_dim=8",
        "generator.levels=3",
        "discriminator.proj_channels=4",
        "discriminator.head_channels=8",
        "discriminator.cmap_dim=8",
        "discriminator.blur_kimg=0.016",
        "discriminator.input_size=16",
        "train.embed_init=null",
        f"train.stages=[{{resolution: 16, kimg: {KIMG}}}]",
        "train.batch=8",
        f"train.snapshot_kimg={SNAPSHOT_NIMG / 1000}",
        "train.sample_kimg=1.0",
        "train.workers=1",
        "eval.every_kimg=0.0",
        "storage.keep=2",
        "storage.retries=4",
        f"storage.staging_dir={root / 'staging'}",
    ]


def prepare(root: Path, env: dict) -> None:
    """The demo dataset (2 classes x 8 images) as an FFCV file at 16 px, by the CLI."""
    sizes = ["data.demo_classes=2", "data.demo_per_class=8", "data.demo_size=24"]
    for command in (["demo-data", str(root / "demo")], ["prepare", "--quiet"]):
        cmd = [sys.executable, "-m", "polyinr", *command, "--params", str(REPO / "params.yaml")]
        subprocess.run(cmd + tiny_overrides(root) + sizes, env=env, check=True, cwd=root)


def random_faults(rng: random.Random, run_name: str) -> list[Fault]:
    """1-3 faults on this run's objects; each hits at most 2 requests (storage.retries=4)."""
    keys = [r"\.pt", r"\.json", r"latest\.json", r"snapshot-", ""]
    faults = []
    for _ in range(rng.randint(1, 3)):
        faults.append(
            Fault(
                kind=rng.choice(KINDS),
                verb=rng.choice(["GET", "PUT", "POST", "DELETE", "HEAD", "*"]),
                key=f"/{run_name}/.*{rng.choice(keys)}",
                times=rng.randint(1, 2),
                skip=rng.randint(0, 8),
                delay=rng.uniform(0.5, 3.0),
            )
        )
    return faults


class Campaign:
    """The S3 server, the proxy in front of it, and the command that trains a run."""

    def __init__(self, root: Path, jit: bool):
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self.root = root
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.proxy = FaultProxy(self.endpoint)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            "AWS_ACCESS_KEY_ID": "campaign",
            "AWS_SECRET_ACCESS_KEY": "campaign",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        if not jit:
            self.env["NUMBA_DISABLE_JIT"] = "1"
        os.environ.update(self.env)  # before the fork server starts: the runs inherit it
        self.forks = multiprocessing.get_context("forkserver")
        self.forks.set_forkserver_preload(
            [
                "__main__",
                "torch",
                "mlflow",
                "boto3",
                "polyinr.commands.cli",
                "polyinr.training.run",
            ]
        )
        self.s3 = boto3.session.Session().client("s3", endpoint_url=self.endpoint)
        self.s3.create_bucket(Bucket=BUCKET)

    def close(self) -> None:
        self.proxy.close()
        self.server.stop()

    def committed_nimg(self, run_name: str) -> int:
        """cur_nimg of the checkpoint latest.json names (0: none), read around the proxy."""
        try:
            body = self.s3.get_object(Bucket=BUCKET, Key=f"runs/{run_name}/latest.json")["Body"]
        except self.s3.exceptions.NoSuchKey:
            return 0
        return int(json.loads(body.read())["name"].removeprefix("snapshot-").removesuffix(".pt"))

    def start(
        self, run_name: str, where: Path, mlflow_db: Path, log: Path, *extra: str, inject=()
    ) -> Run:
        """A forked `polyinr train` of run_name; `extra`: more overrides or flags; `inject`:
        faults the run does to itself (scripts/fault_scenarios.py's inject)."""
        overrides = tiny_overrides(self.root) + [
            f"storage.uri=s3://{BUCKET}/runs",
            f"storage.endpoint_url={self.proxy.url}",
            f"tracking.uri=sqlite:///{mlflow_db}",
            f"tracking.artifact_location={where / 'mlartifacts'}",
            f"tracking.run_name={run_name}",
        ]
        argv = ["train", "--quiet", "--params", str(REPO / "params.yaml"), *overrides, *extra]
        args = (argv, str(where), str(log), list(inject))
        process = self.forks.Process(target=_polyinr, args=args)
        process.start()
        return Run(process)


def _polyinr(argv: list[str], where: str, log: str, inject: list[str] = ()) -> None:
    """A forked `polyinr ARGV` run in `where`, its output to `log`: the command line's main."""
    if inject:
        from fault_scenarios import inject as inject_faults

        inject_faults(inject)
    os.chdir(where)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = ["polyinr", *argv]
    from polyinr.commands import cli

    sys.exit(cli.main())


class Run:
    """A forked run, with the part of subprocess.Popen's interface the trials use."""

    def __init__(self, process):
        self.process = process

    def poll(self) -> int | None:
        self.process.join(0)
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("polyinr train", timeout)
        return self.process.exitcode

    def send_signal(self, sig) -> None:
        os.kill(self.process.pid, sig)

    def kill(self) -> None:
        self.process.kill()


def _started(events: list[dict]) -> dict | None:
    """The run_started event of one run's events (None: killed before it got that far)."""
    return next((e for e in events if e["event"] == "run_started"), None)


def _summary(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def run_trial(campaign: Campaign, index: int, seed: int, duration: float, reference: str) -> dict:
    """One trial: interrupted runs, then a run to the end; returns what happened."""
    rng = random.Random(f"{seed}-{index}")
    name = f"trial-{index:03d}"
    where = campaign.root / name
    where.mkdir()
    mlflow_db = where / "mlflow-host0.db"
    interruptions = rng.randint(1, 2)
    trial = {"trial": index, "runs": [], "commits_lost": 0, "failures": []}
    for k in range(interruptions + 1):
        last = k == interruptions
        if k > 0 and rng.random() < 0.2:  # resumed on another host: a fresh MLflow store
            mlflow_db = where / f"mlflow-host{k}.db"
        faults = random_faults(rng, name)
        campaign.proxy.clear()
        campaign.proxy.add(*faults)
        served_before = len(campaign.proxy.served)
        committed = campaign.committed_nimg(name)
        log = where / f"run{k}.log"
        offset = RunDir(where / "run").offset()  # `polyinr train`'s default --run-dir
        proc = campaign.start(name, where, mlflow_db, log)
        sig, at, started = None, None, time.monotonic()
        if not last:
            sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
            if rng.random() < 0.5:  # any moment: mostly start-up (imports, resume, models)
                deadline = started + rng.uniform(0.0, duration)
            else:  # a moment of training: up to 0.6 s after the n-th new commit
                target, deadline = committed + SNAPSHOT_NIMG * rng.randint(1, 3), None
            delay = rng.uniform(0.0, 0.6)
            while proc.poll() is None:
                if deadline is None and campaign.committed_nimg(name) >= target:
                    deadline = time.monotonic() + delay
                if deadline is not None and time.monotonic() >= deadline:
                    proc.send_signal(sig)
                    at = time.monotonic() - started
                    break
                time.sleep(0.05)
        try:
            code = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        text = log.read_text()
        began = _started(RunDir(where / "run").read_events(offset))
        resumed = began["nimg"] if began and began["resumed_from"] else None
        run = {
            "signal": sig.name if sig else None,
            "at_s": round(at, 2) if at is not None else None,
            "faults": [f.kind + ":" + f.verb for f in faults],
            "faults_served": len(campaign.proxy.served) - served_before,
            "exit": code,
            "committed_before": committed,
            "resumed_from": resumed,
        }
        trial["runs"].append(run)
        expected = {0, 143, -signal.SIGKILL} if not last else {0}
        if code not in expected:
            trial["failures"].append(f"run {k} exited {code}: {text.strip()[-600:]}")
        # A commit is lost when a run resumes from an older checkpoint than the last one
        # committed, or (having got past start-up) starts from image 0 although one was.
        started_over = began is not None and resumed is None
        if committed and (started_over or (resumed is not None and resumed < committed)):
            trial["commits_lost"] += (committed - (resumed or 0)) // SNAPSHOT_NIMG
    summary = _summary(log.read_text()) if code == 0 else None
    trial["weights_sha256"] = summary["weights_sha256"] if summary else None
    trial["bit_identical"] = trial["weights_sha256"] == reference
    return trial


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary one")
    parser.add_argument("--out", type=Path, default=Path("fault-campaign.json"))
    parser.add_argument("--jit", action="store_true", help="keep ffcv's numba compilation")
    parser.add_argument(
        "--scenario",
        default="random",
        help="random (kills and S3 faults, above) or one of scripts/fault_scenarios.py's: "
        "fid-mark, records-missing, disk-full, two-trainers, two-stores, long-outage, all",
    )
    args = parser.parse_args(argv)
    if args.scenario != "random":
        from fault_scenarios import run_scenarios

        return run_scenarios(args)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="fault-campaign-"))
    root.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(root, args.jit)
    try:
        prepare(root, campaign.env)
        where = root / "reference"
        where.mkdir()
        started = time.monotonic()
        proc = campaign.start("reference", where, where / "mlflow.db", where / "run.log")
        if proc.wait() != 0:
            print((where / "run.log").read_text(), file=sys.stderr)
            return 1
        duration = time.monotonic() - started
        reference = _summary((where / "run.log").read_text())["weights_sha256"]
        print(f"reference run: {duration:.1f} s, weights sha256 {reference[:16]}", flush=True)

        trials = []
        for index in range(args.trials):
            trial = run_trial(campaign, index, args.seed, duration, reference)
            trials.append(trial)
            kills = ", ".join(
                f"{r['signal']}@{r['at_s']}s/{r['faults_served']}f" for r in trial["runs"][:-1]
            )
            print(
                f"trial {index:3d}: {kills}; lost {trial['commits_lost']}, "
                f"bit-identical {trial['bit_identical']}, failures {len(trial['failures'])}",
                flush=True,
            )
            args.out.write_text(json.dumps({"reference": reference, "trials": trials}, indent=1))
    finally:
        campaign.close()
    runs = [r for t in trials for r in t["runs"]]
    totals = {
        "trials": len(trials),
        "runs": len(runs),
        "sigkill": sum(r["signal"] == "SIGKILL" and r["exit"] == -9 for r in runs),
        "sigterm": sum(r["signal"] == "SIGTERM" and r["exit"] == 143 for r in runs),
        "s3_faults_served": sum(r["faults_served"] for r in runs),
        "bit_identical": sum(t["bit_identical"] for t in trials),
        "commits_lost": sum(t["commits_lost"] for t in trials),
        "failures": sum(len(t["failures"]) for t in trials),
    }
    args.out.write_text(
        json.dumps({"reference": reference, "totals": totals, "trials": trials}, indent=1)
    )
    print(json.dumps(totals))
    return 0 if totals["commits_lost"] == 0 and totals["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
