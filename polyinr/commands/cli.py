"""The `polyinr` command: demo data, FFCV preparation, training, evaluation, sampling."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

from polyinr.training.rundir import DEFAULT as RUN_DIR
from polyinr.training.rundir import RunDir

GENERATOR = RunDir(RUN_DIR).generator  # every command's default --generator

EXAMPLES = """\
examples:
  polyinr demo-data data/demo                 # the embedded demo dataset
  polyinr prepare                             # data.source -> data/ffcv/train_<R>.beton
  polyinr train train.batch=16                # train into run/ (rerun the same command to resume)
  torchrun --nproc_per_node 4 -m polyinr train  # the same on 4 GPUs (or CPU processes)
  polyinr checkpoints list                    # one JSON line per committed checkpoint
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


TORCHRUN_DEVICE = "auto (torchrun-aware), cpu, cuda, cuda:N"
# `section.key=value` (DVC's `-S` grammar), told apart from paths and option values.
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def _seeds(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def _ids(tokens: list[str]) -> list[int]:
    """['0-2', '7'] or ['0-2,7'] -> [0, 1, 2, 7]."""
    return [i for token in tokens for i in _seeds(token)]


def _size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '128x512' -> (128, 512) (height x width)."""
    h, _, w = text.lower().partition("x")
    size = (int(h), int(w or h))
    if min(size) < 1:
        raise ValueError(f"resolution {text!r} must be positive")
    return size


def _log_outputs(args, paths, folder: str) -> None:
    """Log output files (or folders) to the MLflow run given by --mlflow-run, if any."""
    if not args.mlflow_run:
        return
    from polyinr.training import tracking

    with tracking.start_run(_config(args).tracking, run_id=args.mlflow_run):
        for path in paths:
            tracking.log_artifact(path, folder)
    print(f"logged {', '.join(map(str, paths))} to MLflow run {args.mlflow_run} ({folder}/)")


def _generator(args):
    """The generator of --generator on --device, and the render options of the flags."""
    from polyinr.model.generator import load_generator

    g, _ = load_generator(args.generator, _device(args.device))
    return g, {"view": args.view, "chunk": args.chunk, "progress": not args.quiet}


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _config(args):
    from polyinr.core import config

    return config.load(args.params, args.overrides)


def cmd_demo_data(args) -> None:
    """Write the demo dataset (ImageNet layout) to DIR."""
    from polyinr import data

    cfg = _config(args).data
    n = data.make_demo_dataset(
        Path(args.dir), cfg.demo_classes, cfg.demo_per_class, cfg.demo_size, cfg.demo_seed
    )
    print(f"wrote {n} images in {cfg.demo_classes} classes to {Path(args.dir) / 'train'}")


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

    cfg = _config(args)
    resolutions = args.resolution or sorted({s.resolution for s in cfg.train.stages})
    for manifest in data.prepare(cfg.data, resolutions, progress=not args.quiet):
        path = data.beton_path(cfg.data.out_dir, manifest["resolution"])
        print(f"{path}: {manifest['written']} images, {len(manifest['skipped'])} skipped")


def cmd_train(args) -> None:
    """Train (or resume) the schedule in train.stages."""
    import torch.distributed as dist

    from polyinr.core import distributed
    from polyinr.training import train

    device = distributed.setup() if args.device == "auto" else _device(args.device)
    if args.follow:  # another node's ranks: rank 0 says what to run, and where
        cfg, until_stage, workdir, run_dir = distributed.from_rank0(None)
        os.chdir(workdir)
    else:
        cfg, until_stage, run_dir = _config(args), args.until_stage, args.run_dir
        distributed.from_rank0((cfg, until_stage, os.getcwd(), run_dir))
    try:
        summary = train.train(
            cfg, device, run_dir, not args.quiet, until_stage, args.restart, args.wait
        )
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

    cfg = _config(args)
    store = CheckpointStore(cfg.storage, cfg.tracking.run_name)
    if store.root is None:  # on S3
        store.check()  # credentials and bucket, with one clear message
    for record in store.records():
        print(json.dumps(record))


def cmd_evaluate(args) -> None:
    """FID, sFID, IS, precision/recall and rFID of the EMA generator (eval.protocol), a grid."""
    from polyinr.commands import evaluate
    from polyinr.core import distributed

    device = distributed.setup() if args.device == "auto" else _device(args.device)
    done = evaluate.run(_config(args), args.generator, args.out, args.grid, device, not args.quiet)
    if done is None:
        return  # another rank under torchrun: rank 0 reports
    result, seconds = done
    print("evaluate: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), file=sys.stderr)
    print(result["label"] if "label" in result else json.dumps(result))
    print(f"wrote {args.out} and {args.grid}")


def cmd_generate(args) -> None:
    """Samples as a PNG grid (rows classes), PNG files or an npz."""
    from polyinr.model import sampling

    g, render = _generator(args)
    classes = None if args.classes == ["random"] else _ids(args.classes)
    sizes = [_size(r) for r in args.resolution] or [(g.resolution, g.resolution)]
    seeds = _seeds(args.seeds)
    fmt, n = sampling.generate(g, args.out, classes, seeds, args.psi, sizes, args.format, **render)
    size = " ".join(f"{h}x{w}" for h, w in sizes)
    print(f"wrote {args.out} ({fmt}): {n} samples at {size}, psi {args.psi}")
    _log_outputs(args, [args.out], "generate")


def cmd_interpolate(args) -> None:
    """A walk in w space through key samples (seeds and/or classes): GIF, MP4, PNG strip."""
    from polyinr.model import sampling

    bad = [str(p) for p in args.out if p.suffix not in sampling.WALK_SUFFIXES]
    if bad:
        raise ValueError(f"--out {bad}: use .gif or .mp4 (animation) or .png (strip)")
    g, render = _generator(args)
    keys = sampling.pairs(_ids(args.classes), _seeds(args.seeds))
    keys += keys[:1] if args.loop else []
    size = _size(args.resolution) if args.resolution else None
    frames = sampling.walk(g, keys, args.psi, args.steps, size, **render)
    for out in args.out:
        sampling.write_walk(out, frames, args.fps, args.strip_frames, args.loop)
    print(f"wrote {', '.join(map(str, args.out))}: {len(keys)} keys, {len(frames)} frames")
    _log_outputs(args, args.out, "interpolate")


def cmd_mix(args) -> None:
    """Copy levels [a, b) of sources A's w into targets B: a grid, rows A, columns B."""
    from polyinr.model import sampling

    g, render = _generator(args)
    start, stop = sampling.mix_levels(args.levels, g.cfg.levels)
    sources = sampling.pairs(_ids(args.source_classes), _seeds(args.source_seeds))
    targets = sampling.pairs(_ids(args.target_classes), _seeds(args.target_seeds))
    size = _size(args.resolution) if args.resolution else None
    grid = sampling.mix_grid(g, sources, targets, (start, stop), args.psi, size, **render)
    sampling.save_image(args.out, grid)
    shape = f"{len(sources)} sources x {len(targets)} targets"
    print(f"wrote {args.out}: {shape}, levels [{start}, {stop})")
    _log_outputs(args, [args.out], "mix")


def cmd_publish(args) -> None:
    """Register the generator in the MLflow Model Registry (tracking.uri) as a pyfunc model.

    The model maps (class_id, seed; psi, resolution) to uint8 images.
    """
    from polyinr.commands import registry
    from polyinr.model.generator import load_generator

    cfg = _config(args)
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
    store = CheckpointStore(_config(args).storage, args.run)
    found = pipeline.restore(store, Path.cwd(), pull=not args.no_pull)
    print(f"restored {', '.join(found)} of run {args.run} from {store.uri}")


def cmd_class_embeddings(args) -> None:
    """Initial class embeddings (num_classes x 320) from the pretrained tf_efficientnet_lite0.

    Each class's mean pooled last-stage feature over the prepared training data. Set
    train.embed_init to the output to use it.
    """
    from polyinr.training import embedding

    cfg = _config(args)
    out = args.out or cfg.train.embed_init or "weights/class_embeddings.pt"
    device, progress = _device(args.device), not args.quiet
    table = embedding.create(cfg, out, device, progress, args.allow_random_weights)
    label = "" if cfg.discriminator.pretrained else " (RANDOM feature weights: test only)"
    print(f"wrote {out}: {tuple(table.shape)} class embeddings from {embedding.NETWORK}{label}")


def cmd_summary(args) -> None:
    """Parameter counts and multiply-adds as JSON."""
    from polyinr.model import discriminator, generator

    cfg = _config(args)
    first, resolutions = cfg.train.stages[0].resolution, {s.resolution for s in cfg.train.stages}
    out = {"generator": generator.parameter_counts(generator.Generator(cfg.generator, first))}
    if not args.skip_discriminator:
        d_cfg, num_classes = cfg.discriminator, cfg.generator.num_classes
        out["discriminator"] = discriminator.config_parameter_counts(d_cfg, first, num_classes)
    out["macs_per_image"] = {
        str(r): generator.macs_per_image(cfg.generator, r) for r in sorted(resolutions)
    }
    print(json.dumps(out, indent=2))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyinr",
        description="Poly-INR (CVPR 2023): a GAN whose generator is a per-pixel polynomial MLP.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(func, name=None, parent=sub, device=None, generator=False):
        """The subcommand `func` runs, named after it and described by its docstring (the first
        line in the list of commands), with the arguments every command takes, --device (with
        this help) and --generator if asked."""
        name = name or func.__name__.removeprefix("cmd_").replace("_", "-")
        doc = inspect.cleandoc(func.__doc__)
        p = parent.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--params", default="params.yaml", help="complete params file (default: %(default)s)"
        )
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override params")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if device:
            p.add_argument("--device", default="auto", help=device)
        if generator:
            p.add_argument(
                "--generator",
                type=Path,
                default=GENERATOR,
                help="exported generator (default: %(default)s)",
            )
        p.set_defaults(func=func)
        return p

    p = command(cmd_demo_data)
    p.add_argument("dir", help="output folder; images go to DIR/train/<wnid>/*.JPEG")
    p = command(cmd_prepare)
    p.add_argument(
        "--resolution",
        type=int,
        action="append",
        metavar="R",
        help="convert at R px only (repeatable; default: every resolution in train.stages). "
        "DVC's prepare@<i> stages run one resolution each",
    )
    p = command(cmd_train, device=TORCHRUN_DEVICE)
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
    command(cmd_checkpoints, "list", parent=actions)
    p = command(cmd_evaluate, device=TORCHRUN_DEVICE, generator=True)
    p.add_argument(
        "--out", type=Path, default="metrics/eval.json", help="metrics JSON (a DVC metric)"
    )
    p.add_argument("--grid", type=Path, default="samples/grid.png", help="sample grid PNG")

    def sampling_command(func, many_resolutions=False):
        from polyinr.model.sampling import DEFAULT_CHUNK, FULL_VIEW

        p = command(func, device="auto, cpu, cuda, cuda:N", generator=True)
        p.add_argument("--psi", type=float, default=1.0, help="truncation towards the class mean")
        p.add_argument(
            "--resolution",
            nargs="+" if many_resolutions else None,
            default=[] if many_resolutions else None,
            help="render size R or HxW, any (default: the trained one)"
            + ("; several: each sample at each, side by side" if many_resolutions else ""),
        )
        p.add_argument(
            "--view",
            type=float,
            nargs=4,
            default=FULL_VIEW,
            metavar=("TOP", "LEFT", "BOTTOM", "RIGHT"),
            help="region in training-frame units: 0 0 1 1 is the frame, -0.5 -0.5 1.5 1.5 "
            "extrapolates beyond it, 0.25 0.25 0.75 0.75 zooms in (default: 0 0 1 1)",
        )
        p.add_argument(
            "--chunk",
            type=int,
            default=DEFAULT_CHUNK,
            help="pixels per synthesis call; sets peak memory, not the result "
            "(default: %(default)s)",
        )
        p.add_argument("--mlflow-run", help="also log the output to this MLflow run id")
        return p

    p = sampling_command(cmd_generate, many_resolutions=True)
    p.add_argument(
        "--classes",
        nargs="+",
        default=["0"],
        help="class ids (grid rows), e.g. 0 1 2 or 0-9; 'random': one uniform class per seed",
    )
    p.add_argument("--seeds", default="0-7", help="seeds (columns), e.g. 0-7 or 1,5,9")
    p.add_argument("--out", type=Path, default="samples/generate.png", help="output file or folder")
    p.add_argument(
        "--format",
        choices=["grid", "pngs", "npz"],
        help="grid: one PNG; pngs: a folder of PNGs; npz: ADM format (arr_0 uint8 NHWC, "
        "arr_1 labels). Default: from --out (.png grid, .npz npz, else a folder)",
    )
    p = sampling_command(cmd_interpolate)
    p.add_argument("--classes", nargs="+", default=["0"], help="key classes, e.g. 0 or 0 3 5")
    p.add_argument("--seeds", default="0-3", help="key seeds, e.g. 0-3 (one broadcasts)")
    p.add_argument("--steps", type=int, default=16, help="frames from one key to the next")
    p.add_argument("--loop", action="store_true", help="return to the first key")
    p.add_argument("--fps", type=float, default=12.0, help="animation frame rate")
    p.add_argument(
        "--out",
        type=Path,
        nargs="+",
        default=[Path("samples/interpolate.gif")],
        help=".gif or .mp4 (animation; MP4 through OpenCV) and/or .png (a strip of frames)",
    )
    p.add_argument("--strip-frames", type=int, default=8, help="frames in a .png strip")
    p = sampling_command(cmd_mix)
    p.add_argument(
        "--levels",
        default="shape",
        help="levels copied from A: shape (0-4), style (5 to the last) or START:STOP, the "
        "half-open range [START, STOP) (default: %(default)s)",
    )
    p.add_argument("--source-classes", nargs="+", default=["0"], help="classes of A (rows)")
    p.add_argument("--source-seeds", default="0-3", help="seeds of A (rows)")
    p.add_argument("--target-classes", nargs="+", default=["0"], help="classes of B (columns)")
    p.add_argument("--target-seeds", default="4-7", help="seeds of B (columns)")
    p.add_argument(
        "--out", type=Path, default="samples/mix.png", help="grid PNG (row 0: the targets)"
    )
    p = command(cmd_publish, generator=True)
    p.add_argument("--name", default="polyinr-generator", help="registered model name")
    p.add_argument(
        "--mlflow-run",
        help="log the model in this run (default: the training run recorded in the generator)",
    )
    p = command(cmd_restore)
    p.add_argument("run", help="the run's name (tracking.run_name with {params} filled in)")
    p.add_argument("--no-pull", action="store_true", help="only write params.yaml and dvc.lock")
    p = command(cmd_class_embeddings, device="auto, cpu, cuda, cuda:N")
    p.add_argument("--out", default=None, help="output file (default: train.embed_init)")
    p.add_argument(
        "--allow-random-weights", action="store_true", help="tests only: random feature weights"
    )
    p = command(cmd_summary)
    p.add_argument("--skip-discriminator", action="store_true", help="generator only (fast)")
    return parser


def _terminated(signum, frame):
    raise SystemExit(143)  # 128 + SIGTERM, as after a pre-emption checkpoint


def main(argv=None) -> int:
    # As a command (not called from Python): SIGTERM before training installs its own
    # handler (imports, config, storage checks) exits as an interrupted job would, 143, and
    # once the command is done it is ignored, so the shutdown after it cannot end in -15.
    command_line = argv is None and threading.current_thread() is threading.main_thread()
    if command_line:
        signal.signal(signal.SIGTERM, _terminated)
    parser = _parser()
    # Overrides are taken out before argparse sees them, so that they work anywhere on every
    # command: after a positional (`demo-data DIR a.b=1`) or after an option that takes
    # several values (`interpolate --out w.gif w.png a.b=1`).
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args, extra = parser.parse_known_args([a for a in argv if not OVERRIDE.match(a)])
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra, *overrides]
    from polyinr.core.errors import PREEMPTED, exit_code

    try:
        if getattr(args, "overrides", None):
            _config(args)  # a typo in an override is an error even where params are unused
        args.func(args)
    except Exception as e:
        # One line and the code of core/errors.py (2 usage, 75 transient, 143 pre-empted);
        # anything else is a bug and keeps its traceback.
        code = exit_code(e)
        if code is None:
            raise
        error = "" if code == PREEMPTED else "error: "
        print(f"polyinr {args.command}: {error}{e}", file=sys.stderr)
        return code
    finally:
        if command_line:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0
