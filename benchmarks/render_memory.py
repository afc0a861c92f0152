"""Peak memory of `polyinr generate` at a resolution, per chunk size: it follows the chunk,
not the resolution. Each render runs in a fresh process; its peak RSS comes from wait4.

    python benchmarks/render_memory.py --resolution 2048 --chunk 16384 65536 262144
    python benchmarks/render_memory.py --paper --resolution 2048 --view-pixels 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from polyinr.commands.base import GENERATOR

ROOT = Path(__file__).resolve().parents[1]


def paper_generator(path: Path) -> None:
    """The paper's 45.9M-parameter generator with RANDOM weights (memory and time only)."""
    import torch

    from polyinr.core import config
    from polyinr.model.generator import Generator, save_generator

    cfg = config.load(ROOT / "configs/imagenet-256.yaml", [])
    torch.manual_seed(0)
    meta = {"resolution": 256, "cur_nimg": 0, "label": "random weights"}
    save_generator(Generator(cfg.generator, 256), path, meta)


def measure(generator: Path, resolution: int, chunk: int, view_pixels: int, out: Path) -> dict:
    """Render seed 0 in a child process; returns its peak RSS (MiB) and wall time."""
    # A view_pixels-wide window of the resolution's pixel grid: same pixel pitch, same chunks,
    # fewer of them (for generators too slow to render whole at this resolution).
    size, box = resolution, ["0", "0", "1", "1"]
    if view_pixels and view_pixels < resolution:
        size, edge = view_pixels, (view_pixels - 1) / (resolution - 1)
        box = ["0", "0", f"{edge!r}", f"{edge!r}"]
    argv = [sys.executable, "-m", "polyinr", "generate", "--generator", str(generator)]
    argv += ["--seeds", "0", "--resolution", str(size), "--view", *box, "--chunk", str(chunk)]
    argv += ["--out", str(out), "--device", "cpu", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(argv)} failed with status {status}")
    return {
        "resolution": resolution,
        "rendered": f"{size}x{size}",
        "chunk": chunk,
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--generator", default=GENERATOR, help="exported generator")
    p.add_argument("--paper", action="store_true", help="the paper's generator, random weights")
    p.add_argument("--resolution", type=int, default=2048)
    p.add_argument("--chunk", type=int, nargs="+", default=[65536])
    p.add_argument("--view-pixels", type=int, default=0, help="render only this many pixels wide")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generator = Path(args.generator)
        if args.paper:
            generator = Path(tmp) / "paper-random.pt"
            paper_generator(generator)
        for chunk in args.chunk:
            row = measure(generator, args.resolution, chunk, args.view_pixels, Path(tmp) / "x.png")
            row["generator"] = "paper config, random weights" if args.paper else str(generator)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
