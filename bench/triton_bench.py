"""Per-FLUX-linear timings of the Triton route against cuBLAS bf16 and the CUDA extension, in one run (CUDA only).

    python bench/triton_bench.py [--check] [--group-size 256] [--iters 50] [--shapes 4096x3072x9216,...]

For each (M, K, N): cuBLAS bf16 F.linear, then (times in µs, "x" = bf16 time / route time, > 1 is faster):
  tW4 op      Triton W4A4 whole linear, W4_GEMM "packed" (rotate+quantize to int8 codes, one GEMM that unpacks
              and re-interleaves the packed int4 weight in registers)
  tW4s op     the same, W4_GEMM "split" (codes in the split chunk order, two dots per 128 channels, no interleave;
              K % 128 != 0 runs the packed_x16 fallback, and the split-only columns stay empty)
  tW4sw op    W4_GEMM "split_swap" (split, computing the transposed tile: the unpacked weight is wgmma's A)
  sw+fwht op / sw+row op   split_swap with the rotate+quantize method "fwht" / "row" (the others use tk.RQ)
  tW4u op     W4_GEMM "unpack" (a Triton kernel unpacks the weight to int8 per call, then the int8 GEMM)
  tW4x op     W4_GEMM "packed_x16" (tW4 op's one GEMM, the nibbles unpacked as 16x values: no sign extension)
  tW4 cop     the custom op (linear_op(): what torch.compile sees), with the module's W4_GEMM (printed)
  tW4p op     the weight prepared once as int8 codes (convrot.triton_kernels.prepare_weight)
  tW4 gemm    a GEMM alone: tW4 gemm packed weight, tW4x gemm the same as packed_x16, tW4s / tW4sw gemm the
              split kernels (split-order codes), tW4p gemm the prepared weight
  t rq        the Triton rotate+quantize pass alone (tk.RQ); rqs dot / fwht / row: each method writing the split
              order; t unp the weight unpack alone
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


# whole-op columns: (W4 route, rotate+quantize method; None = tk.RQ, from CONVROT_TRITON_RQ)
W4_ROUTES = {"tW4 op": ("packed", None), "tW4s op": ("split", None), "tW4sw op": ("split_swap", None),
             "tW4u op": ("unpack", None), "tW4x op": ("packed_x16", None),
             "sw+fwht op": ("split_swap", "fwht"), "sw+row op": ("split_swap", "row")}
RQ_COLS = {f"rqs {m}": m for m in tk.RQ_METHODS}  # rotate+quantize alone, in the split order


def make_inputs(m, k, n, group_size, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=g)
    x[:, torch.randint(0, k, (8,), device=device, generator=g)] *= 40.0  # outlier channels
    x = x.to(torch.bfloat16)
    w = (torch.randn(n, k, device=device, generator=g) * 0.02).to(torch.bfloat16)
    bias = (torch.randn(n, device=device, generator=g) * 0.1).to(torch.bfloat16)
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


def make_runs(inp, g: int, fns: dict) -> dict:
    """column -> zero-argument callable for one shape. inp: make_inputs' tuple; fns: linear functions by column
    (the W4_ROUTES columns, "tW4 cop", "tW8 op", optionally "ext W4" / "ext W8")."""
    x, w, bias, (w4, s4), (w8, s8) = inp
    k = x.shape[1]
    w4p = tk.prepare_weight(w4)
    a8, a_s = tk.rotate_quantize(x, g, 4, packed=False)
    runs = {"bf16": lambda: F.linear(x, w, bias)}
    for col in W4_ROUTES:
        runs[col] = (lambda f: lambda: f(x, w4, s4, bias))(fns[col])
    runs["tW4 cop"] = lambda: fns["tW4 cop"](x, w4, s4, bias, g, 4)
    runs["tW4p op"] = lambda: fns["tW4 op"](x, w4p, s4, bias)
    runs["tW4 gemm"] = lambda: tk.gemm(a8, a_s, w4, s4, bias, torch.bfloat16, k=k)
    runs["tW4x gemm"] = lambda: tk.gemm(a8, a_s, w4, s4, bias, torch.bfloat16, k=k, x16=True)
    if k % tk.SPLIT_CHUNK == 0:
        a8s, a_ss = tk.rotate_quantize(x, g, 4, packed=False, split=True)
        runs["tW4s gemm"] = lambda: tk.gemm(a8s, a_ss, w4, s4, bias, torch.bfloat16, k=k, split=True)
        runs["tW4sw gemm"] = lambda: tk.gemm(a8s, a_ss, w4, s4, bias, torch.bfloat16, k=k, split=True, swap=True)
        for col, method in RQ_COLS.items():
            runs[col] = (lambda rq: lambda: tk.rotate_quantize(x, g, 4, packed=False, split=True, rq=rq))(method)
    runs["tW4p gemm"] = lambda: tk.gemm(a8, a_s, w4p, s4, bias, torch.bfloat16, k=k)
    runs["t rq"] = lambda: tk.rotate_quantize(x, g, 4, packed=False)
    runs["t unp"] = lambda: tk.unpack_weight(w4)
    runs["tW8 op"] = lambda: fns["tW8 op"](x, w8, s8, bias)
    for col in ("ext W4", "ext W8"):
        if fns.get(col) is not None:
            w_q, w_s = (w4, s4) if col == "ext W4" else (w8, s8)
            runs[col] = (lambda f, w_q, w_s: lambda: f(x, w_q, w_s, bias))(fns[col], w_q, w_s)
    return runs


def check_lines(inp, g: int, runs: dict) -> list[str]:
    """--check: every route's output against convrot.reference (and the rotate+quantize codes)."""
    x, w, bias, (w4, s4), (w8, s8) = inp
    lines = []
    qr, sr = reference.rotate_quantize(x, g, 4)
    for method in tk.RQ_METHODS:
        q, s = tk.rotate_quantize(x, g, 4, rq=method)
        dq = (reference.unpack_int4(q).int() - reference.unpack_int4(qr).int()).abs()
        srel = ((s - sr).abs() / sr).max().item()
        lines.append(f"check rq {method}: {int((dq != 0).sum())} of {dq.numel()} codes differ (max "
                     f"{int(dq.max())}), scale max rel diff {srel:.1e}")
    want4 = reference.convrot_linear(x, w4, s4, bias, g, 4)
    want8 = reference.convrot_linear(x, w8, s8, bias, g, 8)
    parts = [f"{c}: {compare(runs[c](), want8 if c in ('tW8 op', 'ext W8') else want4)}"
             for c in [*W4_ROUTES, "tW4 cop", "tW4p op", "tW8 op", "ext W4", "ext W8"] if c in runs]
    lines += [f"check {'; '.join(parts[i:i + 3])}" for i in range(0, len(parts), 3)]
    # the GEMMs alone: the same codes as the reference's, so exactly its integer GEMM + epilogue
    a8, a_s = tk.rotate_quantize(x, g, 4, packed=False)
    want_g = reference.quantized_gemm(reference.pack_int4(a8), a_s, w4, s4, bias, torch.bfloat16, 4)
    parts = [f"{c}: {compare(runs[c](), want_g)}"
             for c in ("tW4 gemm", "tW4x gemm", "tW4s gemm", "tW4sw gemm", "tW4p gemm") if c in runs]
    lines.append("check gemm alone, vs the reference gemm of the kernel's own codes:")
    lines += [f"  {'; '.join(parts[i:i + 3])}" for i in range(0, len(parts), 3)]
    ok_unp = torch.equal(runs["t unp"](), reference.unpack_int4(w4))
    lines.append(f"check t unp: {'equal' if ok_unp else 'DIFFERS'} to reference.unpack_int4")
    lines.append(f"(quantization itself, reference W4A4 vs bf16: {compare(want4, F.linear(x, w, bias))})")
    return lines


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
    ap.add_argument("--pick", default=None, metavar="FILE",
                    help="write `export CONVROT_TRITON_W4=<route>` to FILE: the W4 route whose whole op (with the "
                         "module's rotate+quantize method) has the best geomean speed-up over the shapes with "
                         "M >= 4096 whose every output matched (--check)")
    args = ap.parse_args()
    if args.pick and not args.check:
        ap.error("--pick needs --check (a route is picked only from outputs that matched the reference)")
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
    fns = {col: tk.linear_fn(g, 4, w4_gemm=route, rq=rq) for col, (route, rq) in W4_ROUTES.items()}
    fns["tW8 op"] = tk.linear_fn(g, 8)
    fns["tW4 cop"] = tk.linear_op()
    print(f"tW4 cop runs W4_GEMM={tk.W4_GEMM!r} (CONVROT_TRITON_W4); columns without a method name use "
          f"RQ={tk.RQ!r} (CONVROT_TRITON_RQ)")
    if ext is not None:
        try:
            fns["ext W4"], fns["ext W8"] = ext.linear_fn(g, 4), ext.linear_fn(g, 8)
        except Exception as e:
            print(f"CUDA extension: linear_fn failed ({type(e).__name__}: {e}); its columns stay empty")

    cols = ["bf16", "tW4 op", "tW4x op", "tW4s op", "tW4sw op", "sw+fwht op", "sw+row op", "tW4u op", "tW4 cop",
            "tW4p op", "tW4 gemm", "tW4x gemm", "tW4s gemm", "tW4sw gemm", "tW4p gemm", "t rq", *RQ_COLS, "t unp",
            "tW8 op", "ext W4", "ext W8"]
    print()
    print(f"{'M x K x N':>20} " + " ".join(f"{c:>15}" for c in cols))
    ratios: dict = {col: [] for col in W4_ROUTES}
    for (m, k, n) in shapes:
        inp = make_inputs(m, k, n, g)
        runs = make_runs(inp, g, fns)
        times = time_runs(runs, lambda fn: bench(fn, args.iters, flush), f"{m}x{k}x{n}")
        print(f"{f'{m}x{k}x{n}':>20} " + row_cells(times, cols, 15))
        if m >= 4096:
            want4 = reference.convrot_linear(inp[0], *inp[3], inp[2], g, 4) if args.check else None
            for col in W4_ROUTES:
                ok = times.get(col) is not None and times.get("bf16")
                if ok and want4 is not None:
                    ok = _matches(runs[col](), want4)
                ratios[col].append(times["bf16"] / times[col] if ok else None)
            del want4
        try:
            from convrot import _triton_jit as j

            for name, tuner in (("gemm", j.gemm_tuned), ("split gemm", j.gemm_split_tuned),
                                ("rq", j.rotate_quantize_tuned), ("rq fwht", j.rotate_quantize_fwht_tuned),
                                ("rq row", j.rotate_quantize_row_tuned)):
                for key, cfg in getattr(tuner, "cache", {}).items():
                    if k in key and (name.startswith("rq") or n in key):
                        print(f"{'':>20}  autotuned {name} {key}: {cfg}")
        except Exception:
            pass
        if args.check:
            for line in check_lines(inp, g, runs):
                print(f"{'':>20}  {line}")
        del inp, runs
        torch.cuda.empty_cache()
    summary = {col: statistics.geometric_mean(r) for col, r in ratios.items() if r and None not in r}
    for col, gm in sorted(summary.items(), key=lambda kv: -kv[1]):
        route, rq = W4_ROUTES[col]
        print(f"geomean at M >= 4096, {route:>11} + {rq or tk.RQ:>4}: {gm:.2f}x of bf16")
    if args.pick and summary:
        # the W4 route only: a rotate+quantize method picked on these large shapes would override RQ "auto"'s
        # per-shape choice (row for few tokens) everywhere
        routes_only = {c: gm for c, gm in summary.items() if W4_ROUTES[c][1] is None}
        route = W4_ROUTES[max(routes_only, key=routes_only.get)][0]
        with open(args.pick, "w") as f:
            f.write(f"export CONVROT_TRITON_W4={route}\n")
        print(f"picked W4_GEMM={route} -> {args.pick} (rotate+quantize stays RQ={tk.RQ!r})")
    return 0


def _matches(y, want) -> bool:
    """Within the rounding of the output dtype (routes compute the same integers; the epilogue may round apart)."""
    y, want = y.float(), want.float()
    return bool(((y - want).abs().amax() <= 1e-2 * want.abs().amax().clamp_min(1e-6)).item())


if __name__ == "__main__":
    sys.exit(main())
