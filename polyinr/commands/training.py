"""The commands of a training run (train, checkpoints, restore): their parsers and bodies,
which drive polyinr.training and the pipeline record."""

from __future__ import annotations

import json
import os
from pathlib import Path

from polyinr.commands import base
from polyinr.commands.base import TORCHRUN_DEVICE, command
from polyinr.training.rundir import DEFAULT as RUN_DIR


def cmd_train(args) -> None:
    """Train (or resume) the schedule in train.stages."""
    import torch.distributed as dist

    from polyinr.core import distributed
    from polyinr.training.run import train

    device = distributed.setup() if args.device == "auto" else base.device(args.device)
    if args.follow:  # another node's ranks: rank 0 says what to run, and where
        cfg, until_stage, workdir, run_dir = distributed.from_rank0(None)
        os.chdir(workdir)
    else:
        cfg, until_stage, run_dir = base.config(args), args.until_stage, args.run_dir
        distributed.from_rank0((cfg, until_stage, os.getcwd(), run_dir))
    try:
        summary = train(cfg, device, run_dir, not args.quiet, until_stage, args.restart, args.wait)
        if dist.is_initialized() and dist.get_rank() > 0:
            return  # rank 0 reports for all (their weights are identical)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(json.dumps(summary))


def cmd_checkpoints(args) -> None:
    """List the run's committed checkpoints (storage.uri / tracking.run_name).

    One JSON line each: name, uri, stage, resolution, kimg, size, sha256, weights_sha256 (a
    hash of the EMA generator's tensors), latest, best. `latest` marks the newest one that
    matches its size and sha256; a newer one that does not carries `corrupt` (the reason).
    """
    from polyinr.training.checkpoints import CheckpointStore

    cfg = base.config(args)
    store = CheckpointStore(cfg.storage, cfg.tracking.run_name)
    if store.root is None:  # on S3
        store.check()  # credentials and bucket, with one clear message
    for record in store.records():
        print(json.dumps(record))


def cmd_restore(args) -> None:
    """Restore a run's pipeline state from the remotes into this checkout.

    Its params.yaml and dvc.lock (recorded beside its checkpoints in storage.uri by the
    Prefect flow), then `dvc pull` of its outputs.
    """
    from polyinr.commands import pipeline
    from polyinr.training.checkpoints import CheckpointStore

    # argparse deals the trailing words to overrides first: the run is the one without "=".
    words = [*args.overrides, args.run]
    names = [w for w in words if "=" not in w]
    if len(names) != 1:
        raise ValueError(f"give one run name (and section.key=value overrides), got {words}")
    args.run, args.overrides = names[0], [w for w in words if "=" in w]
    store = CheckpointStore(base.config(args).storage, args.run)
    found = pipeline.restore(store, Path.cwd(), pull=not args.no_pull)
    print(f"restored {', '.join(found)} of run {args.run} from {store.uri}")


def add_parsers(sub) -> None:
    """train, checkpoints and restore, as subcommands of `sub`."""
    p = command(sub, cmd_train, device=TORCHRUN_DEVICE)
    p.add_argument(
        "--run-dir",
        type=Path,
        default=RUN_DIR,
        help="the local run folder: generator.pt, train.csv, fid.csv and events.jsonl "
        "(default: %(default)s/; checkpoints go to storage.uri/tracking.run_name)",
    )
    p.add_argument(
        "--until-stage",
        type=int,
        metavar="I",
        help="stop once progressive stage I (0-based index into train.stages) is complete "
        "and checkpointed; exits at once if it already is. The generator is exported only "
        "when the last stage completes (default: run the whole schedule)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="start from image 0 when the run has checkpoints but none of them loads (they "
        "are moved to corrupt/); without it training stops with an error instead",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="when another trainer holds the run's lease (storage.uri/tracking.run_name/"
        "lease.json), wait for it to finish or expire instead of exiting 75",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="multi-node: take params, --until-stage and the working directory (on a shared "
        "volume) from rank 0, so that other nodes need no params (deploy/k8s)",
    )
    p = sub.add_parser("checkpoints", help="The run's checkpoints (storage.uri).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    command(actions, cmd_checkpoints, "list")
    p = command(sub, cmd_restore)
    p.add_argument("run", help="the run's name (tracking.run_name with {params} filled in)")
    p.add_argument("--no-pull", action="store_true", help="only write params.yaml and dvc.lock")
