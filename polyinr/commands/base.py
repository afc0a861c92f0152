"""What every `polyinr` subcommand shares: its parser, described by the function it runs, with
--params, the trailing `section.key=value` overrides and --quiet; its config; its device."""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path

from polyinr.training.rundir import DEFAULT as RUN_DIR
from polyinr.training.rundir import RunDir

GENERATOR = RunDir(RUN_DIR).generator  # every command's default --generator
TORCHRUN_DEVICE = "auto (torchrun-aware), cpu, cuda, cuda:N"
DEVICE = "auto, cpu, cuda, cuda:N"
# `section.key=value` (DVC's `-S` grammar), told apart from paths and option values.
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def command(parent, func, name=None, device=None, generator=False) -> argparse.ArgumentParser:
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


def config(args):
    """The params of --params with the command's overrides."""
    from polyinr.core import config

    return config.load(args.params, args.overrides)


def device(name: str):
    """--device: auto is CUDA when there is one."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
