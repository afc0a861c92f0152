"""Scenarios of `fault_campaign.py --scenario NAME`: the faults of issue 29, each a few tiny runs.

  fid-mark         FID on, 2 stages: SIGKILL just before or after a snapshot's best-FID mark
  records-missing  snapshot records deleted, the newest snapshot corrupt, a kill mid-resume
  disk-full        ENOSPC while a checkpoint is staged (exit 75), then a rerun
  two-trainers     a second `polyinr train` of a run in progress: exit 75, or `--wait`
  two-stores       two first runs on one fresh SQLite MLflow store, 0.3-1.5 s apart
  long-outage      S3 down for 150 s from the start of an upload: training rides it out

Each trial checks that no commit is lost and that the final EMA generator (and with FID on,
stage 0's best snapshot) equals the uninterrupted run's. With FID on, the FID is a stand-in,
a number derived from the generator's weights (`inject(["fid"])`): these scenarios are
about when the mark is written, and the real FID takes minutes per run on 2 CPU cores.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from fault_campaign import BUCKET, REPO, Campaign, _started, _summary, prepare, tiny_overrides
from fault_proxy import Fault

from polyinr.training.rundir import RunDir

FID_STAGES = [  # 2 stages, a checkpoint and an FID every 8 images, only the best kept past 1
    "train.stages=[{resolution: 16, kimg: 0.032}, {resolution: 24, kimg: 0.016}]",
    "eval.every_kimg=0.008",
    "storage.keep=1",
]


def inject(specs: list[str]) -> None:
    """Faults a forked run does to itself: `fid` (the stand-in FID), `kill-before-mark:N` /
    `kill-after-mark:N` (SIGKILL around marking snapshot N best), `enospc:TEXT` (writes of
    files whose name holds TEXT fail as on a full disk), `outage-at:N` (snapshot N's upload
    creates the file `outage-at`, then waits 1 s; every step appends its time to `steps.txt`)."""
    import pathlib

    from polyinr.evaluation import metrics
    from polyinr.training.checkpoints import CheckpointStore, snapshot_name, tensors_sha256

    for spec in specs:
        kind, _, arg = spec.partition(":")
        if kind == "fid":
            fid = lambda self, g, res: int(tensors_sha256(g.state_dict())[:4], 16) / 655.36  # noqa: E731
            metrics.TrainingFID.__call__ = fid
        elif kind in ("kill-before-mark", "kill-after-mark"):
            mark, target = CheckpointStore.mark_best, snapshot_name(int(arg))

            def killing(self, name, value, stage=0, mark=mark, target=target, kind=kind):
                if name == target and kind == "kill-before-mark":
                    os.kill(os.getpid(), signal.SIGKILL)
                result = mark(self, name, value, stage)
                if name == target:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result

            CheckpointStore.mark_best = killing
        elif kind == "enospc":
            write_bytes = pathlib.Path.write_bytes

            def full(self, data, text=arg, write_bytes=write_bytes):
                if text in self.name:
                    write_bytes(self, data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device", str(self))
                return write_bytes(self, data)

            pathlib.Path.write_bytes = full
        elif kind == "outage-at":
            from polyinr.core.storage import Folder
            from polyinr.training import loop

            upload, step, target = Folder.upload, loop.training_step, snapshot_name(int(arg))

            def signalling(self, name, local, upload=upload, target=target):
                if name == target and not os.path.exists("outage-at"):
                    pathlib.Path("outage-at").touch()
                    time.sleep(1.0)  # the scenario starts the outage meanwhile
                return upload(self, name, local)

            def timed(*args, step=step, **kwargs):
                with open("steps.txt", "a") as f:
                    f.write(f"{time.time()}\n")
                return step(*args, **kwargs)

            Folder.upload, loop.training_step = signalling, timed


class Trials:
    """One scenario's runs: the campaign, its reference run, and the trials' records."""

    def __init__(self, campaign: Campaign, name: str, extra=(), inject=()):
        self.c, self.name, self.extra, self.inject = campaign, name, list(extra), list(inject)
        self.trials: list[dict] = []
        reference = f"{name}-reference"  # run names are unique in the campaign's bucket
        self.reference = self.finish(self.start(reference, self.dir(reference)))

    def dir(self, run_name: str) -> Path:
        where = self.c.root / self.name / run_name
        where.mkdir(parents=True)
        return where

    def start(self, run_name, where, *flags, inject=(), db="mlflow.db"):
        log = where / f"{run_name}-{len(list(where.glob('*.log')))}.log"
        run = self.c.start(
            run_name, where, where / db, log, *self.extra, *flags, inject=[*self.inject, *inject]
        )
        run.log, run.where, run.name = log, where, run_name
        run.offset = RunDir(where / "run").offset()
        return run

    def finish(self, run, timeout=600) -> dict:
        """Wait for a run; its exit code, log, where it resumed and its final weights."""
        try:
            code = run.wait(timeout)
        except subprocess.TimeoutExpired:
            run.kill()
            code = run.wait()
        text = run.log.read_text()
        began = _started(RunDir(run.where / "run").read_events(run.offset))
        summary = _summary(text) if code == 0 else None
        return {
            "exit": code,
            "resumed_from": began["nimg"] if began and began["resumed_from"] else None,
            "started": began is not None,
            "weights": summary.get("weights_sha256") if summary else None,
            "tail": text.strip()[-400:],
            "best0": self.best(run.name),
        }

    def best(self, run_name: str) -> str | None:
        key = f"runs/{run_name}/best.json"
        try:
            body = self.c.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except self.c.s3.exceptions.NoSuchKey:
            return None
        return json.loads(body)["stages"].get("0", {}).get("name")

    def record(self, runs: list[dict], expected: list[set], lost: int = 0, **facts) -> None:
        last = runs[-1]
        failures = [
            f"run {k} exited {r['exit']}: {r['tail'][-300:]}"
            for k, (r, codes) in enumerate(zip(runs, expected, strict=True))
            if r["exit"] not in codes
        ]
        equal = last["weights"] == self.reference["weights"]
        if "fid" in self.inject:
            equal = equal and last["best0"] == self.reference["best0"]
        trial = {"trial": len(self.trials), "runs": runs, "commits_lost": lost, "equal": equal}
        self.trials.append(trial | {"failures": failures, **facts})
        print(
            f"{self.name} trial {trial['trial']}: exits {[r['exit'] for r in runs]}, lost {lost}"
            f", equal {equal}, failures {len(failures)} {facts or ''}",
            flush=True,
        )

    def wait_for(self, run, ready, timeout: float = 300) -> bool:
        """Poll until ready() or the run ends; whether ready() came first."""
        deadline = time.monotonic() + timeout
        while run.poll() is None and time.monotonic() < deadline:
            if ready():
                return True
            time.sleep(0.05)
        return False


def _lost(committed: int, run: dict) -> int:
    """Commits a rerun did not resume from (8 images each), as fault_campaign counts them."""
    if not committed or not run["started"]:
        return 0
    return max(0, (committed - (run["resumed_from"] or 0)) // 8)


def fid_mark(t: Trials, rng: random.Random) -> None:
    """SIGKILL just before or just after a stage-0 snapshot is marked best, then rerun."""
    # Every other trial kills around the mark of the reference's best (where it matters).
    best = int(t.reference["best0"][len("snapshot-") : -len(".pt")])
    nimg = best if len(t.trials) % 2 == 0 else rng.choice([8, 16, 24, 32])
    when = rng.choice(["before", "after"])
    name = f"fid-{len(t.trials)}"
    where = t.dir(name)
    first = t.finish(t.start(name, where, inject=[f"kill-{when}-mark:{nimg}"]))
    committed = t.c.committed_nimg(name)
    second = t.finish(t.start(name, where))
    t.record([first, second], [{-9}, {0}], _lost(committed, second), kill=f"{when} {nimg}")


def records_missing(t: Trials, rng: random.Random) -> None:
    """Kill after a few commits; delete every record and corrupt the newest snapshot; kill the
    rerun once it has resumed (it fell back to a snapshot without record); run to the end."""
    name = f"records-{len(t.trials)}"
    where, s3 = t.dir(name), t.c.s3
    target = rng.choice([16, 24, 32])
    run = t.start(name, where)
    t.wait_for(run, lambda: t.c.committed_nimg(name) >= target)
    run.kill()
    first = t.finish(run)
    newest = t.c.committed_nimg(name)
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{name}/snapshot-")
    keys = sorted(o["Key"] for o in listed.get("Contents", []))
    for key in keys:
        if key.endswith(".json"):
            s3.delete_object(Bucket=BUCKET, Key=key)
    intact = sorted(int(k[-15:-3]) for k in keys if k.endswith(".pt") and int(k[-15:-3]) < newest)
    s3.put_object(Bucket=BUCKET, Key=f"runs/{name}/snapshot-{newest:012d}.pt", Body=b"junk")
    run = t.start(name, where)
    events = RunDir(where / "run")
    t.wait_for(run, lambda: _started(events.read_events(run.offset)) is not None)
    run.kill()
    second = t.finish(run)
    third = t.finish(t.start(name, where))
    intact_nimg = max(intact, default=0)
    runs, codes = [first, second, third], [{-9, 0}, {-9, 0}, {0}]
    t.record(runs, codes, _lost(intact_nimg, third), corrupted=newest, fell_back_to=intact_nimg)


def disk_full(t: Trials, rng: random.Random) -> None:
    """The disk fills while snapshot N is staged: exit 75 in one line; the rerun resumes."""
    nimg = rng.choice([16, 24, 32])
    name = f"disk-{len(t.trials)}"
    where = t.dir(name)
    first = t.finish(t.start(name, where, inject=[f"enospc:snapshot-{nimg:012d}"]))
    said = sum("disk full" in line for line in first["tail"].splitlines())
    committed = t.c.committed_nimg(name)
    second = t.finish(t.start(name, where))
    t.record([first, second], [{75}, {0}], _lost(committed, second), at=nimg, one_line=said == 1)


def two_trainers(t: Trials, rng: random.Random) -> None:
    """A second trainer of a run in progress: exit 75 naming the holder, or `--wait`."""
    wait = len(t.trials) % 2 == 1
    name = f"pair-{len(t.trials)}"
    where = t.dir(name)
    first = t.start(name, where)
    t.wait_for(first, lambda: t.c.committed_nimg(name) >= 8)
    other = t.dir(f"{name}-second")
    second = t.start(name, other, *(["--wait"] if wait else []))
    a, b = t.finish(first), t.finish(second)
    named = "is being trained by" in b["tail"] or wait
    t.record([a, b], [{0}, {0} if wait else {75}], 0, wait=wait, holder_named=named)
    # The first trainer's weights (and with --wait the second's) equal the reference's.
    ref = t.reference["weights"]
    t.trials[-1]["equal"] = a["weights"] == ref and (not wait or b["weights"] == ref)


def two_stores(t: Trials, rng: random.Random) -> None:
    """Two first runs (other run names) on one fresh SQLite store, 0.3-1.5 s apart."""
    delay = rng.uniform(0.3, 1.5)
    where = t.dir(f"stores-{len(t.trials)}")
    db = where / "shared.db"
    first = t.start(f"{where.name}-a", where, db="shared.db")
    time.sleep(delay)
    second = t.start(f"{where.name}-b", where, db="shared.db")
    a, b = t.finish(first), t.finish(second)
    with sqlite3.connect(db) as store:
        runs = store.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0]
    t.record([a, b], [{0}, {0}], 0, offset_s=round(delay, 2), mlflow_runs=runs)
    t.trials[-1]["equal"] &= b["weights"] == t.reference["weights"] and runs == 2


OUTAGE = [  # a checkpoint every 24 images: two steps between commits; uploads retry 10 min
    "train.snapshot_kimg=0.024",
    "storage.outage_minutes=10.0",
]
OUTAGE_S = 150.0


def long_outage(t: Trials, rng: random.Random) -> None:
    """S3 answers 503 to every request of the run for 150 s from the start of snapshot 24's
    upload: training steps on meanwhile, the commit lands after, the weights are equal."""
    name = f"outage-{len(t.trials)}"
    where = t.dir(name)
    run = t.start(name, where, inject=["outage-at:24"])
    t.wait_for(run, (where / "outage-at").exists)
    began, served = time.time(), len(t.c.proxy.served)
    t.c.proxy.add(Fault("503", key=f"/{name}/", times=-1))
    while run.poll() is None and time.time() - began < OUTAGE_S:
        time.sleep(0.5)
    t.c.proxy.clear()
    ended, served = time.time(), len(t.c.proxy.served) - served
    result = t.finish(run)
    steps = [float(x) for x in (where / "steps.txt").read_text().split()]
    during = sum(began <= s <= ended for s in steps)
    latest = t.c.committed_nimg(name)
    facts = {"outage_s": round(ended - began), "faults_served": served, "steps_during": during}
    t.record([result], [{0}], 0, **facts, latest=latest)
    t.trials[-1]["equal"] &= during > 0 and latest == 48


SCENARIOS = {
    "fid-mark": (fid_mark, FID_STAGES, ["fid"]),
    "records-missing": (records_missing, [], []),
    "disk-full": (disk_full, [], []),
    "two-trainers": (two_trainers, [], []),
    "two-stores": (two_stores, [], []),
    "long-outage": (long_outage, OUTAGE, []),
}


def run_scenarios(args) -> int:
    """`fault_campaign.py --scenario NAME|all --trials N`: N trials of each; totals per scenario."""
    import tempfile

    names = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fault-scenarios-"))
    root.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(root, args.jit)
    results = {}
    try:
        prepare(root, campaign.env)
        if "fid-mark" in names:  # stage 1's 24 px file too
            cmd = [sys.executable, "-m", "polyinr", "prepare", "--quiet", "--params"]
            cmd += [str(REPO / "params.yaml"), *tiny_overrides(root), FID_STAGES[0]]
            subprocess.run(cmd, env=campaign.env, check=True, cwd=root)
        for name in names:
            scenario, extra, injected = SCENARIOS[name]
            trials = Trials(campaign, name, extra, injected)
            rng = random.Random(f"{args.seed}-{name}")
            for _ in range(args.trials):
                scenario(trials, rng)
            results[name] = {
                "trials": len(trials.trials),
                "runs": sum(len(x["runs"]) for x in trials.trials),
                "commits_lost": sum(x["commits_lost"] for x in trials.trials),
                "equal": sum(x["equal"] for x in trials.trials),
                "failures": sum(len(x["failures"]) for x in trials.trials),
                "details": trials.trials,
            }
            args.out.write_text(json.dumps(results, indent=1))
    finally:
        campaign.close()
    totals = {k: {m: v[m] for m in v if m != "details"} for k, v in results.items()}
    print(json.dumps(totals))
    bad = [v for v in results.values() if v["commits_lost"] or v["failures"]]
    return 1 if bad or any(v["equal"] < v["trials"] for v in results.values()) else 0
