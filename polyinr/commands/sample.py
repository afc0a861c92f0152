"""The sampling commands (generate, interpolate, mix): their parsers and bodies, which drive
polyinr.model.sampling."""

from __future__ import annotations

from pathlib import Path

from polyinr.commands import base


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

    with tracking.start_run(base.config(args).tracking, run_id=args.mlflow_run):
        for path in paths:
            tracking.log_artifact(path, folder)
    print(f"logged {', '.join(map(str, paths))} to MLflow run {args.mlflow_run} ({folder}/)")


def _generator(args):
    """The generator of --generator on --device, and the render options of the flags."""
    from polyinr.model.generator import load_generator

    g, _ = load_generator(args.generator, base.device(args.device))
    return g, {"view": args.view, "chunk": args.chunk, "progress": not args.quiet}


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


def _sampling_command(sub, func, many_resolutions=False):
    """A sampling command's parser: the render options every one of them takes."""
    from polyinr.model.sampling import DEFAULT_CHUNK, FULL_VIEW

    p = base.command(sub, func, device=base.DEVICE, generator=True)
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
        help="pixels per synthesis call; sets peak memory, not the result (default: %(default)s)",
    )
    p.add_argument("--mlflow-run", help="also log the output to this MLflow run id")
    return p


def add_parsers(sub) -> None:
    """generate, interpolate and mix, as subcommands of `sub`."""
    p = _sampling_command(sub, cmd_generate, many_resolutions=True)
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
    p = _sampling_command(sub, cmd_interpolate)
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
    p = _sampling_command(sub, cmd_mix)
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
