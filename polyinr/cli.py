"""The `polyinr` command: demo data, FFCV preparation, training, evaluation, sampling."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  polyinr demo-data data/demo                 # the embedded demo dataset
  polyinr prepare                             # data.source -> data/ffcv/train_<R>.beton
  polyinr train train.batch=16                # train (rerun the same command to resume)
  polyinr evaluate                            # metrics/eval.json + samples/grid.png
  polyinr generate --classes 0 1 --seeds 0-7 --psi 0.6 --out grid.png
  polyinr class-embeddings                    # SPEC 2: class embeddings, pretrained init
  polyinr summary --params configs/imagenet-256.yaml

Every command reads params.yaml (or --params FILE); trailing section.key=value arguments
override it, with the same grammar as `dvc exp run -S`.
"""


PREPARE_HELP = """\
Convert data.source to data.out_dir/train_<R>.beton (+ train_<R>.json, its manifest) for
every resolution R in train.stages: centre square, Lanczos resize, data.encoding (jpg at
data.jpeg_quality, or raw), labels = index of the sorted wnid.

data.source is either an ImageNet folder (<source>/train/<wnid>/*.JPEG) or the official
ILSVRC2012_img_train.tar (a tar of <wnid>.tar files), read in place without extracting.
Grayscale, CMYK and PNG files are converted to RGB; empty, truncated, corrupt, non-image
and unreadable files are skipped, listed in the manifest with the reason, and summed up
in one warning line (exit 0); with data.strict=true they fail the command instead (exit 2)
and nothing is written. data.workers processes decode in parallel (0: every core).

  polyinr prepare data.source=/data/ILSVRC2012_img_train.tar data.workers=0
"""


def _seeds(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


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
    resolutions = sorted({s.resolution for s in cfg.train.stages})
    for manifest in data.prepare(cfg.data, resolutions, progress=not args.quiet):
        path = data.beton_path(cfg.data.out_dir, manifest["resolution"])
        print(
            f"{path}: {manifest['written']} images, {len(manifest['skipped'])} skipped, "
            f"{manifest['images_per_second']:.0f} img/s"
        )


def cmd_train(args) -> None:
    from polyinr import train

    cfg = _config(args)
    device = train.setup_distributed() if args.device == "auto" else _device(args.device)
    summary = train.train(cfg, device, progress=not args.quiet)
    print(json.dumps(summary))


def cmd_evaluate(args) -> None:
    import torch
    from PIL import Image

    from polyinr import data, metrics, tracking
    from polyinr.generator import load_generator, render_grid

    cfg = _config(args)
    device = _device(args.device)
    g, meta = load_generator(args.generator, device)
    beton = data.beton_path(cfg.data.out_dir, meta["resolution"])
    reals = data.read_all(beton, batch_size=cfg.eval.batch)
    torch.manual_seed(cfg.eval.seed)
    result = metrics.evaluate(
        g, reals, cfg.eval, cfg.generator.num_classes, device, progress=not args.quiet
    )
    result["resolution"] = meta["resolution"]
    result["kimg"] = meta["cur_nimg"] / 1000
    result["discriminator_pretrained"] = meta["discriminator_pretrained"]
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
            tracking.set_tags(
                {
                    "eval.protocol": result["protocol"],
                    "eval.inception_weights": result["inception_weights"],
                }
            )
            tracking.log_artifact(out)
            tracking.log_artifact(args.grid)
    print(result["label"] if "label" in result else json.dumps(result))
    print(f"wrote {out} and {args.grid}")


def cmd_generate(args) -> None:
    from PIL import Image

    from polyinr.generator import load_generator, render_grid

    g, meta = load_generator(args.generator, _device(args.device))
    seeds = _seeds(args.seeds)
    classes = [c for c in args.classes for _ in seeds]
    grid = render_grid(
        g,
        classes,
        seeds * len(args.classes),
        args.psi,
        rows=len(args.classes),
        resolution=args.resolution,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out)
    print(f"wrote {args.out}: {len(args.classes)} classes x {len(seeds)} seeds, psi {args.psi}")


def cmd_class_embeddings(args) -> None:
    from polyinr import embedding

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="polyinr",
        description="Poly-INR (CVPR 2023): a GAN whose generator is a per-pixel polynomial MLP.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
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
    p = command("train", cmd_train, "Train (or resume) the schedule in train.stages.")
    p.add_argument("--device", default="auto", help="auto (torchrun-aware), cpu, cuda, cuda:N")
    p = command("evaluate", cmd_evaluate, "FID and IS of the EMA generator; a sample grid.")
    p.add_argument("--device", default="auto")
    p.add_argument("--generator", default="models/generator.pt", help="exported generator")
    p.add_argument("--out", default="metrics/eval.json", help="metrics JSON (a DVC metric)")
    p.add_argument("--grid", default="samples/grid.png", help="sample grid PNG")
    p = command("generate", cmd_generate, "A PNG grid of samples: rows are classes, columns seeds.")
    p.add_argument("--device", default="auto")
    p.add_argument("--generator", default="models/generator.pt", help="exported generator")
    p.add_argument("--classes", type=int, nargs="+", default=[0], help="class ids (rows)")
    p.add_argument("--seeds", default="0-7", help="seeds (columns), e.g. 0-7 or 1,5,9")
    p.add_argument("--psi", type=float, default=1.0, help="truncation towards the class mean")
    p.add_argument(
        "--resolution", type=int, default=None, help="render size (any; default: trained)"
    )
    p.add_argument("--out", default="samples/generate.png")
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

    args = parser.parse_args(argv)
    from polyinr.config import ConfigError

    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"polyinr {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
