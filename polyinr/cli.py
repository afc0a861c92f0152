"""The `polyinr` command: demo data, FFCV preparation, training, evaluation, sampling."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

from polyinr.rundir import DEFAULT as RUN_DIR
from polyinr.rundir import RunDir

GENERATOR = RunDir(RUN_DIR).generator  # every command's default --generator

EXAMPLES = """\
examples:
  polyinr demo-data data/demo                 # the embedded demo dataset
  polyinr prepare                             # data.source -> data/ffcv/train_<R>.beton
  polyinr train train.batch=16                # train (rerun the same command to resume)
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


PREPARE_HELP = """\
Convert data.source to data.out_dir/train_<R>.beton (+ train_<R>.json, its manifest) for
every resolution R in train.stages (or each --resolution R): centre square, Lanczos
resize, data.encoding (jpg at data.jpeg_quality, or raw), labels = index of the sorted wnid.

data.source is either an ImageNet folder (<source>/train/<wnid>/*.JPEG) or the official
ILSVRC2012_img_train.tar (a tar of <wnid>.tar files), read in place without extracting.
Grayscale, CMYK and PNG files are converted to RGB; empty, truncated, corrupt, non-image
and unreadable files are skipped, listed in the manifest with the reason, and summed up
in one warning line (exit 0); with data.strict=true they fail the command instead (exit 2)
and nothing is written. data.workers processes decode in parallel (0: every core).

  polyinr prepare data.source=/data/ILSVRC2012_img_train.tar data.workers=0
"""


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


def _keys(classes: list[str], seeds: str) -> list[tuple[int, int]]:
    """Key samples (class, seed): equal-length lists, or one side of length 1 broadcast."""
    cs, ss = _ids(classes), _seeds(seeds)
    if len(cs) == 1:
        cs = cs * len(ss)
    elif len(ss) == 1:
        ss = ss * len(cs)
    if len(cs) != len(ss):
        raise ValueError(
            f"{len(cs)} classes and {len(ss)} seeds: give equal counts, or one of either"
        )
    return list(zip(cs, ss, strict=True))


def _log_outputs(args, paths, folder: str) -> None:
    """Log output files (or folders) to the MLflow run given by --mlflow-run, if any."""
    if not args.mlflow_run:
        return
    from polyinr import tracking

    with tracking.start_run(_config(args).tracking, run_id=args.mlflow_run):
        for path in paths:
            tracking.log_artifact(path, folder)
    print(f"logged {', '.join(map(str, paths))} to MLflow run {args.mlflow_run} ({folder}/)")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _config(args):
    from polyinr import config

    return config.load(args.params, args.overrides)


def cmd_demo_data(args) -> None:
    from polyinr import data

    cfg = _config(args).data
    n = data.make_demo_dataset(
        Path(args.dir), cfg.demo_classes, cfg.demo_per_class, cfg.demo_size, cfg.demo_seed
    )
    print(f"wrote {n} images in {cfg.demo_classes} classes to {Path(args.dir) / 'train'}")


def cmd_prepare(args) -> None:
    from polyinr import data

    cfg = _config(args)
    resolutions = args.resolution or sorted({s.resolution for s in cfg.train.stages})
    for manifest in data.prepare(cfg.data, resolutions, progress=not args.quiet):
        path = data.beton_path(cfg.data.out_dir, manifest["resolution"])
        print(f"{path}: {manifest['written']} images, {len(manifest['skipped'])} skipped")


def cmd_train(args) -> None:
    import torch.distributed as dist

    from polyinr import distributed, train

    device = distributed.setup() if args.device == "auto" else _device(args.device)
    if args.follow:  # another node's ranks: rank 0 says what to run, and where
        cfg, until_stage, workdir, run_dir = distributed.from_rank0(None)
        os.chdir(workdir)
    else:
        cfg, until_stage, run_dir = _config(args), args.until_stage, args.run_dir
        distributed.from_rank0((cfg, until_stage, os.getcwd(), run_dir))
    try:
        summary = train.train(cfg, device, run_dir, not args.quiet, until_stage, args.restart)
        if dist.is_initialized() and dist.get_rank() > 0:
            return  # rank 0 reports for all (their weights are identical)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(json.dumps(summary))


def cmd_checkpoints(args) -> None:
    from polyinr.checkpoints import CheckpointStore

    cfg = _config(args)
    store = CheckpointStore(cfg.storage, cfg.tracking.run_name)
    if store.s3 is not None:
        store.check()  # credentials and bucket, with one clear message
    for record in store.records():
        print(json.dumps(record))


def cmd_evaluate(args) -> None:
    import torch.distributed as dist
    from PIL import Image

    from polyinr import distributed, metrics, tracking
    from polyinr.generator import load_generator, render_grid

    cfg = _config(args)
    # Under torchrun every rank renders and scores its share; rank 0 writes the results.
    device = distributed.setup() if args.device == "auto" else _device(args.device)
    g, meta = load_generator(args.generator, device)
    _note_shape(cfg.generator, g.cfg, args.generator)
    result, seconds = metrics.evaluate_generator(cfg, g, meta["resolution"], device, not args.quiet)
    if dist.is_initialized() and dist.get_rank() > 0:
        return
    print("evaluate: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), file=sys.stderr)
    result["resolution"] = meta["resolution"]
    result["kimg"] = meta["cur_nimg"] / 1000
    result["discriminator_pretrained"] = meta["discriminator_pretrained"]
    result["discriminator_weights"] = meta.get("discriminator_weights", "unrecorded")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    e = cfg.eval
    classes = [
        c for c in range(min(e.grid_classes, g.cfg.num_classes)) for _ in range(e.grid_seeds)
    ]
    seeds = list(range(e.grid_seeds)) * (len(classes) // e.grid_seeds)
    grid = render_grid(g, classes, seeds, e.grid_psi, rows=len(classes) // e.grid_seeds)
    Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.grid)

    if meta.get("mlflow_run_id"):
        with tracking.start_run(cfg.tracking, run_id=meta["mlflow_run_id"]):
            numbers = {k: v for k, v in result.items() if isinstance(v, float | int)}
            tracking.log_metrics({f"eval/{k}": v for k, v in numbers.items()})
            tracking.log_metrics({f"eval_seconds/{k}": v for k, v in seconds.items()})
            tracking.set_tags(
                {
                    "eval.protocol": result["protocol"],
                    "eval.inception_weights": result["inception_weights"],
                    "eval.label": result["label"],
                }
            )
            tracking.log_artifact(out)
            tracking.log_artifact(args.grid)
    print(result["label"] if "label" in result else json.dumps(result))
    print(f"wrote {out} and {args.grid}")


def _note_shape(params, stored, path) -> None:
    """Say so when params.yaml's generator section differs from the generator file's: the
    file wins (it is what was trained), and the log shows which values were ignored."""
    differ = [
        f"{f.name}={getattr(stored, f.name)} (params: {getattr(params, f.name)})"
        for f in dataclasses.fields(stored)
        if getattr(stored, f.name) != getattr(params, f.name)
    ]
    if differ:
        print(
            f"note: the generator's shape comes from {path}: {', '.join(differ)}", file=sys.stderr
        )


def cmd_generate(args) -> None:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from polyinr import sampling
    from polyinr.generator import load_generator

    g, meta = load_generator(args.generator, _device(args.device))
    seeds = _seeds(args.seeds)
    if args.classes == ["random"]:
        if g.cfg.conditional:
            classes = sampling.random_classes(seeds, g.cfg.num_classes)
        else:
            classes = [0] * len(seeds)  # an unconditional generator: label 0 throughout
        pair_seeds = seeds
        rows = -(-len(seeds) // 8)
    else:
        ids = _ids(args.classes)
        classes, pair_seeds, rows = [c for c in ids for _ in seeds], seeds * len(ids), len(ids)
    out = Path(args.out)
    fmt = args.format or {".npz": "npz", ".png": "grid", ".jpg": "grid"}.get(out.suffix, "pngs")
    sizes = [_size(r) for r in args.resolution] or [(meta["resolution"],) * 2]
    if fmt != "grid" and len(sizes) > 1:
        raise ValueError("several resolutions are for --format grid only")
    ws = sampling.mapping(g, classes, pair_seeds, args.psi)  # (N, L, w_dim)
    progress = not args.quiet

    if fmt == "grid":
        # Each sample at every resolution, enlarged (nearest) to the largest for comparison.
        big = max(sizes)
        per_size = [
            sampling.upscale(
                sampling.to_hwc(
                    sampling.render(g, ws, sampling.view_grid(*hw, args.view), args.chunk, progress)
                ),
                big,
            )
            for hw in sizes
        ]
        images = np.stack(per_size, axis=1).reshape(-1, *per_size[0].shape[1:])
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sampling.tile(images, rows)).save(out)
    else:
        coords = sampling.view_grid(*sizes[0], args.view)
        if fmt == "npz":
            writer = sampling.NpzWriter(out, len(ws), *sizes[0])
        else:
            out.mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(len(ws)), desc="generate", unit="img", disable=not progress):
            image = sampling.to_hwc(sampling.render(g, ws[i : i + 1], coords, args.chunk))
            if fmt == "npz":
                writer.write(image, classes[i : i + 1])
            else:
                name = f"{i:06d}-class{classes[i]}-seed{pair_seeds[i]}.png"
                Image.fromarray(image[0]).save(out / name)
        if fmt == "npz":
            writer.close()
    size = " ".join(f"{h}x{w}" for h, w in sizes)
    print(f"wrote {out} ({fmt}): {len(ws)} samples at {size}, psi {args.psi}")
    _log_outputs(args, [out], "generate")


def _write_video(path: Path, frames, fps: float) -> None:
    """uint8 (F, H, W, 3) frames -> an animated GIF (Pillow) or an MP4 (OpenCV's MPEG-4)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        first, *rest = (Image.fromarray(f) for f in frames)
        first.save(path, save_all=True, append_images=rest, duration=1000 / fps, loop=0)
        return
    try:
        import cv2
    except ImportError:
        raise ValueError("MP4 needs OpenCV (pip install opencv-python); write a .gif") from None
    h, w = frames.shape[1:3]
    video = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not video.isOpened():
        raise ValueError(f"OpenCV cannot write {path} (no MPEG-4 encoder); write a .gif")
    for frame in frames:
        video.write(frame[:, :, ::-1].copy())  # OpenCV wants BGR
    video.release()


def cmd_interpolate(args) -> None:
    import numpy as np
    from PIL import Image

    from polyinr import sampling
    from polyinr.generator import load_generator

    outs = [Path(p) for p in args.out]
    bad = [str(p) for p in outs if p.suffix not in (".gif", ".mp4", ".png")]
    if bad:
        raise ValueError(f"--out {bad}: use .gif or .mp4 (animation) or .png (strip)")
    g, meta = load_generator(args.generator, _device(args.device))
    keys = _keys(args.classes, args.seeds)
    if args.loop:
        keys.append(keys[0])
    if len(keys) < 2:
        raise ValueError("interpolation needs at least two keys: several seeds or classes")
    ws_keys = sampling.mapping(g, [c for c, _ in keys], [s for _, s in keys], args.psi)
    ws = sampling.interpolate(ws_keys, args.steps)  # (F, L, w_dim)
    size = _size(args.resolution) if args.resolution else (meta["resolution"],) * 2
    coords = sampling.view_grid(*size, args.view)
    frames = sampling.to_hwc(sampling.render(g, ws, coords, args.chunk, not args.quiet))
    for out in outs:
        if out.suffix == ".png":
            picks = np.linspace(0, len(frames) - 1, min(args.strip_frames, len(frames)))
            strip = sampling.tile(frames[picks.round().astype(int)], rows=1, pad=2)
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(strip).save(out)
        else:
            # A loop's last frame is its first: drop it so the animation cycles smoothly.
            _write_video(out, frames[:-1] if args.loop else frames, args.fps)
    print(f"wrote {', '.join(map(str, outs))}: {len(keys)} keys, {len(frames)} frames")
    _log_outputs(args, outs, "interpolate")


def cmd_mix(args) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from polyinr import sampling
    from polyinr.generator import load_generator

    g, meta = load_generator(args.generator, _device(args.device))
    start, stop = sampling.mix_levels(args.levels, g.cfg.levels)
    sources = _keys(args.source_classes, args.source_seeds)
    targets = _keys(args.target_classes, args.target_seeds)
    ws_a = sampling.mapping(g, [c for c, _ in sources], [s for _, s in sources], args.psi)
    ws_b = sampling.mapping(g, [c for c, _ in targets], [s for _, s in targets], args.psi)
    mixed = sampling.mix(ws_a, ws_b, start, stop)  # (NA, NB, L, w_dim)
    size = _size(args.resolution) if args.resolution else (meta["resolution"],) * 2
    coords = sampling.view_grid(*size, args.view)
    ws = torch.cat([ws_b, ws_a, mixed.flatten(0, 1)])
    images = sampling.to_hwc(sampling.render(g, ws, coords, args.chunk, not args.quiet))
    nb, na = len(targets), len(sources)
    # Row 0: the targets B; column 0: the sources A; cell (i, j): B_j with A_i's levels.
    blank = np.full_like(images[:1], 255)
    rows = [np.concatenate([blank, images[:nb]])]
    for i in range(na):
        cells = images[nb + na + i * nb : nb + na + (i + 1) * nb]
        rows.append(np.concatenate([images[nb + i : nb + i + 1], cells]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sampling.tile(np.concatenate(rows), rows=na + 1, pad=2)).save(out)
    print(f"wrote {out}: {na} sources x {nb} targets, levels [{start}, {stop})")
    _log_outputs(args, [out], "mix")


def cmd_publish(args) -> None:
    from polyinr import registry
    from polyinr.generator import load_generator

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
    import subprocess

    from polyinr import pipeline
    from polyinr.checkpoints import CheckpointStore

    # argparse deals the trailing words to overrides first: the run is the one without "=".
    words = [*args.overrides, args.run]
    names = [w for w in words if "=" not in w]
    if len(names) != 1:
        raise ValueError(f"give one run name (and section.key=value overrides), got {words}")
    args.run, args.overrides = names[0], [w for w in words if "=" in w]
    cfg = _config(args)
    store = CheckpointStore(cfg.storage, args.run)
    found = pipeline.load_record(store, Path.cwd())
    if "dvc.lock" not in found:
        raise FileNotFoundError(f"no dvc.lock recorded in {store.uri} (storage.uri, run name?)")
    print(f"restored {', '.join(found)} of run {args.run} from {store.uri}")
    if not args.no_pull:
        subprocess.run([pipeline.DVC, "pull"], check=True)


def cmd_class_embeddings(args) -> None:
    from polyinr import data, embedding

    cfg = _config(args)
    if not cfg.generator.conditional:
        raise ValueError("class embeddings are for a conditional generator")
    if not cfg.discriminator.pretrained and not args.allow_random_weights:
        raise ValueError(
            "class embeddings come from the pretrained "
            f"{embedding.NETWORK}; set discriminator.pretrained=true and put its weights in "
            f"{cfg.discriminator.weights_dir} (--allow-random-weights only for tests)"
        )
    out = args.out or cfg.train.embed_init or "weights/class_embeddings.pt"
    resolution = max(s.resolution for s in cfg.train.stages)
    data.check_prepared(cfg.data.out_dir, resolution, cfg.generator.num_classes)
    table = embedding.compute(
        cfg.data,
        resolution,
        cfg.generator.num_classes,
        cfg.discriminator.weights_dir,
        pretrained=cfg.discriminator.pretrained,
        device=_device(args.device),
        progress=not args.quiet,
    )
    meta = {
        "network": embedding.NETWORK,
        "pretrained": cfg.discriminator.pretrained,
        "resolution": resolution,
        "data": str(cfg.data.out_dir),
    }
    embedding.save(table, out, meta)
    label = "" if cfg.discriminator.pretrained else " (RANDOM feature weights: test only)"
    print(f"wrote {out}: {tuple(table.shape)} class embeddings from {embedding.NETWORK}{label}")


def cmd_summary(args) -> None:
    import torch

    from polyinr import discriminator, generator

    cfg = _config(args)
    first = cfg.train.stages[0].resolution
    g = generator.Generator(cfg.generator, first)
    out = {"generator": generator.parameter_counts(g)}
    if not args.skip_discriminator:
        # Shapes only: random weights count the same as pretrained ones.
        d_cfg = dataclasses.replace(cfg.discriminator, pretrained=False)
        with torch.random.fork_rng(devices=[]):
            d = discriminator.ProjectedDiscriminator(d_cfg, first, cfg.generator.num_classes)
        out["discriminator"] = discriminator.parameter_counts(d)
    resolutions = sorted({s.resolution for s in cfg.train.stages})
    out["macs_per_image"] = {
        str(r): generator.macs_per_image(cfg.generator, r) for r in resolutions
    }
    print(json.dumps(out, indent=2))


def _terminated(signum, frame):
    raise SystemExit(143)  # 128 + SIGTERM, as after a pre-emption checkpoint


def main(argv=None) -> int:
    # As a command (not called from Python): SIGTERM before training installs its own
    # handler (imports, config, storage checks) exits as an interrupted job would, 143, and
    # once the command is done it is ignored, so the shutdown after it cannot end in -15.
    command_line = argv is None and threading.current_thread() is threading.main_thread()
    if command_line:
        signal.signal(signal.SIGTERM, _terminated)
    parser = argparse.ArgumentParser(
        prog="polyinr",
        description="Poly-INR (CVPR 2023): a GAN whose generator is a per-pixel polynomial MLP.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text, parent=sub):
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--params", default="params.yaml", help="complete params file (default: %(default)s)"
        )
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override params")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    p = command("demo-data", cmd_demo_data, "Write the demo dataset (ImageNet layout) to DIR.")
    p.add_argument("dir", help="output folder; images go to DIR/train/<wnid>/*.JPEG")
    p = command(
        "prepare", cmd_prepare, "Convert data.source to one FFCV file per training resolution."
    )
    p.description = PREPARE_HELP
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--resolution",
        type=int,
        action="append",
        metavar="R",
        help="convert at R px only (repeatable; default: every resolution in train.stages). "
        "DVC's prepare@<i> stages run one resolution each",
    )
    p = command("train", cmd_train, "Train (or resume) the schedule in train.stages.")
    p.add_argument("--device", default="auto", help="auto (torchrun-aware), cpu, cuda, cuda:N")
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
        "--follow",
        action="store_true",
        help="multi-node: take params, --until-stage and the working directory (on a shared "
        "volume) from rank 0, so that other nodes need no params (deploy/k8s)",
    )
    p = sub.add_parser("checkpoints", help="The run's checkpoints (storage.uri).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    command(
        "list",
        cmd_checkpoints,
        "List the run's committed checkpoints (storage.uri / tracking.run_name), one JSON "
        "line each: name, uri, stage, resolution, kimg, size, sha256, weights_sha256 (a hash "
        "of the EMA generator's tensors), latest, best. `latest` marks the newest one that "
        "matches its size and sha256; a newer one that does not carries `corrupt` (the reason).",
        parent=actions,
    )
    p = command(
        "evaluate",
        cmd_evaluate,
        "FID, sFID, IS, precision/recall and rFID of the EMA generator (eval.protocol), a grid.",
    )
    p.add_argument("--device", default="auto", help="auto (torchrun-aware), cpu, cuda, cuda:N")
    p.add_argument("--generator", default=GENERATOR, help="exported generator")
    p.add_argument("--out", default="metrics/eval.json", help="metrics JSON (a DVC metric)")
    p.add_argument("--grid", default="samples/grid.png", help="sample grid PNG")

    def sampling_args(p, many_resolutions=False):
        from polyinr.sampling import DEFAULT_CHUNK, FULL_VIEW

        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        p.add_argument("--generator", default=GENERATOR, help="exported generator")
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

    p = command(
        "generate", cmd_generate, "Samples as a PNG grid (rows classes), PNG files or an npz."
    )
    sampling_args(p, many_resolutions=True)
    p.add_argument(
        "--classes",
        nargs="+",
        default=["0"],
        help="class ids (grid rows), e.g. 0 1 2 or 0-9; 'random': one uniform class per seed",
    )
    p.add_argument("--seeds", default="0-7", help="seeds (columns), e.g. 0-7 or 1,5,9")
    p.add_argument("--out", default="samples/generate.png", help="output file or folder")
    p.add_argument(
        "--format",
        choices=["grid", "pngs", "npz"],
        help="grid: one PNG; pngs: a folder of PNGs; npz: ADM format (arr_0 uint8 NHWC, "
        "arr_1 labels). Default: from --out (.png grid, .npz npz, else a folder)",
    )

    p = command(
        "interpolate",
        cmd_interpolate,
        "A walk in w space through key samples (seeds and/or classes): GIF, MP4, PNG strip.",
    )
    sampling_args(p)
    p.add_argument("--classes", nargs="+", default=["0"], help="key classes, e.g. 0 or 0 3 5")
    p.add_argument("--seeds", default="0-3", help="key seeds, e.g. 0-3 (one broadcasts)")
    p.add_argument("--steps", type=int, default=16, help="frames from one key to the next")
    p.add_argument("--loop", action="store_true", help="return to the first key")
    p.add_argument("--fps", type=float, default=12.0, help="animation frame rate")
    p.add_argument(
        "--out",
        nargs="+",
        default=["samples/interpolate.gif"],
        help=".gif or .mp4 (animation; MP4 through OpenCV) and/or .png (a strip of frames)",
    )
    p.add_argument("--strip-frames", type=int, default=8, help="frames in a .png strip")

    p = command(
        "mix",
        cmd_mix,
        "Copy levels [a, b) of sources A's w into targets B: a grid, rows A, columns B.",
    )
    sampling_args(p)
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
    p.add_argument("--out", default="samples/mix.png", help="grid PNG (row 0: the targets)")

    p = command(
        "publish",
        cmd_publish,
        "Register the generator in the MLflow Model Registry as a pyfunc model "
        "(class_id, seed; psi, resolution -> uint8 images) at tracking.uri.",
    )
    p.add_argument("--generator", default=GENERATOR, help="exported generator")
    p.add_argument("--name", default="polyinr-generator", help="registered model name")
    p.add_argument(
        "--mlflow-run",
        help="log the model in this run (default: the training run recorded in the generator)",
    )
    p = command(
        "restore",
        cmd_restore,
        "Restore a run's pipeline state from the remotes into this checkout: its params.yaml "
        "and dvc.lock (recorded beside its checkpoints in storage.uri by the Prefect flow), "
        "then `dvc pull` of its outputs.",
    )
    p.add_argument("run", help="the run's name (tracking.run_name with {params} filled in)")
    p.add_argument("--no-pull", action="store_true", help="only write params.yaml and dvc.lock")
    p = command(
        "class-embeddings",
        cmd_class_embeddings,
        "Initial class embeddings (num_classes x 320) from the pretrained "
        "tf_efficientnet_lite0: each class's mean pooled last-stage feature over the "
        "prepared training data. Set train.embed_init to the output to use it.",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output file (default: train.embed_init)")
    p.add_argument(
        "--allow-random-weights", action="store_true", help="tests only: random feature weights"
    )
    p = command("summary", cmd_summary, "Parameter counts and multiply-adds as JSON.")
    p.add_argument("--skip-discriminator", action="store_true", help="generator only (fast)")

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
    from polyinr.config import ConfigError
    from polyinr.storage import StorageError
    from polyinr.train import Preempted

    try:
        if getattr(args, "overrides", None):
            _config(args)  # a typo in an override is an error even where params are unused
        args.func(args)
    except Preempted as e:
        print(f"polyinr {args.command}: {e}", file=sys.stderr)
        return 143  # 128 + SIGTERM: schedulers see an interrupted job and rerun it
    except (ConfigError, FileNotFoundError, ValueError, StorageError) as e:
        print(f"polyinr {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if command_line:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0
