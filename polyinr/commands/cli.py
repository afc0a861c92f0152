"""The `polyinr` command: demo data, FFCV preparation, training, evaluation, sampling."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from polyinr.commands import base, sample, training
from polyinr.commands.base import DEVICE, OVERRIDE, TORCHRUN_DEVICE, command
from polyinr.core import errors

EXAMPLES = """\
examples:
  polyinr demo-data data/demo                 # the embedded demo dataset
  polyinr prepare                             # data.source -> data/ffcv/train_<R>.beton
  polyinr train train.batch=16                # train into run/ (rerun the same command to resume)
  torchrun --nproc_per_node 4 -m polyinr train  # the same on 4 GPUs (or CPU processes)
  polyinr checkpoints list                    # one JSON line per committed checkpoint
  polyinr runs                                # every run: status, kimg, best FID, checkpoints
  polyinr evaluate                            # metrics/eval.json + samples/grid.png
  polyinr generate --classes 0 1 --seeds 0-7 --psi 0.6 --out grid.png
  polyinr class-embeddings                    # class-embedding init (docs/model.md section 2)
  polyinr generate --classes 0 --seeds 3 --resolution 2048 --out big.png   # any resolution
  polyinr generate --classes random --seeds 0-49999 --out samples.npz     # ADM evaluators
  polyinr interpolate --classes 0 --seeds 1,2,3 --loop --out walk.gif walk.png
  polyinr mix --levels shape --source-seeds 0-3 --target-seeds 4-7 --out mix.png
  polyinr publish                             # the generator -> MLflow Model Registry
  polyinr restore demo-1a2b3c4d storage.uri=s3://polyinr/checkpoints  # a flow run's state
  polyinr summary --params configs/imagenet-256.yaml

Every command reads params.yaml (or --params FILE); trailing section.key=value arguments
override it, with the same grammar as `dvc exp run -S`.
"""


def cmd_demo_data(args) -> None:
    """Write the demo dataset (ImageNet layout) to DIR."""
    from polyinr import data

    cfg = base.config(args).data
    n = data.make_demo_dataset(
        Path(args.dir),
        cfg.demo_classes,
        cfg.demo_per_class,
        cfg.demo_size,
        cfg.demo_seed,
        cfg.demo_kind,
    )
    where = Path(args.dir) / "train"
    print(f"wrote {n} {cfg.demo_kind} images in {cfg.demo_classes} classes to {where}")


def cmd_prepare(args) -> None:
    """Convert data.source to one FFCV file per training resolution.

    data.out_dir/train_<R>.beton (+ train_<R>.json, its manifest) for every resolution R in
    train.stages (or each --resolution R): centre square, Lanczos resize, data.encoding (jpg
    at data.jpeg_quality, or raw), labels = index of the sorted wnid.

    data.source is either an ImageNet folder (<source>/train/<wnid>/*.JPEG) or the official
    ILSVRC2012_img_train.tar (a tar of <wnid>.tar files), read in place without extracting.
    Grayscale, CMYK and PNG files are converted to RGB; empty, truncated, corrupt, non-image
    and unreadable files are skipped, listed in the manifest with the reason, and summed up
    in one warning line (exit 0); with data.strict=true they fail the command instead (exit 2)
    and nothing is written. data.workers processes decode in parallel (0: every core).

      polyinr prepare data.source=/data/ILSVRC2012_img_train.tar data.workers=0
    """
    from polyinr import data

    cfg = base.config(args)
    resolutions = args.resolution or sorted({s.resolution for s in cfg.train.stages})
    for manifest in data.prepare(cfg.data, resolutions, progress=not args.quiet):
        path = data.beton_path(cfg.data.out_dir, manifest["resolution"])
        print(f"{path}: {manifest['written']} images, {len(manifest['skipped'])} skipped")


def cmd_runs(args) -> None:
    """The runs in storage.uri and the tracking store: status, kimg, best FID, checkpoints."""
    from polyinr.commands import runs

    if runs.main(base.config(args), args.json):
        raise SystemExit(1)  # neither source could be read (stderr says why)


def cmd_evaluate(args) -> None:
    """FID, sFID, IS, precision/recall and rFID of the EMA generator (eval.protocol), a grid."""
    from polyinr.commands import evaluate
    from polyinr.core import distributed

    device = distributed.setup() if args.device == "auto" else base.device(args.device)
    done = evaluate.run(
        base.config(args), args.generator, args.out, args.grid, device, not args.quiet
    )
    if done is None:
        return  # another rank under torchrun: rank 0 reports
    result, seconds = done
    print("evaluate: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), file=sys.stderr)
    print(result["label"] if "label" in result else json.dumps(result))
    print(f"wrote {args.out} and {args.grid}")


def cmd_publish(args) -> None:
    """Register the generator in the MLflow Model Registry (tracking.uri) as a pyfunc model.

    The model maps (class_id, seed; psi, resolution) to uint8 images.
    """
    from polyinr.commands import registry
    from polyinr.model.generator import load_generator

    cfg = base.config(args)
    g, meta = load_generator(args.generator)
    # The served model's shape is the file's; the version's tags say what it can serve.
    shape = {f"generator.{k}": str(getattr(g.cfg, k)) for k in ("conditional", "num_classes")}
    shape["resolution"] = str(meta["resolution"])
    run_id = args.mlflow_run or meta.get("mlflow_run_id")  # default: the run that trained it
    uri = registry.publish(
        args.generator, meta["resolution"], cfg.tracking, args.name, run_id, shape
    )
    print(f"registered {uri} under MLflow run {run_id} (tracking {cfg.tracking.uri})")
    print(f"serve it: mlflow models serve -m {uri} --env-manager local --port 5001")


def cmd_class_embeddings(args) -> None:
    """Initial class embeddings (num_classes x 320) from the pretrained tf_efficientnet_lite0.

    Each class's mean pooled last-stage feature over the prepared training data, centred and
    standardised per feature across classes; prints how far apart classes start. Set
    train.embed_init to the output to use it.
    """
    from polyinr.training import embedding

    cfg = base.config(args)
    out = args.out or cfg.train.embed_init or "weights/class_embeddings.pt"
    device, progress = base.device(args.device), not args.quiet
    table, stats = embedding.create(cfg, out, device, progress, args.allow_random_weights)
    label = "" if cfg.discriminator.pretrained else " (RANDOM feature weights: test only)"
    print(f"wrote {out}: {tuple(table.shape)} class embeddings from {embedding.NETWORK}{label}")
    if stats["closest"]:
        a, b, cos = stats["closest"]
        print(
            f"class embeddings: mean off-diagonal cosine {stats['mean_cosine']:+.3f} "
            f"(min {stats['min_cosine']:+.3f}, max {stats['max_cosine']:+.3f}); "
            f"closest pair {a} / {b} ({cos:+.3f})"
        )
    for a, b, cos in stats["parallel"]:
        print(
            f"polyinr class-embeddings: warning: classes {a} and {b} are nearly parallel "
            f"(cosine {cos:.3f}): they look alike to {embedding.NETWORK}, so G may confuse them",
            file=sys.stderr,
        )


def cmd_summary(args) -> None:
    """Parameter counts and multiply-adds as JSON."""
    from polyinr.model import discriminator, generator

    cfg = base.config(args)
    first, resolutions = cfg.train.stages[0].resolution, {s.resolution for s in cfg.train.stages}
    out = {"generator": generator.parameter_counts(generator.Generator(cfg.generator, first))}
    if not args.skip_discriminator:
        d_cfg, num_classes = cfg.discriminator, cfg.generator.num_classes
        out["discriminator"] = discriminator.config_parameter_counts(d_cfg, first, num_classes)
    out["macs_per_image"] = {
        str(r): generator.macs_per_image(cfg.generator, r) for r in sorted(resolutions)
    }
    print(json.dumps(out, indent=2))


def parser() -> argparse.ArgumentParser:
    """The `polyinr` command's parser: every subcommand, each described by its function."""
    parser = argparse.ArgumentParser(
        prog="polyinr",
        description="Poly-INR (CVPR 2023): a GAN whose generator is a per-pixel polynomial MLP.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = command(sub, cmd_demo_data)
    p.add_argument("dir", help="output folder; images go to DIR/train/<wnid>/*.JPEG")
    p = command(sub, cmd_prepare)
    p.add_argument(
        "--resolution",
        type=int,
        action="append",
        metavar="R",
        help="convert at R px only (repeatable; default: every resolution in train.stages). "
        "DVC's prepare@<i> stages run one resolution each",
    )
    training.add_parsers(sub)
    p = command(sub, cmd_runs)
    p.add_argument("--json", action="store_true", help="one JSON object per run, not a table")
    p = command(sub, cmd_evaluate, device=TORCHRUN_DEVICE, generator=True)
    p.add_argument(
        "--out", type=Path, default="metrics/eval.json", help="metrics JSON (a DVC metric)"
    )
    p.add_argument("--grid", type=Path, default="samples/grid.png", help="sample grid PNG")

    sample.add_parsers(sub)
    p = command(sub, cmd_publish, generator=True)
    p.add_argument("--name", default="polyinr-generator", help="registered model name")
    p.add_argument(
        "--mlflow-run",
        help="log the model in this run (default: the training run recorded in the generator)",
    )
    p = command(sub, cmd_class_embeddings, device=DEVICE)
    p.add_argument("--out", default=None, help="output file (default: train.embed_init)")
    p.add_argument(
        "--allow-random-weights", action="store_true", help="tests only: random feature weights"
    )
    p = command(sub, cmd_summary)
    p.add_argument("--skip-discriminator", action="store_true", help="generator only (fast)")
    return parser


def _terminated(signum, frame):
    raise SystemExit(errors.PREEMPTED)  # as after a pre-emption checkpoint


def main(argv=None) -> int:
    """Run a command; one line on stderr and the code of polyinr.core.errors for what the user
    or the scheduler can act on, a traceback for a bug. With $POLYINR_EXIT_FILE set, the code
    is also written there (the flow reads it when DVC ran the command and exited with its own)."""
    # As a command (not called from Python): SIGTERM before training installs its own
    # handler (imports, config, storage checks) exits as an interrupted job would, 143, and
    # once the command is done it is ignored, so the shutdown after it cannot end in -15.
    command_line = argv is None and threading.current_thread() is threading.main_thread()
    if command_line:
        signal.signal(signal.SIGTERM, _terminated)
    parser_ = parser()
    # Overrides are taken out before argparse sees them, so that they work anywhere on every
    # command: after a positional (`demo-data DIR a.b=1`) or after an option that takes
    # several values (`interpolate --out w.gif w.png a.b=1`).
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args, extra = parser_.parse_known_args([a for a in argv if not OVERRIDE.match(a)])
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser_.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides and not hasattr(args, "overrides"):
        parser_.error(f"unrecognized arguments: {' '.join(overrides)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra, *overrides]
    code = 1  # a bug, until the command says otherwise
    try:
        if getattr(args, "overrides", None):
            base.config(args)  # a typo in an override is an error even where params are unused
        args.func(args)
        code = 0
    except SystemExit as e:  # SIGTERM before training took over the signal
        code = e.code if isinstance(e.code, int) else 1
        raise
    except Exception as e:
        code = errors.exit_code(e)
        if code is None:
            code = 1
            raise
        what = "" if code == errors.PREEMPTED else "error: "
        print(f"polyinr {args.command}: {what}{e}", file=sys.stderr)
    finally:
        if os.environ.get(errors.EXIT_FILE):
            Path(os.environ[errors.EXIT_FILE]).write_text(f"{code}\n")
        if command_line:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code
