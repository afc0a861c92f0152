"""`python -m benchmarks [--quick] [--only NAME ...]`: every benchmark module, one table.

A module joins by living in this package and defining `run(quick: bool) -> list[dict]`
(benchmarks/README.md). The table prints as Markdown, ready for the README.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
import traceback

import torch

import benchmarks
from benchmarks import ROW_KEYS, cpu_flags, fast_bf16

# Table order; any other module of the package with a run() follows in name order.
ORDER = ["generator", "train_step", "loader", "metrics", "evaluate"]


def discover() -> tuple[dict, dict]:
    """({name: module} for the package's modules that define run(quick), {name: import error})."""
    names = [m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "__main__"]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    found, broken = {}, {}
    for name in names:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except Exception as e:  # one broken module must not hide the others' numbers
            broken[name] = f"{type(e).__name__}: {e}"
            continue
        if callable(getattr(module, "run", None)):
            found[name] = module
    return found, broken


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def table(rows: list[dict]) -> str:
    """Rows as a Markdown table."""
    head = ["benchmark", "case", "ours", "baseline", "unit", "ratio", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in head) + " |")
    return "\n".join(lines)


def environment() -> str:
    """One line on where the numbers come from: load matters on shared machines."""
    dev = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    bf16 = fast_bf16(benchmarks.device()) or "no native bf16"
    cpu = platform.processor() or platform.machine()
    amx = "AMX" if "amx_bf16" in cpu_flags() else "no AMX"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"torch {torch.__version__}, {dev}, {cpu} ({os.cpu_count()} CPUs, {amx}), "
        f"{torch.get_num_threads()} threads, bf16: {bf16}, load average {load}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of polyinr against baselines measured in the same run; "
        "prints one Markdown table (ratio > 1: ours is better).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller cases: about 1-1.5 min of 2 idle CPU cores"
    )
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run only this module (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmark modules and exit")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    modules, broken = discover()
    if args.list:
        for name, module in modules.items():
            print(f"{name}: {(module.__doc__ or '').strip().splitlines()[0]}")
        for name, error in broken.items():
            print(f"{name}: cannot import ({error})")
        return 0
    unknown = sorted(set(args.only or []) - set(modules) - set(broken))
    if unknown:
        parser.error(f"unknown benchmark {unknown}; available: {sorted(modules)}")
    selected = [n for n in modules if not args.only or n in args.only]

    print(environment(), file=sys.stderr)
    rows, failed = [], []
    for name, error in broken.items():
        if not args.only or name in args.only:
            print(f"benchmarks.{name} cannot be imported: {error}", file=sys.stderr)
            failed.append(name)
            rows.append({"benchmark": name, "case": f"FAILED to import: {error}"})
    for name in selected:
        start = time.perf_counter()
        print(f"running {name}{' (quick)' if args.quick else ''} ...", file=sys.stderr, flush=True)
        try:
            new = modules[name].run(args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            rows.append({"benchmark": name, "case": "FAILED (traceback above)"})
            continue
        for r in new:
            missing = [k for k in ROW_KEYS if k not in r]
            if missing:
                raise ValueError(f"benchmark {name}: a row lacks {missing}: {r}")
        rows.extend(new)
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    print(table(rows))
    print(f"\n{environment()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
