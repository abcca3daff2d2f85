"""Per-FLUX-linear timings of the Triton route against cuBLAS bf16 and the CUDA extension, in one run (CUDA only).

    python bench/triton_bench.py [--check] [--group-size 256] [--iters 50] [--shapes 4096x3072x9216,...]

For each (M, K, N): cuBLAS bf16 F.linear, then (times in µs, "x" = bf16 time / route time, > 1 is faster):
  tW4 op      Triton W4A4 whole linear (rotate+quantize to int8 codes, GEMM unpacking the packed int4 weight)
  tW4 cop     tW4 op through the torch.library custom op (linear_op(): what torch.compile sees)
  tW4p op     the same with the weight prepared once as int8 codes (convrot.triton_kernels.prepare_weight)
  tW4 gemm    the Triton GEMM alone (int8 activation codes x packed weight), tW4p gemm with the prepared weight
  t rq        the Triton rotate+quantize pass alone
  tW8 op      Triton W8A8 whole linear
  ext W4 / ext W8   convrot.kernels.linear_fn (the built CUDA extension), when convrot.kernels.available()
Every timed call runs after an L2 flush (a 256 MiB buffer written), timed with CUDA events; medians of --iters.
--check also compares each route's output with convrot.reference on inputs with outlier channels.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convrot import reference  # noqa: E402
from convrot import triton_kernels as tk  # noqa: E402

FLUX_SHAPES = [(4096, 3072, 9216), (4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072),
               (512, 3072, 9216), (4608, 3072, 21504), (4608, 15360, 3072)]


def bench(fn, iters: int, flush: torch.Tensor) -> float:
    """Median µs of fn() over `iters` runs, each after an L2 flush."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1000.0


def make_inputs(m, k, n, group_size, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g)
    x[:, torch.randint(0, k, (8,), device="cuda", generator=g)] *= 40.0  # outlier channels
    x = x.to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    bias = (torch.randn(n, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    w4, s4 = reference.rotate_quantize(w, group_size, 4)
    w8, s8 = reference.rotate_quantize(w, group_size, 8)
    return x, w, bias, (w4, s4), (w8, s8)


def compare(y, want):
    y, want = y.float(), want.float()
    rel = ((y - want).abs().amax() / want.abs().amax().clamp_min(1e-6)).item()
    same = (y == want).float().mean().item()
    return f"max err {rel:.2e} of max|y|, {100 * same:.2f}% bit-equal"


def time_runs(runs: dict, time_fn, where: str) -> dict:
    """name -> time_fn(fn) for every run, None (and one line saying why) for a run that fails."""
    times = {}
    for name, fn in runs.items():
        try:
            times[name] = time_fn(fn)
        except Exception as e:  # noqa: BLE001 - a route that cannot run a shape is a finding, not the end
            times[name] = None
            print(f"  {name} failed at {where}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return times


def row_cells(times: dict, cols: list, width: int) -> str:
    """One table row: bf16 in µs, every other column as its time and its ratio to bf16 ("-" where it failed)."""
    base = times["bf16"]
    cells = []
    for c in cols:
        t = times.get(c)
        if t is None:
            cells.append(f"{'-':>{width}}")
        elif c == "bf16":
            cells.append(f"{t:>{width - 2}.1f}us")
        else:
            cells.append(f"{t:>{width - 8}.1f} {base / t:>{width - 10}.2f}x")
    return " ".join(cells)


def parse_shapes(text: str | None, default: list) -> list[tuple[int, int, int]]:
    """--shapes "MxKxN,MxKxN" as (M, K, N) tuples; `default` when not given."""
    return default if not text else [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="also compare every route with convrot.reference")
    ap.add_argument("--group-size", type=int, default=256, choices=(16, 64, 256))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--shapes", default=None, help="comma-separated MxKxN list (default: the FLUX linears)")
    ap.add_argument("--no-ext", action="store_true", help="skip the CUDA extension route")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("CUDA only: no GPU visible to PyTorch")
        return 2
    shapes = parse_shapes(args.shapes, FLUX_SHAPES)
    g = args.group_size
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    print(f"device: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tk.triton_version()}, G={g}, "
          f"iters={args.iters}, L2 flushed, CUDA events, medians")
    ok, why = tk.available(dev)
    print(f"triton route: {'available' if ok else 'NOT available'}: {why}")
    if not ok:
        return 1
    ext = None
    if not args.no_ext:
        try:
            from convrot import kernels

            if kernels.available(dev):
                ext = kernels
                print(f"CUDA extension: available (sm_{kernels._state['cc'][0]}{kernels._state['cc'][1]})")
            else:
                print(f"CUDA extension: not available ({kernels.unavailable_reason()})")
        except Exception as e:
            print(f"CUDA extension: import failed ({type(e).__name__}: {e})")
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    t4, t8 = tk.linear_fn(g, 4), tk.linear_fn(g, 8)
    e4 = e8 = None
    if ext is not None:
        try:
            e4, e8 = ext.linear_fn(g, 4), ext.linear_fn(g, 8)
        except Exception as e:
            print(f"CUDA extension: linear_fn failed ({type(e).__name__}: {e}); its columns stay empty")

    top = tk.linear_op()
    cols = ["bf16", "tW4 op", "tW4 cop", "tW4p op", "tW4 gemm", "tW4p gemm", "t rq", "tW8 op", "ext W4", "ext W8"]
    print()
    print(f"{'M x K x N':>20} " + " ".join(f"{c:>15}" for c in cols))
    for (m, k, n) in shapes:
        x, w, bias, (w4, s4), (w8, s8) = make_inputs(m, k, n, g)
        w4p = tk.prepare_weight(w4)
        a8, a_s = tk.rotate_quantize(x, g, 4, packed=False)
        runs = {
            "bf16": lambda: F.linear(x, w, bias),
            "tW4 op": lambda: t4(x, w4, s4, bias),
            "tW4 cop": lambda: top(x, w4, s4, bias, g, 4),
            "tW4p op": lambda: t4(x, w4p, s4, bias),
            "tW4 gemm": lambda: tk.gemm(a8, a_s, w4, s4, bias, torch.bfloat16, k=k),
            "tW4p gemm": lambda: tk.gemm(a8, a_s, w4p, s4, bias, torch.bfloat16, k=k),
            "t rq": lambda: tk.rotate_quantize(x, g, 4, packed=False),
            "tW8 op": lambda: t8(x, w8, s8, bias),
        }
        if e4 is not None:
            runs["ext W4"] = lambda: e4(x, w4, s4, bias)
            runs["ext W8"] = lambda: e8(x, w8, s8, bias)
        times = time_runs(runs, lambda fn: bench(fn, args.iters, flush), f"{m}x{k}x{n}")
        print(f"{f'{m}x{k}x{n}':>20} " + row_cells(times, cols, 15))
        try:
            from convrot import _triton_jit as j

            for name, tuner in (("gemm", j.gemm_tuned), ("rq", j.rotate_quantize_tuned)):
                for key, cfg in getattr(tuner, "cache", {}).items():
                    if k in key and (name == "rq" or n in key):
                        print(f"{'':>20}  autotuned {name} {key}: {cfg}")
        except Exception:
            pass
        if args.check:
            q, s = tk.rotate_quantize(x, g, 4)
            qr, sr = reference.rotate_quantize(x, g, 4)
            dq = (reference.unpack_int4(q).int() - reference.unpack_int4(qr).int()).abs()
            srel = ((s - sr).abs() / sr).max().item()
            print(f"{'':>20}  check rq: {int((dq != 0).sum())} of {dq.numel()} codes differ (max {int(dq.max())}), "
                  f"scale max rel diff {srel:.1e}")
            want4 = reference.convrot_linear(x, w4, s4, bias, g, 4)
            want8 = reference.convrot_linear(x, w8, s8, bias, g, 8)
            dense = F.linear(x, w, bias)
            print(f"{'':>20}  check tW4 op: {compare(t4(x, w4, s4, bias), want4)}; tW4p op: "
                  f"{compare(t4(x, w4p, s4, bias), want4)}; tW8 op: {compare(t8(x, w8, s8, bias), want8)}")
            if e4 is not None:
                print(f"{'':>20}  check ext W4: {compare(e4(x, w4, s4, bias), want4)}; ext W8: "
                      f"{compare(e8(x, w8, s8, bias), want8)}")
            print(f"{'':>20}  (quantization itself, reference W4A4 vs bf16: {compare(want4, dense)})")
        del x, w, bias, w4, s4, w8, s8, w4p, a8, a_s
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
