"""`python -m convrot {demo,quantize,inspect,bench,quality}`; `demo` is the default."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from .hadamard import SUPPORTED_GROUP_SIZES
from .policy import DEFAULT_PRESET, PRESETS


class Progress:
    """A one-line progress bar on stderr: quantizing a 12B model takes long enough that silence looks like a hang."""

    def __init__(self, label: str):
        self.label, self.t0 = label, time.time()

    def __call__(self, done: int, total: int, item: str) -> None:
        width = 30
        fill = width * done // max(total, 1)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} "
                         f"{time.time() - self.t0:5.1f}s {item[:40]:<40}{end}")
        sys.stderr.flush()


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def cmd_quantize(a) -> int:
    from .convert import quantize_file
    plan = quantize_file(a.input, a.output, a.group_size, a.preset, a.overrides, a.device, Progress("quantize"),
                         overwrite=a.overwrite)
    counts = {}
    for act in plan.actions.values():
        counts[act] = counts.get(act, 0) + 1
    print(f"wrote {a.output}: {_gb(plan.bytes_in)} -> {_gb(plan.bytes_out)} "
          f"({plan.bytes_in / max(plan.bytes_out, 1):.2f}x smaller); layers: "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0


def cmd_inspect(a) -> int:
    from .convert import inspect_file
    r = inspect_file(a.file)
    print(f"{r['file']}: {len(r['layers'])} linear layers, {_gb(r['total_bytes'])} in all")
    print(f"{'layer':<44} {'format':<36} {'shape':>14} {'bytes':>10} {'vs bf16':>8}")
    for row in r["layers"]:
        shape = "x".join(map(str, row["shape"]))
        print(f"{row['layer']:<44} {row['format']:<36} {shape:>14} {row['bytes']:>10} "
              f"{row['bf16_bytes'] / max(row['bytes'], 1):>7.2f}x")
    q = sum(r["bytes"] for r in r["layers"])
    b = sum(r["bf16_bytes"] for r in r["layers"])
    # a bf16 (or fp32) file is not "1.00x smaller": that reads as a quantization that did nothing
    print(f"linear layers: {_gb(q)} stored vs {_gb(b)} in bf16 ("
          + (f"{b / max(q, 1):.2f}x smaller" if q < b else "not quantized") + ")")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo
    return run_demo(a.preset, a.group_size, a.hidden, a.depth, a.single, a.seed)


# subcommands whose modules parse their own arguments (argparse.REMAINDER would reject leading options)
PASSTHROUGH = {"bench": "per-linear GPU timings against bf16 cuBLAS",
               "quality": "per-layer and end-to-end error of each preset"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convrot", description="ConvRot W4A4 for FLUX transformers")
    sub = p.add_subparsers(dest="cmd")

    def common(sp):
        sp.add_argument("--group-size", type=int, default=256, choices=SUPPORTED_GROUP_SIZES)
        sp.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS) + ["quality"],
                        help="; ".join(f"{k}: {v}" for k, v in PRESETS.items()))

    d = sub.add_parser("demo", help="quantize a seeded FLUX-architecture model and report its error (default)")
    common(d)
    d.add_argument("--hidden", type=int, default=512)
    d.add_argument("--depth", type=int, default=2, help="double blocks")
    d.add_argument("--single", type=int, default=4, help="single blocks")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    q = sub.add_parser("quantize", help="convert a FLUX safetensors file to the native ConvRot format")
    q.add_argument("input")
    q.add_argument("output")
    common(q)
    q.add_argument("--overrides", default=None, help="'pattern = action' lines or JSON {pattern: action}")
    q.add_argument("--device", default=None, help="where to quantize (default: cuda if available, else cpu)")
    q.add_argument("--overwrite", action="store_true",
                   help="allow OUT to be IN itself (replaced once the new file is complete)")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", help="list which layers of a file are quantized and their sizes")
    i.add_argument("file")
    i.set_defaults(func=cmd_inspect)

    for name, text in PASSTHROUGH.items():  # listed for --help; main() hands their arguments over untouched
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    from .checkpoint import CheckpointError
    try:
        if argv and argv[0] in PASSTHROUGH:
            import importlib
            return importlib.import_module(f".{argv[0]}", __package__).main(argv[1:]) or 0
        args = build_parser().parse_args(argv or ["demo"])
        return args.func(args)
    except (CheckpointError, OSError, ValueError) as e:  # OSError: missing or unreadable files, full disks
        print(f"error: {e}", file=sys.stderr)
        return 2
